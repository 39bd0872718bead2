"""Pivotal tuning in `sdlora train`: the token's own embedding, trained, logged, saved and used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from sdlora.generate import load_embeddings
from sdlora.models import load_pipeline
from sdlora.run import read_metrics
from sdlora.train import loop, resolve
from test_train import Events, invoke, steps_of, tiny_cfg

PROMPT = "a photo of sksToy toy"


def text_encoder_state(model: str) -> list[dict[str, torch.Tensor]]:
    pipe, arch = load_pipeline(model)
    return [{k: v.clone() for k, v in getattr(pipe, name).state_dict().items()} for name in arch.text_encoders]


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_embedding_trains_alone_and_loads_back_as_training_saw_it(tmp_path: Path, tiny_dataset: Path, model):
    events = Events()
    cfg = tiny_cfg(
        tmp_path,
        tiny_dataset,
        {"model.name": model, "train.max_steps": 4, "run.name": "r", "embedding.steps_fraction": 1.0},
    )
    state = loop.setup(cfg, on_event=events)
    try:
        assert state.cfg.embedding.train is True  # sksToy is split by the tokenizer: on by default
        assert state.cfg.embedding.init_token == "toy"  # the class word
        start = {k: v.detach().clone() for k, v in state.tokens.vectors.items()}
        result = loop.train(state)
        with torch.no_grad():
            seen = state.arch.encode_prompts(state.pipe, [PROMPT])  # the hooked encoders, as training used them
    finally:
        loop.cleanup(state)

    # Only the new vectors changed: every text-encoder weight is the base model's (no row of the
    # embedding matrix moved; the matrix only grew by the new row).
    for name, base in zip(state.arch.text_encoders, text_encoder_state(model)):
        for key, value in getattr(state.pipe, name).state_dict().items():
            if key.endswith("token_embedding.weight"):
                assert torch.equal(value[: base[key].shape[0]], base[key]) and value.shape[0] == base[key].shape[0] + 1
            else:
                assert torch.equal(value, base[key]), key
    for name, vector in state.tokens.vectors.items():
        assert not torch.equal(vector.detach().cpu(), start[name].cpu())

    # Saved where sample/score look, in the keys A1111 / ComfyUI / diffusers read ...
    path = result.lora_dir / "embeddings.safetensors"
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == ({"clip_l", "clip_g"} if model == "tiny-sdxl" else {"emb_params"})
        assert f.metadata()["sdlora.token"] == "sksToy"
    # ... and a fresh pipeline that loads it encodes the prompt exactly as training did.
    fresh, arch = load_pipeline(model)
    load_embeddings(fresh, arch, path, "sksToy")
    with torch.no_grad():
        loaded = arch.encode_prompts(fresh, [PROMPT])
    assert torch.allclose(seen[0], loaded[0], atol=1e-6)
    if arch.uses_pooled:
        assert torch.allclose(seen[1], loaded[1], atol=1e-6)

    # Logged as its own gradient-norm group, with its learning rate and the vectors' norms.
    steps = steps_of(result.run_dir)
    assert all(r["grad_norm/embeddings"] > 0 and r["lr/embeddings"] == 5e-3 for r in steps)
    assert all(f"embedding_norm/{name}" in r for r in steps for name in state.arch.text_encoders)
    started = events.of("start")[0]["token_embedding"]
    assert started == {"token": "sksToy", "init_token": "toy", "until_step": 4}


def test_embedding_freezes_after_its_fraction_of_the_steps(tmp_path: Path, tiny_dataset: Path):
    cfg = tiny_cfg(
        tmp_path, tiny_dataset, {"train.max_steps": 4, "embedding.steps_fraction": 0.5, "embedding.init_token": "ball"}
    )
    state = loop.setup(cfg)
    try:
        result = loop.train(state)
        # Frozen, the captions were encoded once (train and val) and read from then on: what the live
        # encoders give for them.
        with torch.no_grad():
            live, _ = state.arch.encode_prompts(state.pipe, [PROMPT])
        for data in (state.plan.instances, state.val_data):
            assert data.cond.token_ids is None and data.cond.embeds.shape[0] == len(data)
            assert torch.allclose(data.cond.embeds, live.expand_as(data.cond.embeds), atol=1e-6)
    finally:
        loop.cleanup(state)
    steps = steps_of(result.run_dir)
    norms = [r["embedding_norm/text_encoder"] for r in steps]
    assert [r["grad_norm/embeddings"] > 0 for r in steps] == [True, True, False, False]
    assert norms[1] != norms[0] and norms[3] == norms[2] == norms[1]  # trained for 2 steps, then frozen
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert saved["embedding"] == {"train": True, "init_token": "ball", "learning_rate": 5e-3, "steps_fraction": 0.5}


def test_with_text_encoder_lora_and_resume_the_embedding_continues(tmp_path: Path, tiny_dataset: Path):
    flags = {"train.max_steps": 4, "lora.train_text_encoder": True, "embedding.steps_fraction": 1.0}
    straight = loop.run_training(tiny_cfg(tmp_path, tiny_dataset, {**flags, "run.name": "straight"}))
    state = loop.setup(tiny_cfg(tmp_path, tiny_dataset, {**flags, "run.name": "halves"}))

    def stop_at_2(event: dict) -> None:
        if event["event"] == "step" and event["step"] == 2:
            state.request_stop()

    try:
        loop.train(state, stop_at_2)
    finally:
        loop.cleanup(state)
    run_dir, cfg, warnings = resolve.resume_run(state.run_dir, [{}], ("command line",))
    assert warnings == []
    resumed = loop.run_training(cfg, resume=run_dir)
    assert resumed.steps == 4
    for name in ("embeddings.safetensors", "pytorch_lora_weights.safetensors"):
        with safe_open(str(straight.lora_dir / name), "pt") as a, safe_open(str(resumed.lora_dir / name), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            for key in a.keys():
                torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), atol=1e-5, rtol=0)


def test_a_known_word_token_trains_no_embedding(tmp_path: Path):
    from conftest import write_tiny_dataset

    dataset = write_tiny_dataset(tmp_path / "sks", token="sks")
    result = loop.run_training(tiny_cfg(tmp_path, dataset, {"train.max_steps": 1}))
    assert not (result.lora_dir / "embeddings.safetensors").exists()
    assert "grad_norm/embeddings" not in steps_of(result.run_dir)[0]


def test_cli_flags_and_yaml(tmp_path: Path, tiny_dataset: Path):
    common = [
        "--model",
        "tiny-sd",
        "--dataset",
        str(tiny_dataset),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--max-steps",
        "2",
        "--validate-every",
        "0",
        "--checkpoint-every",
        "0",
    ]
    # Off by the flag or by YAML: the resolved config says so (a run with embedding.train false writes no
    # embedding file: test_train.py's golden run).
    result = invoke(*common, "--no-train-token-embedding", "--print-config")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["embedding"]["train"] is False
    config = tmp_path / "c.yaml"
    config.write_text("embedding:\n  train: false\n", encoding="utf-8")
    result = invoke(*common, "--config", str(config), "--print-config")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["embedding"]["train"] is False

    result = invoke(
        *common, "--init-token", "ball", "--embedding-lr", "0.01", "--embedding-steps-fraction", "1", "--name", "on"
    )
    assert result.exit_code == 0, result.output
    assert "token sksToy: its own embedding, from 'ball', trained until step 2" in result.output
    assert (tmp_path / "runs" / "on" / "lora" / "embeddings.safetensors").is_file()
    assert read_metrics(tmp_path / "runs" / "on" / "metrics.jsonl")[0]["lr/embeddings"] == 0.01

    result = invoke(*common, "--embedding-steps-fraction", "0")
    assert result.exit_code == 1 and "--embedding-steps-fraction must be in (0, 1]" in result.output


def test_a_run_from_before_pivotal_tuning_resumes_without_an_embedding(tmp_path: Path, tiny_dataset: Path):
    first = loop.run_training(
        tiny_cfg(
            tmp_path, tiny_dataset, {"train.max_steps": 2, "embedding.train": False, "checkpoint.checkpoint_every": 2}
        )
    )
    config = first.run_dir / "config.yaml"
    saved = yaml.safe_load(config.read_text(encoding="utf-8"))
    del saved["embedding"]  # as config.yaml was written before the section existed
    config.write_text(yaml.safe_dump(saved), encoding="utf-8")
    run_dir, cfg, warnings = resolve.resume_run(first.run_dir, [{"train": {"max_steps": 3}}], ("command line",))
    assert cfg.embedding.train is False
    assert loop.run_training(cfg, resume=run_dir).steps == 3


# ---- FLUX.1: the token's vectors in CLIP-L and T5 (diffusers' train_dreambooth_lora_flux_advanced.py with
# --train_text_encoder_ti --enable_t5_ti), asked for with --train-token-embedding


def flux_run(tmp_path: Path, dataset: Path, **flags):
    from test_flux_family import flux_cfg

    return flux_cfg(tmp_path, dataset, **{"embedding.train": True, **flags})


def test_flux_embedding_trains_in_clip_l_and_t5_and_loads_as_diffusers_readme_shows(tmp_path: Path, tiny_dataset):
    from PIL import Image

    from sdlora.generate.samples import generate_samples
    from sdlora.run import DIFFUSERS_LORA, load_run, read_samples

    state = loop.setup(flux_run(tmp_path, tiny_dataset, **{"run.name": "p", "embedding.steps_fraction": 1.0}))
    try:
        start = {k: v.detach().clone() for k, v in state.tokens.vectors.items()}
        t5_table = state.pipe.text_encoder_2.get_input_embeddings().weight.detach().clone()
        result = loop.train(state)
        with torch.no_grad():
            seen = state.arch.encode_prompts(state.pipe, [PROMPT])  # the hooked encoders, as training used them
    finally:
        loop.cleanup(state)
    assert set(start) == {"text_encoder", "text_encoder_2"}  # CLIP-L and T5
    for name, vector in state.tokens.vectors.items():
        assert not torch.equal(vector.detach().cpu(), start[name].cpu()), name
    # T5's shared table itself never moved (the vector trains beside it, through the hook).
    assert torch.equal(state.pipe.text_encoder_2.get_input_embeddings().weight.detach(), t5_table)

    # diffusers' keys (clip_l, t5) and ComfyUI's T5 key (t5xxl), one vector each, of each encoder's width.
    path = result.lora_dir / "embeddings.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        assert f.metadata()["sdlora.token"] == "sksToy"
    assert {key: tuple(t.shape) for key, t in tensors.items()} == {"clip_l": (1, 32), "t5": (1, 32), "t5xxl": (1, 32)}
    assert torch.equal(tensors["t5"], tensors["t5xxl"])
    # Loaded as the advanced script's README loads it, FluxPipeline encodes the prompt exactly as training did.
    fresh, _ = load_pipeline("tiny-flux")
    fresh.load_textual_inversion(
        tensors["clip_l"], token="sksToy", text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer
    )
    fresh.load_textual_inversion(
        tensors["t5"], token="sksToy", text_encoder=fresh.text_encoder_2, tokenizer=fresh.tokenizer_2
    )
    with torch.no_grad():
        embeds, pooled, _ = fresh.encode_prompt(PROMPT, None, max_sequence_length=512)
    torch.testing.assert_close(embeds, seen[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, seen[1], atol=1e-6, rtol=0)

    # `sdlora sample` loads it beside the LoRA: the same LoRA without the embedding samples another image.
    run = load_run(result.run_dir)
    bare = tmp_path / "lora-alone"
    bare.mkdir()
    (bare / DIFFUSERS_LORA).write_bytes((result.lora_dir / DIFFUSERS_LORA).read_bytes())
    images = []
    for out, lora in (("with", None), ("without", bare)):
        common = dict(num_images=1, steps=2, baseline=False, on_warning=lambda line: None)
        samples = generate_samples(run, ["sksToy on a beach"], out_dir=tmp_path / out, lora_dir=lora, **common)
        entry = read_samples(samples)["images"][0]
        images.append(torch.tensor(list(Image.open(tmp_path / out / entry["file"]).getdata())))
    assert not torch.equal(images[0], images[1])


@pytest.mark.slow  # 5 s; SD's resume with the embedding stays in the default suite
def test_flux_resume_with_the_embedding_equals_straight_through(tmp_path: Path, tiny_dataset: Path):
    """Stopped at step 2 of 4, the run resumes with the vectors of its checkpoint, freezes them at once (the
    embedding trains for the first half) and encodes its captions with them: the files of an uninterrupted run."""
    flags = {"train.max_steps": 4, "embedding.steps_fraction": 0.5}
    straight = loop.run_training(flux_run(tmp_path, tiny_dataset, **flags, **{"run.name": "straight"}))
    state = loop.setup(flux_run(tmp_path, tiny_dataset, **flags, **{"run.name": "halves"}))

    def stop_at_2(event: dict) -> None:
        if event["event"] == "step" and event["step"] == 2:
            state.request_stop()

    try:
        loop.train(state, stop_at_2)
    finally:
        loop.cleanup(state)
    run_dir, cfg, warnings = resolve.resume_run(state.run_dir, [{}], ("command line",))
    assert warnings == [] and cfg.embedding.train is True
    resumed = loop.run_training(cfg, resume=run_dir)
    assert resumed.steps == 4
    for name in ("embeddings.safetensors", "pytorch_lora_weights.safetensors"):
        with safe_open(str(straight.lora_dir / name), "pt") as a, safe_open(str(resumed.lora_dir / name), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            for key in a.keys():
                torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), atol=1e-6, rtol=0)
