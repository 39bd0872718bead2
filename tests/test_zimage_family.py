"""The Z-Image family (models/families/zimage.py) on tiny-zimage: detected from model_index.json and the transformer
config, the cached prompt embedding and the denoiser call agreeing with what ZImagePipeline feeds its transformer,
the objective and its options, a golden first loss, the default LoRA targets, the diffusers file loading back into a
fresh ZImagePipeline with the trained transformer's output, resume equal to straight-through, train -> sample
through the CLI, and the one-line refusals of what this version does not train."""

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
from sdlora.models.families import FLUX1, ZIMAGE, detect_family
from sdlora.models.families.zimage import ATTENTION, WINDOW, unpad
from sdlora.run import DIFFUSERS_LORA
from sdlora.safetensors_io import read_metadata
from sdlora.train import loop
from sdlora.train.flow_matching import FlowMatching

# The first two losses of tiny-zimage on the 6-image fixture dataset, seed 0, lr 1e-3, fp32.
GOLDEN_LOSSES = [1.3511459827423096, 1.338628888130188]

runner = CliRunner()


def zimage_cfg(tmp_path: Path, dataset: Path, **flags):
    base = {
        "model.name": "tiny-zimage",
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


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny-zimage")[0]


def test_zimage_is_detected_from_model_index_and_transformer_config(tmp_path: Path, pipe):
    assert detect_family({"_class_name": "ZImagePipeline"}) is ZIMAGE
    turbo = {"all_patch_size": [2], "all_f_patch_size": [1], "cap_feat_dim": 2560, "dim": 3840, "n_layers": 30}
    assert detect_family({}, unet_config=turbo) is ZIMAGE
    lumina2 = {"patch_size": 2, "cap_feat_dim": 2304, "hidden_size": 2304}  # Lumina2Transformer2DModel's
    assert not ZIMAGE.matches_unet(lumina2) and not FLUX1.matches_unet(turbo)
    assert families.tiny_family("tiny-zimage") is ZIMAGE and families.family_named("zimage") is ZIMAGE
    folder = tmp_path / "my-flux-finetune"  # the folder's name says nothing
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    from sdlora.models.loading import _family

    assert _family(str(folder), None) is ZIMAGE
    assert type(pipe).__name__ == "ZImagePipeline" and families.family_of_pipeline(pipe) is ZIMAGE


def test_the_cached_embedding_unpads_to_what_the_pipeline_encodes(pipe):
    """Two prompts of different lengths, encoded as the cache encodes them (one by one, padded to the window
    with the mask as the last channel), give back exactly ZImagePipeline.encode_prompt's list."""
    prompts = ["sksToy toy on a beach", "a photo of sksToy toy in a garden, at dusk, with long shadows"]
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False)
        cached = [ZIMAGE.encode_prompts(pipe, [p])[0][0] for p in prompts]
    for embeds, want in zip(cached, expected):
        assert embeds.shape == (WINDOW, 32 + 1)
        assert torch.equal(unpad(embeds), want)
        assert not embeds[embeds[:, -1] == 0].any()  # padding rows are zero, mask included
    assert expected[0].shape[0] < expected[1].shape[0]


def test_denoise_is_the_velocity_the_pipeline_steps_with_and_the_cached_path_samples_as_the_prompt(pipe):
    """One Euler step of ZImagePipeline from latents at sigma s lands on latents - s * velocity, where the velocity
    is `denoise`'s (1 - s as the transformer's timestep, its output negated); and sampling from the cached
    embeddings (`prompt_embeds_kwargs`) gives the image the prompt gives, with and without guidance."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 8, 8, generator=g)
    with torch.no_grad():
        embeds = ZIMAGE.encode_prompts(pipe, ["sksToy toy on a beach"])[0]
        empty = ZIMAGE.encode_prompts(pipe, [""])[0]
        out = pipe(
            prompt_embeds=[unpad(embeds[0])],
            latents=latents,
            sigmas=[0.6],
            guidance_scale=0.0,
            height=16,  # 8 x 8 latents: the tiny VAE halves, the pipeline's 2x2 patches need the factor 4
            width=16,
            output_type="latent",
        ).images
        sigma = pipe.scheduler.sigmas[0].item()  # 0.6 after the scheduler's static shift 3
        velocity = ZIMAGE.denoise(pipe.transformer, latents, torch.tensor([sigma]), embeds, None, None)
    assert sigma == pytest.approx(3 * 0.6 / (1 + 2 * 0.6))
    torch.testing.assert_close(out, latents - sigma * velocity, atol=1e-5, rtol=1e-5)

    # A batch of prompts of different lengths: each sample's velocity is the one it gets alone (the window's
    # padding reaches neither the transformer nor the other samples).
    with torch.no_grad():
        longer = ZIMAGE.encode_prompts(pipe, ["a photo of sksToy toy in a garden, at dusk, with long shadows"])[0]
        pair = ZIMAGE.denoise(
            pipe.transformer,
            latents.repeat(2, 1, 1, 1),
            torch.tensor([sigma, 0.3]),
            torch.cat([embeds, longer]),
            None,
            None,
        )
        alone = ZIMAGE.denoise(pipe.transformer, latents, torch.tensor([0.3]), longer, None, None)
    torch.testing.assert_close(pair, torch.cat([velocity, alone]), atol=1e-5, rtol=1e-5)

    kwargs = ZIMAGE.prompt_embeds_kwargs(pipe, (embeds[0], None), (empty[0], None), "cpu")
    for guidance in (0.0, 4.0):
        common = dict(num_inference_steps=2, guidance_scale=guidance, height=32, width=32, output_type="np")
        from_prompt = pipe("sksToy toy on a beach", generator=torch.Generator().manual_seed(3), **common).images
        from_cache = pipe(generator=torch.Generator().manual_seed(3), **kwargs, **common).images
        assert (from_prompt == from_cache).all(), guidance


def test_the_objective_is_flow_matching_shifted_as_the_scheduler_and_the_options_reach_it(tmp_path: Path, pipe):
    default = ZIMAGE.training_objective(pipe, zimage_cfg(tmp_path, tmp_path).train)
    assert default == FlowMatching(sampling="uniform", shift=3.0, timestep_scale=1.0)  # Z-Image-Turbo's shift
    chosen = zimage_cfg(tmp_path, tmp_path, **{"train.timestep_sampling": "logit-normal", "train.shift": 1.0})
    assert ZIMAGE.training_objective(pipe, chosen.train) == FlowMatching(
        sampling="logit_normal", shift=1.0, timestep_scale=1.0
    )
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = type("Pipe", (), {"scheduler": FlowMatchEulerDiscreteScheduler(shift=6.0)})()  # Z-Image (base)'s
    assert ZIMAGE.training_objective(base, zimage_cfg(tmp_path, tmp_path).train).shift == 6.0


def test_golden_loss_default_targets_and_the_diffusers_file_loads_back(tmp_path: Path, tiny_dataset: Path):
    """Step losses as recorded; the LoRA on the attention projections of every block; the diffusers file
    (transformer. keys) makes a fresh tiny-zimage predict what the trained transformer does; so does the ComfyUI
    file beside it (musubi-tuner's metadata names), loaded by diffusers."""
    state = loop.setup(zimage_cfg(tmp_path, tiny_dataset, **{"run.name": "z"}))
    try:
        result = loop.train(state)
        run = result.run_dir
        losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-4)

        saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        assert saved["lora"]["target_modules"] == list(ATTENTION) and saved["embedding"]["train"] is False
        assert saved["validation"]["guidance"] == ZIMAGE.sample_guidance == 0.0
        wrapped = {name.rsplit(".", 2)[0] for name, m in state.unet.named_modules() if hasattr(m, "lora_A")}
        assert {"layers.0.attention", "noise_refiner.0.attention", "context_refiner.0.attention"} <= wrapped

        assert sorted(p.name for p in (run / "lora").iterdir()) == sorted([DIFFUSERS_LORA, "z.safetensors"])
        tensors = load_file(run / "lora" / DIFFUSERS_LORA)
        assert tensors and all(key.startswith("transformer.") for key in tensors)
        comfy = load_file(run / "lora" / "z.safetensors")  # the original modules: q, k, v fused
        assert "lora_unet_layers_0_attention_qkv.lora_down.weight" in comfy
        assert "lora_unet_context_refiner_0_attention_out.lora_up.weight" in comfy
        header = read_metadata(run / "lora" / "z.safetensors")
        assert (header["ss_network_module"], header["ss_base_model_version"]) == ("networks.lora_zimage", "z_image")

        g = torch.Generator().manual_seed(1)
        noisy = torch.randn(1, 16, 8, 8, generator=g)
        embeds = torch.cat([torch.randn(1, 7, 32, generator=g), torch.ones(1, 7, 1)], dim=-1)
        sigma = torch.tensor([0.6])

        def predict(transformer):
            with torch.no_grad():
                return ZIMAGE.denoise(transformer, noisy, sigma, embeds, None, None)

        state.unet.eval()
        trained = predict(state.unet)
        pipe, _ = load_pipeline("tiny-zimage")
        base = predict(pipe.transformer)
        pipe.load_lora_weights(run / "lora")  # diffusers' ZImageLoraLoaderMixin
        assert torch.allclose(predict(pipe.transformer), trained, atol=1e-5)
        assert not torch.allclose(base, trained, atol=1e-4)  # the LoRA changed the prediction
        # diffusers reads the ComfyUI file as well (its fused qkv split back into q, k, v).
        pipe, _ = load_pipeline("tiny-zimage")
        pipe.load_lora_weights(run / "lora" / "z.safetensors")
        assert torch.allclose(predict(pipe.transformer), trained, atol=1e-5)
    finally:
        loop.cleanup(state)


@pytest.mark.slow
def test_resume_gives_the_same_lora_as_an_uninterrupted_run(tmp_path: Path, tiny_dataset: Path):
    flags = {"train.max_steps": 4, "train.lr_scheduler": "cosine", "train.timestep_sampling": "sigmoid"}
    straight = loop.run_training(zimage_cfg(tmp_path, tiny_dataset, **flags, **{"run.name": "straight"}))
    resumed, _, _ = stopped_and_resumed(zimage_cfg(tmp_path, tiny_dataset, **flags, **{"run.name": "halves"}), 2)
    assert resumed.steps == 4
    assert_same_lora(straight, resumed)


def test_train_then_sample_through_the_cli(tmp_path: Path, tiny_dataset: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        ["train", "--model", "tiny-zimage", "--dataset", str(tiny_dataset), "--max-steps", "2"]
        + ["--mixed-precision", "no"],
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "latest"
    # no --validation-steps, no --steps: Z-Image-Turbo's 8, recorded where the run's other resolved values are
    assert yaml.safe_load((run / "config.yaml").read_text())["validation"]["steps"] == 8
    assert json.loads((run / "samples" / "step-000002" / "validation.json").read_text())["steps"] == 8
    result = runner.invoke(app, ["sample", "sksToy on a beach", "--run", str(run), "-n", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads((run / "samples" / "samples.json").read_text())
    assert sorted(e["variant"] for e in data["images"]) == ["baseline", "lora"]
    assert data["guidance"] == 0.0 and data["steps"] == 8  # Z-Image-Turbo's, not SD's 7.5 and 30
    assert {e["steps"] for e in data["images"]} == {8}
    assert all((run / "samples" / e["file"]).is_file() for e in data["images"])
    refused = runner.invoke(app, ["sample", "sksToy", "--run", str(run), "-n", "1", "--negative-prompt", "blurry"])
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.exit_code == 1 and len(errors) == 1 and "--negative-prompt" in errors[0], refused.stderr


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--train-text-encoder"], "--train-text-encoder"),
        (["--train-token-embedding"], "--train-token-embedding"),
        (["--snr-gamma", "5"], "--snr-gamma"),
    ],
)
def test_what_zimage_cannot_train_is_refused_in_one_line(tmp_path, tiny_dataset, flags, fragment):
    result = runner.invoke(
        app,
        ["train", "--model", "tiny-zimage", "--dataset", str(tiny_dataset), "--runs-dir", str(tmp_path / "runs")]
        + ["--max-steps", "1", "--validate-every", "0", *flags],  # one quick step where a refusal were missing
    )
    one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_sampling_kwargs_guide_with_a_negative_prompt_only_above_guidance_0():
    assert ZIMAGE.sampling_kwargs(0.0, None) == {"guidance_scale": 0.0, "negative_prompt": None}
    assert ZIMAGE.sampling_kwargs(4.0, ["blurry"]) == {"guidance_scale": 4.0, "negative_prompt": ["blurry"]}
    with pytest.raises(ConfigError, match="--negative-prompt.*--guidance"):
        ZIMAGE.sampling_kwargs(0.0, ["blurry"])


def test_the_comfyui_file_is_written_for_a_lora_only():
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    assert ZIMAGE.writes_kohya(LoraConfig(r=4, target_modules=["to_q"]))
    assert not ZIMAGE.writes_kohya(LoraConfig(r=4, target_modules=["to_q"], use_dora=True))
    assert not ZIMAGE.writes_kohya(LoKrConfig(r=4, target_modules=["to_q"]))
    assert not ZIMAGE.writes_kohya(LoHaConfig(r=4, target_modules=["to_q"]))
