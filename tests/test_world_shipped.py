"""The world's shipped models: `--model world-sd` / `world-sdxl` / `world-flux`, `--clip-model world-clip`, `--dino-model
world-dino` load from the package's own folders, offline, through the real loaders."""

from __future__ import annotations

import json

import pytest

from sdlora.errors import ModelError
from sdlora.models.loading import default_resolution, load_pipeline
from sdlora.world import shipped


def test_world_sd_loads_as_an_sd1_pipeline_made_for_32_px():
    pipe, family = load_pipeline(shipped.BASE)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and family.name == "sd1"
    # 16x16 latents, a VAE that halves each side: what world-sd was trained on
    assert default_resolution(shipped.BASE, family) == 32
    config = json.loads((shipped.shipped_folder(shipped.BASE) / "unet" / "config.json").read_text())
    assert config["sample_size"] == 16


def test_world_sdxl_loads_as_an_sdxl_pipeline_whose_pooled_text_is_world_clips():
    """world-sdxl's second text encoder is the world CLIP's text tower with its projection: its pooled text
    is the scorer's own text embedding, as SDXL's is OpenCLIP bigG's."""
    import torch

    from sdlora.evaluate.clip import load_clip

    pipe, family = load_pipeline(shipped.BASE_XL, dtype=torch.float32)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and family.name == "sdxl"
    assert default_resolution(shipped.BASE_XL, family) == 32
    prompt = "a photo of a red toy on the beach"
    ids = pipe.tokenizer_2([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = pipe.text_encoder_2(ids).text_embeds.float()
    scorer = torch.nn.functional.normalize(load_clip(shipped.CLIP, None).embed_text([prompt]).float(), dim=-1)
    assert torch.nn.functional.cosine_similarity(pooled, scorer).item() > 0.999


def test_world_flux_loads_as_flux_dev_made_for_32_px():
    """world-flux is FLUX.1 [dev]'s architecture (the guidance embedding: 28 sampling steps), its CLIP-L world-sd's
    text encoder, its T5 tokenizer the world's words whole; sdlora reads its 32 px from its VAE."""
    import torch

    pipe, family = load_pipeline(shipped.BASE_FLUX, dtype=torch.float32)
    assert type(pipe).__name__ == "FluxPipeline" and family.name == "flux1"
    assert default_resolution(shipped.BASE_FLUX, family) == 32
    assert pipe.transformer.config.guidance_embeds and family.sample_steps(pipe) == 28
    sd, _ = load_pipeline(shipped.BASE, dtype=torch.float32)
    for name, weight in sd.text_encoder.state_dict().items():
        assert torch.equal(weight, pipe.text_encoder.state_dict()[name]), name
    tokens = pipe.tokenizer_2.tokenize("a photo of a red toy on the beach")
    assert tokens == ["\u2581" + word for word in "a photo of a red toy on the beach".split()]


def test_world_scorers_load_by_name():
    from sdlora.evaluate.clip import load_clip
    from sdlora.evaluate.dino import load_dino

    clip = load_clip(shipped.CLIP, "openai")  # score's default --clip-pretrained is ignored for a folder
    dino = load_dino(shipped.DINO)
    assert (clip.model_name, clip.pretrained, dino.model_id) == ("world-clip", None, "world-dino")
    assert clip.revision.startswith("local-") and dino.revision.startswith("local-")


def test_a_missing_world_model_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(shipped, "WEIGHTS", tmp_path)
    with pytest.raises(ModelError, match=r"world-sd: not installed with this copy of sdlora .*world build"):
        load_pipeline(shipped.BASE)


def test_other_names_are_not_world_models():
    assert shipped.shipped_folder("tiny-sd") is None
    assert shipped.shipped_folder("stable-diffusion-v1-5/stable-diffusion-v1-5") is None
