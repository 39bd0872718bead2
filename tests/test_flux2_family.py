"""The FLUX.2 [klein] family (models/families/flux2.py) on tiny-flux2-klein: detected from model_index.json,
prompts and latents as Flux2KleinPipeline makes them, a golden first loss, the default LoRA targets, the
diffusers and ComfyUI files loading back into a fresh Flux2KleinPipeline with the trained transformer's
output, resume equal to straight-through, train -> sample through the CLI, and the one-line refusals of what
this version does not train."""

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
from sdlora.models.families import FLUX1, FLUX2_KLEIN, detect_family
from sdlora.models.families.flux2 import ATTENTION, latent_ids, pack, patchify, text_ids, unpack
from sdlora.run import DIFFUSERS_LORA
from sdlora.safetensors_io import read_metadata
from sdlora.train import loop
from sdlora.train.flow_matching import FlowMatching

# The first two losses of tiny-flux2-klein on the 6-image fixture dataset, seed 0, lr 1e-3, fp32.
GOLDEN_LOSSES = [1.4608235359191895, 1.4715651273727417]

runner = CliRunner()
PROMPT = "a photo of sks toy"


def klein_cfg(tmp_path: Path, dataset: Path, **flags):
    base = {
        "model.name": "tiny-flux2-klein",
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
def tiny():
    return load_pipeline("tiny-flux2-klein")[0]


def test_klein_is_detected_from_model_index_and_transformer_config(tmp_path: Path, tiny):
    assert detect_family({"_class_name": "Flux2KleinPipeline"}) is FLUX2_KLEIN
    assert families.tiny_family("tiny-flux2-klein") is FLUX2_KLEIN
    assert families.family_named("flux2-klein") is FLUX2_KLEIN
    folder = tmp_path / "my-flux1-finetune"  # the class in model_index.json decides, not the folder's name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    from sdlora.models.loading import _family

    assert _family(str(folder), None) is FLUX2_KLEIN
    assert type(tiny).__name__ == "Flux2KleinPipeline" and families.family_of_pipeline(tiny) is FLUX2_KLEIN
    # The transformer configs: [klein]'s (no guidance embedding), not FLUX.2 [dev]'s, not FLUX.1's.
    klein = dict(tiny.transformer.config)
    assert FLUX2_KLEIN.matches_unet(klein)
    assert not FLUX2_KLEIN.matches_unet({**klein, "guidance_embeds": True})
    assert not FLUX2_KLEIN.matches_unet({"axes_dims_rope": [16, 56, 56], "joint_attention_dim": 4096})
    assert FLUX1 is not FLUX2_KLEIN


def test_prompts_and_latents_are_what_the_pipeline_makes(tiny):
    """The prompt embedding is `_get_qwen3_prompt_embeds`' (chat template, padding, attention mask, layers
    9, 18, 27 stacked); latents are patchified and batch-norm normalised as `_encode_vae_image` does; tokens
    and position ids are the pipeline's."""
    from diffusers import Flux2KleinPipeline

    embeds, pooled = FLUX2_KLEIN.encode_prompts(tiny, [PROMPT, "sksToy"])
    with torch.no_grad():
        expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(tiny.text_encoder, tiny.tokenizer, [PROMPT, "sksToy"])
    assert pooled is None and embeds.shape == expected.shape == (2, 512, 48)
    torch.testing.assert_close(embeds, expected, atol=0, rtol=0)

    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        mean = tiny.vae.encode(pixels).latent_dist.mean
        ours = FLUX2_KLEIN.scale_latents(tiny.vae, mean)
        theirs = tiny._encode_vae_image(pixels, generator=None)  # argmax: the posterior's mode, its mean
    assert ours.shape == (1, 32, 16, 16)
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, patchify(mean))  # the batch-norm statistics are not 0 and 1 in the tiny

    latents = torch.randn(2, 32, 3, 5, generator=gen)
    ids = Flux2KleinPipeline._prepare_latent_ids(latents)
    assert torch.equal(pack(latents), Flux2KleinPipeline._pack_latents(latents))
    assert torch.equal(latent_ids(3, 5, "cpu"), ids[0])
    assert torch.equal(unpack(pack(latents), 3, 5), Flux2KleinPipeline._unpack_latents_with_ids(pack(latents), ids))
    assert torch.equal(text_ids(7, "cpu"), Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, 7, 48))[0])
    raw = torch.randn(2, 8, 6, 4, generator=gen)
    assert torch.equal(patchify(raw), Flux2KleinPipeline._patchify_latents(raw))


def test_the_objective_is_flow_matching_with_sigma_as_the_timestep_and_the_options_reach_it(tmp_path: Path):
    default = FLUX2_KLEIN.training_objective(None, klein_cfg(tmp_path, tmp_path).train)
    assert default == FlowMatching(sampling="uniform", shift=None, timestep_scale=1.0)
    chosen = klein_cfg(tmp_path, tmp_path, **{"train.timestep_sampling": "logit-normal", "train.shift": 3.0})
    assert FLUX2_KLEIN.training_objective(None, chosen.train) == FlowMatching(
        sampling="logit_normal", shift=3.0, timestep_scale=1.0
    )


def test_golden_loss_default_targets_and_both_files_load_back(tmp_path: Path, tiny_dataset: Path):
    """Step losses as recorded; the LoRA on the attention projections; the diffusers file and the ComfyUI file
    (BFL names, q, k, v fused), each loaded by diffusers into a fresh tiny-flux2-klein, predict what the trained
    transformer does."""
    state = loop.setup(klein_cfg(tmp_path, tiny_dataset, **{"run.name": "k"}))
    try:
        result = loop.train(state)
        run = result.run_dir
        losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-4)

        saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        assert saved["lora"]["target_modules"] == list(ATTENTION) and saved["embedding"]["train"] is False
        assert saved["validation"]["guidance"] == FLUX2_KLEIN.sample_guidance
        wrapped = {name for name, m in state.unet.named_modules() if hasattr(m, "lora_A")}
        assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in wrapped
        assert {p.rsplit(".", 1)[-1] for p in wrapped} >= {"to_q", "add_k_proj", "to_add_out", "0"}

        assert sorted(p.name for p in (run / "lora").iterdir()) == sorted([DIFFUSERS_LORA, "k.safetensors"])
        tensors = load_file(run / "lora" / DIFFUSERS_LORA)
        assert tensors and all(key.startswith("transformer.") for key in tensors)
        kohya = load_file(run / "lora" / "k.safetensors")
        assert {k.rsplit(".", 2)[0] for k in kohya if k.endswith(".lora_down.weight")} == {
            "lora_unet_double_blocks_0_img_attn_qkv",
            "lora_unet_double_blocks_0_img_attn_proj",
            "lora_unet_double_blocks_0_txt_attn_qkv",
            "lora_unet_double_blocks_0_txt_attn_proj",
            "lora_unet_single_blocks_0_linear1",
        }
        header = read_metadata(run / "lora" / "k.safetensors")
        assert (header["ss_network_module"], header["ss_base_model_version"]) == (
            "networks.lora_flux_2",
            "flux_2_klein_4b",
        )

        g = torch.Generator().manual_seed(1)
        noisy, embeds = torch.randn(1, 32, 4, 4, generator=g), torch.randn(1, 9, 48, generator=g)
        sigma = torch.tensor([0.6])

        def predict(transformer):
            with torch.no_grad():
                return FLUX2_KLEIN.denoise(transformer, noisy, sigma, embeds, None, None)

        state.unet.eval()
        trained = predict(state.unet)
        for lora_file in (run / "lora", run / "lora" / "k.safetensors"):
            pipe, _ = load_pipeline("tiny-flux2-klein")
            base = predict(pipe.transformer)
            pipe.load_lora_weights(lora_file)
            torch.testing.assert_close(predict(pipe.transformer), trained, atol=1e-5, rtol=1e-4)
            assert not torch.allclose(base, trained, atol=1e-4)  # the LoRA changed the prediction
    finally:
        loop.cleanup(state)


@pytest.mark.slow
def test_resume_gives_the_same_lora_as_an_uninterrupted_run(tmp_path: Path, tiny_dataset: Path):
    flags = {
        "train.max_steps": 4,
        "train.lr_scheduler": "cosine",
        "train.timestep_sampling": "sigmoid",
        "train.shift": 3.0,
    }
    straight = loop.run_training(klein_cfg(tmp_path, tiny_dataset, **flags, **{"run.name": "straight"}))
    resumed, _, _ = stopped_and_resumed(klein_cfg(tmp_path, tiny_dataset, **flags, **{"run.name": "halves"}), 2)
    assert resumed.steps == 4
    assert_same_lora(straight, resumed)


@pytest.mark.slow  # about 8 s after the others, 25 s alone (first pipeline calls)
def test_train_with_validation_samples_then_sample_through_the_cli(tmp_path: Path, tiny_dataset: Path, monkeypatch):
    """Validation samples from cached embeddings (the empty prompt's as the CFG negative); `sdlora sample`
    encodes its prompt through the pipeline: both paths through Flux2KleinPipeline."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        ["train", "--model", "tiny-flux2-klein", "--dataset", str(tiny_dataset), "--max-steps", "2"]
        + ["--mixed-precision", "no", "--validate-every", "2", "validation.steps=2", "validation.num_images=1"],
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "latest"
    assert list((run / "samples").glob("step-*/*.png"))
    result = runner.invoke(app, ["sample", "sksToy on a beach", "--run", str(run), "-n", "1", "--steps", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads((run / "samples" / "samples.json").read_text())
    assert sorted(e["variant"] for e in data["images"]) == ["baseline", "lora"]
    assert data["guidance"] == FLUX2_KLEIN.sample_guidance
    assert all((run / "samples" / e["file"]).is_file() for e in data["images"])
    refused = runner.invoke(app, ["sample", "sksToy", "--run", str(run), "-n", "1", "--negative-prompt", "blurry"])
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.exit_code == 1 and len(errors) == 1 and "--negative-prompt" in errors[0], refused.stderr


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--train-text-encoder"], "--train-text-encoder"),
        (["--train-token-embedding"], "--train-token-embedding"),
        (["--snr-gamma", "5"], "--snr-gamma"),
        (["--resolution", "72"], "trained at 72x72 px; FLUX.2 [klein] takes sides that are multiples of 16"),
    ],
)
def test_what_klein_cannot_train_is_refused_in_one_line(tmp_path, tiny_dataset, flags, fragment):
    result = runner.invoke(
        app,
        ["train", "--model", "tiny-flux2-klein", "--dataset", str(tiny_dataset), "--runs-dir", str(tmp_path / "runs")]
        + ["--max-steps", "1", "--validate-every", "0", *flags],
    )
    one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_sampling_kwargs_take_the_cfg_scale_and_refuse_a_negative_prompt():
    assert FLUX2_KLEIN.sampling_kwargs(4.0, None) == {"guidance_scale": 4.0}
    with pytest.raises(ConfigError, match="negative prompt"):
        FLUX2_KLEIN.sampling_kwargs(4.0, ["blurry"])


def test_the_kohya_file_is_written_for_a_lora_only():
    from peft import LoHaConfig, LoraConfig

    assert FLUX2_KLEIN.writes_kohya(LoraConfig(r=4, target_modules=["to_q"]))
    assert not FLUX2_KLEIN.writes_kohya(LoraConfig(r=4, target_modules=["to_q"], use_dora=True))
    assert not FLUX2_KLEIN.writes_kohya(LoHaConfig(r=4, target_modules=["to_q"]))


def test_the_vae_reloads_as_the_class_the_folder_names(tmp_path: Path, tiny):
    """Validation reloads a released VAE from the model's files (models/loading.py `load_base_vae`): FLUX.2's
    is an AutoencoderKLFlux2 with its batch-norm statistics, not an AutoencoderKL."""
    from sdlora.models.loading import load_base_vae

    tiny.vae.save_pretrained(tmp_path / "m" / "vae")
    vae = load_base_vae(str(tmp_path / "m"), dtype=torch.float32)
    assert type(vae).__name__ == "AutoencoderKLFlux2"
    assert torch.equal(vae.bn.running_var, tiny.vae.bn.running_var)


def test_prior_preservation_generates_class_images_with_klein(tmp_path: Path, tiny):
    """train/prior.py names `prompt=`: Flux2KleinPipeline's first argument is the reference image."""
    from PIL import Image

    from sdlora.train.prior import ensure_class_images

    common = dict(class_prompt="a photo of a toy", folder=tmp_path, resolution=64, seed=0, device="cpu")
    paths = ensure_class_images(tiny, FLUX2_KLEIN, num_images=1, num_inference_steps=1, **common)
    assert len(paths) == 1 and Image.open(paths[0]).size == (64, 64)


def test_samples_from_cached_embeddings_are_the_pipelines_own(tiny):
    """Validation samples from the cached embeddings (the text encoder is gone by then), the empty prompt's as
    the CFG negative, are the images Flux2KleinPipeline makes from the prompt itself (guidance 4: CFG on)."""
    import numpy as np

    tiny.set_progress_bar_config(disable=True)
    with torch.no_grad():
        embeds, _ = FLUX2_KLEIN.encode_prompts(tiny, [PROMPT])
        empty, _ = FLUX2_KLEIN.encode_prompts(tiny, [""])
    kwargs = FLUX2_KLEIN.prompt_embeds_kwargs(tiny, (embeds[0], None), (empty[0], None), "cpu")

    def render(**kwargs) -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        out = tiny(num_inference_steps=2, height=64, width=64, output_type="np", generator=generator, **kwargs)
        return out.images[0]

    np.testing.assert_allclose(
        render(guidance_scale=4.0, **kwargs), render(guidance_scale=4.0, prompt=PROMPT), atol=1e-5
    )
