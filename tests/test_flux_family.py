"""The FLUX.1 family (models/families/flux.py) on tiny-flux: detected from model_index.json, latents packed as
diffusers packs them, a golden first loss, the default LoRA targets, the diffusers file loading back into a
fresh FluxPipeline with the trained transformer's output, resume equal to straight-through, train -> sample
through the CLI, the one-line refusals of what this version does not train, and what follows the base
model's variant ([dev] / [schnell]) or its text encoders' windows. Pivotal tuning: test_train_embeddings.py;
the CLIP-L LoRA (--train-text-encoder): test_flux_text_encoder.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import one_line_error
from recipe_helpers import assert_same_lora, stopped_and_resumed
from sdlora.cli import app
from sdlora.config import load_config
from sdlora.errors import ConfigError
from sdlora.models import families, load_pipeline
from sdlora.models.families import FLUX1, SD1, detect_family
from sdlora.models.families.flux import ATTENTION, latent_ids, pack_latents, unpack_latents
from sdlora.models.families.flux_keys import kohya_flux_to_peft
from sdlora.run import DIFFUSERS_LORA
from sdlora.safetensors_io import read_metadata
from sdlora.train import loop
from sdlora.train.flow_matching import FlowMatching

# The first two losses of tiny-flux on the 6-image fixture dataset, seed 0, lr 1e-3, fp32.
GOLDEN_LOSSES = [1.4171773195266724, 1.4043760299682617]

runner = CliRunner()


def flux_cfg(tmp_path: Path, dataset: Path, **flags):
    base = {
        "model.name": "tiny-flux",
        "data.dataset": str(dataset),
        "run.runs_dir": str(tmp_path / "runs"),
        "train.max_steps": 2,
        "train.learning_rate": 1e-3,
        "validation.validate_every": 0,
        "validation.prompts": [],
        "checkpoint.checkpoint_every": 0,
        "train.mixed_precision": "no",  # fp32: the golden losses on every CPU
    }
    return load_config(None, {**base, **flags}, [])


def test_flux_is_detected_from_model_index_and_transformer_config(tmp_path: Path):
    assert detect_family({"_class_name": "FluxPipeline"}) is FLUX1
    assert detect_family({}, unet_config={"axes_dims_rope": [16, 56, 56], "joint_attention_dim": 4096}) is FLUX1
    assert families.tiny_family("tiny-flux") is FLUX1 and families.family_named("flux1") is FLUX1
    # A folder whose model_index.json names FluxPipeline is FLUX.1, whatever the folder is called.
    folder = tmp_path / "my-sd15-finetune"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    from sdlora.models.loading import _family

    assert _family(str(folder), None) is FLUX1
    pipe, family = load_pipeline("tiny-flux")
    assert family is FLUX1 and type(pipe).__name__ == "FluxPipeline"
    assert families.family_of_pipeline(pipe) is FLUX1


def test_latents_pack_into_tokens_as_the_flux_pipeline_packs_them():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 4, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 4))
    assert torch.equal(unpack_latents(packed, 6, 4), latents)
    # _unpack_latents takes the image's pixel size (latents x 8)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 32, 8), latents)
    assert torch.equal(
        latent_ids(6, 4, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32)
    )


def test_the_objective_is_flow_matching_with_sigma_as_the_timestep_and_the_options_reach_it(tmp_path: Path):
    default = FLUX1.training_objective(None, flux_cfg(tmp_path, tmp_path).train)
    assert default == FlowMatching(sampling="uniform", shift=None, timestep_scale=1.0)
    chosen = flux_cfg(tmp_path, tmp_path, **{"train.timestep_sampling": "logit-normal", "train.shift": 3.0})
    assert FLUX1.training_objective(None, chosen.train) == FlowMatching(
        sampling="logit_normal", shift=3.0, timestep_scale=1.0
    )


def test_flux_shift_is_sigmoid_then_the_resolution_shift_of_the_models_own_scheduler(tmp_path: Path):
    """sd-scripts' flux_shift: sigmoid sigmas moved by mu of the image's token count, with the base model's
    scheduler settings (FLUX.1-dev's: 0.5 at 256 tokens to 1.15 at 4096), as FlowMatchEulerDiscreteScheduler
    shifts at inference; a fixed --shift beside it is one line."""
    from sdlora.train.flow_matching import time_shift_exponential

    pipe = FLUX1.build_tiny()
    cfg = flux_cfg(tmp_path, tmp_path, **{"train.timestep_sampling": "flux-shift"})
    objective = FLUX1.training_objective(pipe, cfg.train)
    assert objective.sampling == "sigmoid" and objective.shift is None
    # 1024 px: 128 x 128 latents, 64 x 64 = 4096 tokens: mu is max_shift
    assert objective.resolution_shift.mu(objective.resolution_shift.seq_len((16, 128, 128))) == pytest.approx(1.15)
    assert objective.resolution_shift.mu(256) == pytest.approx(0.5)
    drawn = objective.sample_timesteps(torch.Generator().manual_seed(0), 64, (16, 128, 128))
    plain = torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(drawn, time_shift_exponential(plain, 1.15), rtol=1e-5, atol=1e-6)
    assert drawn.mean() > plain.mean()  # towards noise at a large size
    both = flux_cfg(tmp_path, tmp_path, **{"train.timestep_sampling": "flux-shift", "train.shift": 3.0})
    with pytest.raises(ConfigError, match="exclude each other"):
        FLUX1.training_objective(pipe, both.train)


def test_golden_loss_default_targets_and_the_diffusers_file_loads_back(tmp_path: Path, tiny_dataset: Path):
    """Step losses as recorded; the LoRA on the attention projections of both streams; the diffusers file
    (transformer. keys, no kohya file yet) makes a fresh tiny-flux predict what the trained transformer does."""
    state = loop.setup(flux_cfg(tmp_path, tiny_dataset, **{"run.name": "f"}))
    try:
        result = loop.train(state)
        run = result.run_dir
        losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-4)

        saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        assert saved["lora"]["target_modules"] == list(ATTENTION) and saved["embedding"]["train"] is False
        assert saved["validation"]["guidance"] == FLUX1.sample_guidance
        wrapped = {name.rsplit(".", 1)[-1] for name, m in state.unet.named_modules() if hasattr(m, "lora_A")}
        assert {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "to_q", "to_out"} <= wrapped | {"to_out"}

        assert sorted(p.name for p in (run / "lora").iterdir()) == sorted([DIFFUSERS_LORA, "f.safetensors"])
        tensors = load_file(run / "lora" / DIFFUSERS_LORA)
        assert tensors and all(key.startswith("transformer.") for key in tensors)
        kohya = load_file(run / "lora" / "f.safetensors")  # sd-scripts' layout: q, k, v fused
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
        assert "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight" in kohya
        assert all(key.startswith("lora_unet_") for key in kohya)
        header = read_metadata(run / "lora" / "f.safetensors")
        assert (header["ss_network_module"], header["ss_base_model_version"]) == ("networks.lora_flux", "flux1")
        assert header["modelspec.architecture"] == "flux-1-dev/lora"  # tiny-flux has [dev]'s guidance embedding

        g = torch.Generator().manual_seed(1)
        noisy, embeds, pooled = (
            torch.randn(1, 16, 8, 8, generator=g),
            torch.randn(1, 7, 32, generator=g),
            torch.randn(1, 32, generator=g),
        )
        sigma = torch.tensor([0.6])

        def predict(transformer):
            with torch.no_grad():
                return FLUX1.denoise(transformer, noisy, sigma, embeds, pooled, None)

        state.unet.eval()
        trained = predict(state.unet)
        # The diffusers file, loaded by diffusers into a fresh tiny-flux, predicts what the trained transformer does.
        pipe, _ = load_pipeline("tiny-flux")
        base = predict(pipe.transformer)
        pipe.load_lora_weights(run / "lora")
        assert torch.allclose(predict(pipe.transformer), trained, atol=1e-5)
        assert not torch.allclose(base, trained, atol=1e-4)  # the LoRA changed the prediction
        # The kohya file makes the same weight deltas, module by module (diffusers' kohya FLUX reader assumes
        # FLUX.1's full widths, so tests/test_flux_keys.py loads such files at full size, on the meta device).
        back, alphas = kohya_flux_to_peft(kohya)
        scale = float(saved["lora"]["alpha"]) / float(saved["lora"]["rank"])
        paths = {key[len("transformer.") : -len(".lora_A.weight")] for key in tensors if key.endswith(".lora_A.weight")}
        assert paths == {key[: -len(".lora_A.weight")] for key in back if key.endswith(".lora_A.weight")}
        for path in paths:
            a, b = tensors[f"transformer.{path}.lora_A.weight"], tensors[f"transformer.{path}.lora_B.weight"]
            ka, kb = back[f"{path}.lora_A.weight"], back[f"{path}.lora_B.weight"]
            torch.testing.assert_close(kb @ ka * (alphas[path] / ka.shape[0]), b @ a * scale, atol=1e-6, rtol=1e-5)
    finally:
        loop.cleanup(state)


def test_resume_gives_the_same_lora_as_an_uninterrupted_run(tmp_path: Path, tiny_dataset: Path):
    flags = {
        "train.max_steps": 4,
        "train.lr_scheduler": "cosine",
        "train.timestep_sampling": "sigmoid",
        "train.shift": 3.0,
    }
    straight = loop.run_training(flux_cfg(tmp_path, tiny_dataset, **flags, **{"run.name": "straight"}))
    resumed, _, _ = stopped_and_resumed(flux_cfg(tmp_path, tiny_dataset, **flags, **{"run.name": "halves"}), 2)
    assert resumed.steps == 4
    assert_same_lora(straight, resumed)


def test_train_then_sample_through_the_cli(tmp_path: Path, tiny_dataset: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            "tiny-flux",
            "--dataset",
            str(tiny_dataset),
            "--max-steps",
            "2",
            "--mixed-precision",
            "no",
        ],
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "latest"
    result = runner.invoke(app, ["sample", "sksToy on a beach", "--run", str(run), "-n", "1", "--steps", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads((run / "samples" / "samples.json").read_text())
    assert sorted(e["variant"] for e in data["images"]) == ["baseline", "lora"]
    assert data["guidance"] == FLUX1.sample_guidance  # FLUX.1 [dev]'s default, not SD's 7.5
    assert all((run / "samples" / e["file"]).is_file() for e in data["images"])
    refused = runner.invoke(app, ["sample", "sksToy", "--run", str(run), "-n", "1", "--negative-prompt", "blurry"])
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.exit_code == 1 and len(errors) == 1 and "--negative-prompt" in errors[0], refused.stderr
    # ... known from the LoRA's header (sdlora.architecture), before minutes of loading a real FLUX.1
    from sdlora.generate import samples
    from sdlora.run import load_run

    monkeypatch.setattr(samples, "prepare_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ConfigError, match="--negative-prompt"):
        samples.generate_samples(load_run(run.resolve()), ["sksToy"], num_images=1, negative_prompt="blurry")


@pytest.mark.parametrize(
    ("model", "flags", "fragment"),
    [
        ("tiny-flux", ["--snr-gamma", "5"], "--snr-gamma"),
        ("tiny-flux", ["--resolution", "72"], "trained at 72x72 px; FLUX.1 takes sides that are multiples of 16"),
        ("tiny-zimage", ["--resolution", "40"], "trained at 40x40 px; Z-Image takes sides that are multiples of 16"),
        ("tiny-sd", ["--timestep-sampling", "sigmoid"], "--timestep-sampling"),
        ("tiny-sd", ["--shift", "3"], "--shift"),
    ],
)
def test_what_a_family_cannot_train_is_refused_in_one_line(tmp_path, tiny_dataset, model, flags, fragment):
    result = runner.invoke(
        app,
        ["train", "--model", model, "--dataset", str(tiny_dataset), "--runs-dir", str(tmp_path / "runs")]
        + ["--max-steps", "1", "--validate-every", "0", *flags],  # one quick step where a refusal were missing
    )
    one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_sampling_kwargs_keep_sd_as_it_was_and_refuse_a_negative_prompt_for_flux():
    assert SD1.sampling_kwargs(7.5, ["blurry"]) == {"guidance_scale": 7.5, "negative_prompt": ["blurry"]}
    assert FLUX1.sampling_kwargs(3.5, None) == {"guidance_scale": 3.5}
    with pytest.raises(ConfigError, match="negative prompt"):
        FLUX1.sampling_kwargs(3.5, ["blurry"])


def test_a_short_t5_window_is_what_sampling_encodes_too():
    """A T5 tokenizer of fewer than 512 positions (world-flux's: 32): training pads captions to its window
    (`tokenize`), and the pipeline, told `prompt_kwargs`, encodes a prompt to the same states; untold,
    FluxPipeline pads to 512, states the transformer never saw in training."""
    from sdlora.models.tiny import t5_tokenizer

    pipe, arch = load_pipeline("tiny-flux", dtype=torch.float32)
    pipe.tokenizer_2 = t5_tokenizer(model_max_length=16)
    prompt = "a photo of sks toy"
    trained, _ = arch.encode_tokens([pipe.text_encoder, pipe.text_encoder_2], arch.tokenize(pipe, [prompt]))
    assert arch.prompt_kwargs(pipe) == {"max_sequence_length": 16}
    sampled, _, _ = pipe.encode_prompt(prompt, prompt_2=None, **arch.prompt_kwargs(pipe))
    assert sampled.shape == trained.shape == (1, 16, 32) and torch.allclose(sampled, trained, atol=1e-5)
    assert pipe.encode_prompt(prompt, prompt_2=None)[0].shape[1] == 512  # the pipeline's own default


def test_the_kohya_file_is_written_for_a_lora_only():
    """LoKr / LoHa have no fused FLUX layout, and DoRA's magnitude of a fused module would need the untrained
    parts' weights: those runs write the diffusers / peft file alone."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    assert FLUX1.writes_kohya(LoraConfig(r=4, target_modules=["to_q"]))
    assert not FLUX1.writes_kohya(LoraConfig(r=4, target_modules=["to_q"], use_dora=True))
    assert not FLUX1.writes_kohya(LoKrConfig(r=4, target_modules=["to_q"]))
    assert not FLUX1.writes_kohya(LoHaConfig(r=4, target_modules=["to_q"]))
    assert SD1.writes_kohya(LoKrConfig(r=4, target_modules=["to_q"]))  # the UNets' LyCORIS layout


def test_modelspec_names_dev_or_schnell_from_the_transformer_config():
    """sd-scripts' sai_model_spec.py: flux-1-dev for [dev], flux-1-schnell for [schnell] (no guidance embedding)."""
    from peft import LoraConfig

    from sdlora.train.export import kohya_metadata

    lora = LoraConfig(r=4, lora_alpha=4)
    dev = kohya_metadata(FLUX1, lora, {}, "t", denoiser_config={"guidance_embeds": True})
    schnell = kohya_metadata(FLUX1, lora, {}, "t", denoiser_config={"guidance_embeds": False})
    assert dev["modelspec.architecture"] == "flux-1-dev/lora"
    assert schnell["modelspec.architecture"] == "flux-1-schnell/lora"
    assert SD1.modelspec_arch({"guidance_embeds": False}) == "stable-diffusion-v1/lora"  # one name for SD 1.x


def test_captions_are_measured_against_t5s_window_not_clips(tmp_path: Path, tiny_dataset: Path):
    """FLUX.1's transformer reads the caption through T5 (512 tokens): a caption whose token lies past CLIP's 77
    trains (as FluxPipeline, CLIP-L only gives its pooled summary of the first 77), one past T5's window fails
    naming the line and T5's window."""
    from sdlora.data.captions import parse_captions, write_captions
    from sdlora.errors import DataError
    from sdlora.train.data import check_caption_lengths, load_examples

    captions = tiny_dataset / "captions.txt"
    lines = parse_captions(captions)

    def examples_with(filler: str):
        long = {line.file: f"{filler} a photo of sksToy toy" for line in lines}
        write_captions(captions, long)
        from sdlora.data.manifest import load_manifest

        return load_examples(tiny_dataset, load_manifest(tiny_dataset), "train", 64, "sksToy")

    pipe, arch = load_pipeline("tiny-flux")
    cfg = flux_cfg(tmp_path, tiny_dataset, **{"data.token": "sksToy"})
    warnings = []
    check_caption_lengths(cfg, pipe, arch, examples_with(" ".join(["red"] * 100)), warnings.append)  # past CLIP's 75
    assert warnings == []
    with pytest.raises(DataError, match=r"captions.txt:\d+ .*T5 tokens and the text encoder reads 511"):
        check_caption_lengths(cfg, pipe, arch, examples_with("x" * 600), warnings.append)  # a T5 token per x
    # `sdlora sample`'s prompts likewise.
    from sdlora.generate.samples import prompt_too_long

    assert prompt_too_long(pipe, arch, f"{' '.join(['red'] * 100)} sksToy toy", "sksToy") is None
    assert " T5 tokens; only the first 511 are used" in prompt_too_long(pipe, arch, "x" * 600 + " sksToy", "sksToy")
