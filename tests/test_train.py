"""`sdlora train` end to end on the tiny models: run folder, golden losses, caches, SDXL, resume, errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import write_tiny_dataset
from sdlora.cli import app
from sdlora.config import load_config
from sdlora.errors import ConfigError, DataError, RunError
from sdlora.run import load_run, read_metrics
from sdlora.safetensors_io import read_metadata
from sdlora.train import loop, resolve, validation

# First losses of tiny-sd on the 6-image fixture dataset, seed 0, lr 1e-3 (this machine's numbers).
GOLDEN_LOSSES = [1.1156493425369263, 1.078417181968689, 1.0732008218765259]


def tiny_cfg(tmp_path: Path, dataset: Path, flags: dict[str, Any] | None = None, overrides=(), config_file=None):
    base = {
        "model.name": "tiny-sd",
        "data.dataset": str(dataset),
        "run.runs_dir": str(tmp_path / "runs"),
        "train.max_steps": 3,
        "train.learning_rate": 1e-3,
        "validation.validate_every": 0,
        "validation.prompts": [],
        "validation.steps": 2,
        "checkpoint.checkpoint_every": 0,
        "train.mixed_precision": "no",  # fp32: the golden losses on every CPU (auto picks bf16 where it is native)
    }
    if config_file is not None:
        base = {}
    return load_config(config_file, {**base, **(flags or {})}, list(overrides))


class Events(list):
    def __call__(self, event: dict) -> None:
        self.append(event)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self if e["event"] == kind]


def steps_of(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_run_folder_golden_losses_lora_loads_and_config_repeats(tmp_path: Path, tiny_dataset: Path):
    events = Events()
    cfg = tiny_cfg(
        tmp_path,
        tiny_dataset,
        {
            "train.max_steps": 4,
            "validation.validate_every": 2,
            "validation.prompts": ["a photo of {token} {class}"],
            "checkpoint.checkpoint_every": 2,
            "checkpoint.keep_checkpoints": 1,
            "run.name": "first",
            "embedding.train": False,  # the LoRA-only path, with cached text embeddings (test_train_embeddings: the other)
        },
    )
    result = loop.run_training(cfg, on_event=events)
    run = tmp_path / "runs" / "first"
    assert result.run_dir == run and result.steps == 4 and not result.interrupted
    assert (tmp_path / "runs" / "latest").resolve() == run

    # The run folder contract.
    for rel in (
        "config.yaml",
        "metrics.jsonl",
        "lora/pytorch_lora_weights.safetensors",
        "lora/first.safetensors",
        "best/pytorch_lora_weights.safetensors",
        "samples/step-000002/00-00.png",
        "samples/step-000004/00-00.png",
        "samples/step-000004/validation.json",
        "checkpoints/step-000004/sdlora.json",
        "checkpoints/step-000004/lora_weights_0.safetensors",
    ):
        assert (run / rel).is_file(), rel
    assert not (run / "checkpoints" / "step-000002").exists()  # --keep-checkpoints 1
    info = load_run(run)
    assert (info.model, info.token, info.class_word, info.resolution) == ("tiny-sd", "sksToy", "toy", 64)
    assert info.dataset == tiny_dataset.resolve()
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert saved["lora"]["alpha"] == 16.0
    assert saved["lora"]["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]  # the family's defaults
    assert saved["validation"]["guidance"] == 7.5
    assert saved["train"]["mixed_precision"] == "no"  # the golden losses are fp32's

    # metrics.jsonl: one line per step with the promised keys, val loss at 2 and 4.
    records = read_metrics(run / "metrics.jsonl")
    steps = steps_of(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in (
        "loss",
        "loss_mean",
        "grad_norm/unet",
        "grad_norm/total",
        "lr",
        "step_time_s",
        "images_per_s",
        "cpu_percent",
        "rss_gb",
    ):
        assert key in steps[0], key
    assert steps[0]["grad_norm/unet"] > 0 and steps[0]["grad_norm/total"] == pytest.approx(steps[0]["grad_norm/unet"])
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4] and all(math.isfinite(r["val_loss"]) for r in vals)
    assert [r["loss"] for r in steps[:3]] == pytest.approx(GOLDEN_LOSSES, abs=1e-4)
    start = events.of("start")[0]
    assert (start["effective_batch"], start["total_steps"]) == (1, 4)

    # The LoRA files say what they are: sdlora's keys in both, kohya's and modelspec's in the kohya file.
    import sdlora

    expected = {
        "sdlora.version": sdlora.__version__,
        "sdlora.base_model": "tiny-sd",
        "sdlora.architecture": "sd1",
        "sdlora.rank": "16",
        "sdlora.alpha": "16",
        "sdlora.token": "sksToy",
        "sdlora.class_word": "toy",
        "sdlora.steps": "4",
        "sdlora.resolution": "64",
        "sdlora.seed": "0",
        "sdlora.dora": "false",
        "sdlora.run": "first",
    }
    kohya = {
        "ss_base_model_version": "sd_v1",
        "ss_network_dim": "16",
        "ss_network_alpha": "16",
        "ss_steps": "4",
        "ss_sd_model_name": "tiny-sd",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.trigger_phrase": "sksToy",
        "modelspec.title": "first",
    }
    assert read_metadata(run / "lora" / "pytorch_lora_weights.safetensors").items() >= expected.items()
    assert read_metadata(run / "lora" / "first.safetensors").items() >= {**expected, **kohya}.items()
    best_step = min(vals, key=lambda r: (r["val_loss"], r["step"]))["step"]
    assert read_metadata(run / "best" / "pytorch_lora_weights.safetensors")["sdlora.steps"] == str(best_step)
    assert not (run / "lora" / "embeddings.safetensors").exists()  # embedding.train false: the LoRA alone
    assert not (run / "report.html").exists()  # the CLI layer refreshes the report, not the loop
    assert {e["what"]: e["encoded"] for e in events.of("cache")} == {"latents": 6, "text": 2}

    # The LoRA loads into the base pipeline and changes its images.
    from sdlora.models import load_pipeline

    pipe, _ = load_pipeline("tiny-sd")
    pipe.set_progress_bar_config(disable=True)

    def image() -> np.ndarray:
        return pipe(
            "a photo of sksToy toy",
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images[0]

    before = image()
    pipe.load_lora_weights(run / "lora")
    assert np.abs(image() - before).max() > 1e-4

    # config.yaml repeats the run (same losses) and the caches make the second run encode nothing.
    again = Events()
    cfg2 = load_config(
        run / "config.yaml",
        {"run.name": "again", "train.max_steps": 2, "validation.prompts": [], "checkpoint.checkpoint_every": 0},
    )
    loop.run_training(cfg2, on_event=again)
    assert {e["what"]: e["encoded"] for e in again.of("cache")} == {"latents": 0, "text": 0}
    assert [r["loss"] for r in steps_of(tmp_path / "runs" / "again")] == pytest.approx(
        [r["loss"] for r in steps[:2]], abs=1e-6
    )


def test_sdxl_trains_with_flip_and_samples(tmp_path: Path, tiny_dataset: Path, monkeypatch):
    # The photos were 133 x 100 (w x h) before prepare's center crop: at 64 px the crop starts 10 px from
    # the left of the 85 x 64 resized photo, and the mirror image's crop 85 - 64 - 10 = 11 px from its left.
    manifest_path = tiny_dataset / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    for record in manifest["images"].values():
        record["original_size"] = [133, 100]
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    plain_ids, mirrored_ids = [100.0, 133.0, 0.0, 10.0, 64.0, 64.0], [100.0, 133.0, 0.0, 11.0, 64.0, 64.0]

    events = Events()
    cfg = tiny_cfg(
        tmp_path,
        tiny_dataset,
        {
            "model.name": "tiny-sdxl",
            "train.max_steps": 2,
            "data.random_flip": True,
            "validation.prompts": ["{token} {class} on a beach"],
            "run.name": "xl",
        },
    )
    state = loop.setup(cfg, on_event=events)
    data = state.plan.instances
    assert data.time_ids.tolist() == [plain_ids] * len(data)
    assert data.time_ids_flipped.tolist() == [mirrored_ids] * len(data)

    # The flipped latents are the VAE's latents of the mirrored photos (encoded here independently).
    from PIL import Image, ImageOps

    vae = state.pipe.vae.to(torch.float32)
    for i, path in enumerate(sorted((tiny_dataset / "images").glob("*.png"))[: len(data)]):
        with Image.open(path) as img:
            mirrored = np.asarray(ImageOps.mirror(img.convert("RGB")), dtype=np.float32) / 127.5 - 1.0
        pixels = torch.from_numpy(mirrored).permute(2, 0, 1)[None]
        with torch.no_grad():
            expected = vae.encode(pixels).latent_dist.mean[0] * vae.config.scaling_factor
        torch.testing.assert_close(data.flipped[i], expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(data.flipped[i], data.latents[i], atol=1e-3)

    # Each sample is drawn plain or mirrored, its latents and time ids together, and both happen.
    seen = set()
    for step in range(12):
        batch = state.plan.batch(step, 0)
        for latent, ids, i in zip(batch.latents, batch.time_ids.tolist(), state.plan.indices(step, 0)):
            flipped = torch.equal(latent, data.flipped[i])
            assert flipped or torch.equal(latent, data.latents[i])
            assert ids == (mirrored_ids if flipped else plain_ids)
            seen.add(flipped)
    assert seen == {True, False}

    # Training hands the UNet the batch's time ids.
    forwards: list[torch.Tensor] = []
    unet = state.unwrap(state.unet)
    real_forward = unet.forward

    def forward(sample, *args, **kwargs):
        forwards.append(kwargs["added_cond_kwargs"]["time_ids"].cpu())
        return real_forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", forward)
    try:
        result = loop.train(state)
    finally:
        loop.cleanup(state)
    for step in range(2):
        assert torch.equal(forwards[step], state.plan.batch(step, 0).time_ids)

    run = result.run_dir
    assert events.of("start")[0]["arch"] == "sdxl"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "samples" / "step-000002" / "00-00.png").is_file()
    entries = json.loads((run / "samples" / "step-000002" / "validation.json").read_text(encoding="utf-8"))["images"]
    assert entries[0]["prompt"] == "sksToy toy on a beach"
    steps = steps_of(run)
    assert all(math.isfinite(r["loss"]) for r in steps) and "grad_norm/text_encoder" not in steps[0]
    assert result.best_val_loss is not None


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_samples_from_cached_embeddings_are_the_pipelines_own(model: str):
    """Validation samples use the cached prompt embeddings (the text encoders are gone by then): they must
    be the images the pipeline makes from the prompt itself, negative (empty-prompt) conditioning included."""
    from sdlora.models import load_pipeline

    pipe, arch = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of sksToy toy"
    with torch.no_grad():
        embeds, pooled = arch.encode_prompts(pipe, [prompt])
        neg, neg_pooled = arch.encode_prompts(pipe, [""])
    cond = (embeds[0], None if pooled is None else pooled[0])
    negative = (neg[0], None if neg_pooled is None else neg_pooled[0])
    kwargs = arch.prompt_embeds_kwargs(pipe, cond, negative, "cpu")
    assert ("pooled_prompt_embeds" in kwargs) == arch.uses_pooled

    def render(**kwargs: Any) -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        out = pipe(num_inference_steps=2, height=64, width=64, output_type="np", generator=generator, **kwargs)
        return out.images[0]

    np.testing.assert_allclose(render(**kwargs), render(prompt=prompt), atol=1e-5, rtol=0)


def test_real_photos_train_sdxl_with_their_original_sizes(tmp_path: Path, dreambench: Path):
    from sdlora.data.ingest import prepare_dataset
    from sdlora.data.manifest import load_manifest
    from sdlora.train.data import load_examples

    dataset = tmp_path / "duck"
    prepare_dataset(str(dreambench / "duck_toy"), dataset, resolution=64, workers=1, class_word="duck toy")
    manifest = load_manifest(dataset)
    examples = load_examples(dataset, manifest, "train", 64, manifest.token)
    record = manifest.images[examples[0].path.name]
    w, h = record.original_size
    assert examples[0].original_size == (h, w)  # SDXL micro-conditioning is (height, width)
    top, left = examples[0].crop_top_left
    assert (top > 0) == (h > w) and (left > 0) == (w > h)  # the center crop's offset in the resized photo
    result = loop.run_training(tiny_cfg(tmp_path, dataset, {"model.name": "tiny-sdxl", "train.max_steps": 2}))
    assert all(math.isfinite(r["loss"]) for r in steps_of(result.run_dir))
    assert (result.run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_text_encoder_training_logs_each_group_grad_norm(tmp_path: Path, tiny_dataset: Path):
    cfg = tiny_cfg(
        tmp_path,
        tiny_dataset,
        {
            "model.name": "tiny-sdxl",
            "train.max_steps": 2,
            "lora.train_text_encoder": True,
            "train.text_encoder_lr": 5e-4,
            "validation.prompts": ["a photo of {token} {class}"],
        },
    )
    events = Events()
    result = loop.run_training(cfg, on_event=events)
    steps = steps_of(result.run_dir)
    groups = ("unet", "text_encoder", "text_encoder_2", "embeddings")  # the token's own embedding: its own group
    for key in groups:
        assert steps[0][f"grad_norm/{key}"] > 0, key
    total = math.sqrt(sum(steps[0][f"grad_norm/{k}"] ** 2 for k in groups))
    assert steps[0]["grad_norm/total"] == pytest.approx(total)
    assert steps[0]["lr/text_encoder"] == 5e-4 and steps[0]["lr"] == 1e-3
    assert not [e for e in events.of("cache") if e["what"] == "text"]  # nothing cached: the encoders train
    lora = load_file(result.run_dir / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("text_encoder.") for k in lora) and any(k.startswith("text_encoder_2.") for k in lora)


def test_v_prediction_prior_preservation_and_no_val_images(tmp_path: Path, tiny_dataset: Path):
    from sdlora.models import load_pipeline

    pipe, _ = load_pipeline("tiny-sd")
    pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    model_dir = tmp_path / "vpred-model"
    pipe.save_pretrained(model_dir)
    manifest_path = tiny_dataset / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["train"] += manifest["val"]
    manifest["val"] = []
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")

    events = Events()
    cfg = tiny_cfg(
        tmp_path,
        tiny_dataset,
        {
            "model.name": str(model_dir),
            "train.max_steps": 2,
            "train.snr_gamma": 5.0,
            "train.noise_offset": 0.05,
            "prior.class_prompt": "a photo of a toy",
            "prior.num_class_images": 2,
        },
    )
    result = loop.run_training(cfg, on_event=events)
    assert events.of("start")[0]["prediction_type"] == "v_prediction"
    assert any("no val images" in e["message"] for e in events.of("warning"))
    assert result.best_val_loss is None and not (result.run_dir / "best").exists()
    steps = steps_of(result.run_dir)
    assert {"loss/instance", "loss/prior"} <= set(steps[0])
    assert steps[0]["loss"] == pytest.approx(steps[0]["loss/instance"] + steps[0]["loss/prior"], rel=1e-5)
    assert len(list((tiny_dataset / ".cache" / "class-images").glob("*.png"))) == 2


def test_resume_gives_the_same_lora_as_an_uninterrupted_run(tmp_path: Path, tiny_dataset: Path):
    flags = {
        "train.max_steps": 6,
        "train.lr_scheduler": "cosine",
        "train.lr_warmup_steps": 2,
        "train.gradient_accumulation": 2,
        "lora.dropout": 0.1,
        "checkpoint.checkpoint_every": 0,
    }
    straight = loop.run_training(tiny_cfg(tmp_path, tiny_dataset, {**flags, "run.name": "straight"}))

    state = loop.setup(tiny_cfg(tmp_path, tiny_dataset, {**flags, "run.name": "halves"}))

    def stop_at_3(event: dict) -> None:
        if event["event"] == "step" and event["step"] == 3:
            state.request_stop()  # what Ctrl-C does

    try:
        first = loop.train(state, stop_at_3)
    finally:
        loop.cleanup(state)
    assert first.interrupted and first.steps == 3
    assert (first.run_dir / "checkpoints" / "step-000003" / "sdlora.json").is_file()
    assert (first.run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()

    run_dir, cfg, warnings = resolve.resume_run(first.run_dir, [{}], ("command line",))
    assert warnings == [] and run_dir == first.run_dir
    events = Events()
    second = loop.run_training(cfg, resume=run_dir, on_event=events)
    assert events.of("resumed")[0]["step"] == 3 and second.steps == 6
    a = load_file(straight.lora_dir / "pytorch_lora_weights.safetensors")
    b = load_file(second.lora_dir / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    assert [r["step"] for r in steps_of(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in steps_of(run_dir)] == pytest.approx(
        [r["loss"] for r in steps_of(straight.run_dir)], abs=1e-5
    )


def test_bf16_dora_and_gradient_checkpointing(tmp_path: Path, tiny_dataset: Path):
    cfg = tiny_cfg(
        tmp_path,
        tiny_dataset,
        {
            "train.max_steps": 1,
            "train.mixed_precision": "bf16",
            "lora.dora": True,
            "train.gradient_checkpointing": True,
            "validation.prompts": ["a photo of {token} {class}"],
        },
    )
    state = loop.setup(cfg)
    try:
        unet = state.unwrap(state.unet)
        trainable = [p for p in unet.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)  # LoRA (and DoRA magnitudes) in fp32
        assert unet.conv_in.weight.dtype == torch.bfloat16 and unet.is_gradient_checkpointing
        assert any("lora_magnitude_vector" in name for name, _ in unet.named_parameters())
        result = loop.train(state)
    finally:
        loop.cleanup(state)
    assert all(math.isfinite(r["loss"]) for r in steps_of(result.run_dir))
    assert (result.run_dir / "samples" / "step-000001" / "00-00.png").is_file()


def test_nan_loss_stops_with_the_step(tmp_path: Path, tiny_dataset: Path, monkeypatch):
    real = loop.compute_loss

    def poisoned(state, batch):
        loss, parts = real(state, batch)
        return loss * float("nan") if state.step == 1 else loss, parts

    monkeypatch.setattr(loop, "compute_loss", poisoned)
    with pytest.raises(RunError, match=r"step 2: the loss is nan .*Try a lower --learning-rate"):
        loop.run_training(tiny_cfg(tmp_path, tiny_dataset))


# ----------------------------------------------------------------------------- the CLI

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["train", *args])


def test_help_exits_cleanly():
    result = invoke("--help")
    assert result.exit_code == 0 and "--max-steps" in result.output and "LoRA rank" in result.output


def test_cli_trains_and_prints_the_plan(tmp_path: Path, tiny_dataset: Path):
    result = invoke(
        "--model",
        "tiny-sd",
        "--dataset",
        str(tiny_dataset),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--max-steps",
        "2",
        "--name",
        "cli",
        "--batch-size",
        "2",
        "--gradient-accumulation",
        "2",
        "validation.prompts=[]",
    )
    assert result.exit_code == 0, result.output
    assert "effective batch 4" in result.output and "2 steps" in result.output
    assert (tmp_path / "runs" / "cli" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    again = invoke(
        "--model", "tiny-sd", "--dataset", str(tiny_dataset), "--runs-dir", str(tmp_path / "runs"), "--name", "cli"
    )
    assert again.exit_code == 1 and "a run with this name exists" in again.output

    # --resume latest continues from the end-of-run checkpoint; the LoRA shape stays the checkpoint's.
    resumed = invoke(
        "--resume",
        "latest",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--max-steps",
        "3",
        "--rank",
        "8",
        "--learning-rate",
        "5e-4",
    )
    assert resumed.exit_code == 0, resumed.output
    assert "using the checkpoint's 16" in resumed.output and "using 0.0005 from the command line" in resumed.output
    assert "resumed at step 2" in resumed.output
    run = tmp_path / "runs" / "cli"
    assert [r["step"] for r in steps_of(run)] == [1, 2, 3] and steps_of(run)[-1]["lr"] == 5e-4
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["max_steps"] == 3 and saved["lora"]["rank"] == 16 and saved["run"]["name"] is None


def test_print_config_resolves_without_training(tmp_path: Path):
    result = invoke("--config", "tiny", "--rank", "2", "lora.dropout=0.1", "--print-config")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["lora"]["rank"] == 2 and printed["lora"]["dropout"] == 0.1 and printed["model"]["name"] == "tiny-sd"


@pytest.mark.parametrize(
    "cuda, cuda_bf16, cpu_bf16, expected",
    [
        (True, True, False, "bf16"),
        (True, False, True, "fp16"),
        (False, False, True, "bf16"),  # a CPU with AVX512-BF16 or AMX
        (False, False, False, "no"),  # elsewhere bf16 is emulated, slower than fp32
    ],
)
def test_auto_precision_follows_the_hardware(monkeypatch, cuda, cuda_bf16, cpu_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(resolve, "cpu_computes_bf16", lambda: cpu_bf16)
    cfg = load_config(None, {"train.mixed_precision": "auto"})
    assert resolve.resolve_precision(cfg).train.mixed_precision == expected
    pinned = load_config(None, {"train.mixed_precision": "no"})
    assert resolve.resolve_precision(pinned).train.mixed_precision == "no"  # only auto is resolved


def test_cpu_bf16_probe_reads_the_cpu_flags():
    """The probe agrees with the kernel's CPU flags (Linux), so auto picks bf16 exactly where it is native."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set(cpuinfo.read_text().split())
    assert resolve.cpu_computes_bf16() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)


@pytest.mark.parametrize(
    "setup_args, message",
    [
        (lambda d: ["--dataset", str(d / "nope")], "no such dataset folder"),
        (lambda d: ["--dataset", str(d), "lora.rnk=3"], "unknown key lora.rnk (did you mean rank?)"),
        (lambda d: ["--dataset", str(d), "--rank", "0", "--max-steps", "0"], "--rank must be at least 1"),
        (lambda d: ["--dataset", str(d), "--model", "nobody/no-such-model"], "not in the local cache"),
        (
            lambda d: ["--dataset", str(d), "--model", "tiny-sd", "--target-modules", "to_nothing"],
            "--target-modules to_nothing: no such modules in the UNet",
        ),
        (lambda d: ["--dataset", str(d), "--resume", str(d / "no-run")], "no such run folder"),
        (lambda d: ["--dataset", str(d), "--optimizer", "sgd"], "'sgd' is not one of adamw, adamw8bit"),
        (
            lambda d: ["--dataset", str(d), "--model", "tiny-sd", "--mixed-precision", "fp16"],
            "--mixed-precision fp16 needs a CUDA GPU",
        ),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, tiny_dataset: Path, setup_args, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    result = invoke(*setup_args(tiny_dataset))
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_dataset_problems(tmp_path: Path):
    bad_token = write_tiny_dataset(tmp_path / "bad-token")
    (bad_token / "captions.txt").write_text("img_000.png|a photo of a toy\n", encoding="utf-8")
    with pytest.raises(DataError, match="lack the token 'sksToy'|no caption for"):
        loop.setup(tiny_cfg(tmp_path, bad_token))
    empty = write_tiny_dataset(tmp_path / "empty", n=1)
    manifest = json.loads((empty / "manifest.json").read_text(encoding="utf-8"))
    manifest["train"] = []
    (empty / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(DataError, match="no train images"):
        loop.setup(tiny_cfg(tmp_path, empty))
    with pytest.raises(ConfigError, match="--token 'other' differs from the dataset's 'sksToy'"):
        loop.setup(tiny_cfg(tmp_path, empty, {"data.token": "other"}))


def test_ctrl_c_saves_a_checkpoint_and_the_lora_then_exits(tmp_path: Path, tiny_dataset: Path):
    import signal
    import subprocess
    import sys
    import time

    runs = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "sdlora",
        "train",
        "--model",
        "tiny-sd",
        "--dataset",
        str(tiny_dataset),
        "--runs-dir",
        str(runs),
        "--name",
        "stopped",
        "--max-steps",
        "100000",
        "--validate-every",
        "0",
        "--checkpoint-every",
        "0",
        "validation.prompts=[]",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    metrics = runs / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text(encoding="utf-8").count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "stopping after this step; saving a checkpoint and the LoRA (Ctrl-C again to stop without saving)" in err
    assert "Continue with: sdlora train --resume" in out
    checkpoints = sorted((runs / "stopped" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "sdlora.json").is_file()
    step = json.loads((checkpoints[0] / "sdlora.json").read_text(encoding="utf-8"))["step"]
    assert step >= 2 and [r["step"] for r in steps_of(runs / "stopped")][-1] == step
    assert (runs / "stopped" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_an_optimizer_whose_package_is_missing_fails_before_the_model_loads(tmp_path: Path, tiny_dataset: Path):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes"):
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(ConfigError, match=r"--optimizer adamw8bit needs bitsandbytes \(pip install bitsandbytes"):
        loop.setup(tiny_cfg(tmp_path, tiny_dataset, {"train.optimizer": "adamw8bit"}))
    assert not (tmp_path / "runs").exists()


def test_missing_tracker_is_a_clear_error(tmp_path: Path, tiny_dataset: Path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed")
    result = invoke("--dataset", str(tiny_dataset), "--model", "tiny-sd", "--report-to", "tensorboard")
    assert result.exit_code == 1 and "tensorboard is not installed (pip install tensorboard)" in result.output


@pytest.mark.slow
def test_overfitting_one_image_lowers_its_loss(tmp_path: Path):
    """A real learning signal: 100 steps on one image lower the loss on that image (fixed noise) clearly."""
    import shutil

    dataset = write_tiny_dataset(tmp_path / "dataset", n=2)
    manifest = json.loads((dataset / "manifest.json").read_text(encoding="utf-8"))
    shutil.copy(dataset / "images" / manifest["train"][0], dataset / "images" / manifest["val"][0])
    cfg = tiny_cfg(
        tmp_path,
        dataset,
        {
            "train.max_steps": 100,
            "train.learning_rate": 3e-3,
            "lora.target_modules": [
                "to_q",
                "to_k",
                "to_v",
                "to_out.0",
                "ff.net.0.proj",
                "ff.net.2",
                "proj_in",
                "proj_out",
            ],
        },
    )
    state = loop.setup(cfg)
    try:
        before = validation.validation_loss(state)
        result = loop.train(state)
    finally:
        loop.cleanup(state)
    assert result.best_val_loss < 0.93 * before, (before, result.best_val_loss)
