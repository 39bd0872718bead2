"""Tiny models, architecture detection, and loading errors."""

from __future__ import annotations

import json

import pytest
import torch

from sdlora.errors import ModelError
from sdlora.models import detect_family, load_pipeline
from sdlora.models.loading import default_resolution
from sdlora.models.tiny import clip_tokenizer


def test_clip_tokenizer_matches_the_real_vocabulary():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    ids = tok("a photo of a toy").input_ids
    # Token ids of OpenAI CLIP: <|startoftext|> a photo of a toy <|endoftext|>
    assert ids == [49406, 320, 1125, 539, 320, 5988, 49407]


@pytest.mark.parametrize("model,arch_name,width", [("tiny-sd", "sd1", 32), ("tiny-sdxl", "sdxl", 64)])
def test_tiny_models_build_and_encode(model, arch_name, width):
    pipe, arch = load_pipeline(model)
    assert arch.name == arch_name
    assert default_resolution(model, arch) == 64
    embeds, pooled = arch.encode_prompts(pipe, ["a photo of sksToy toy", "a dog"])
    assert embeds.shape == (2, 77, width)
    assert (pooled is not None) == arch.uses_pooled


def test_tiny_models_are_identical_in_every_process():
    a, _ = load_pipeline("tiny-sd")
    torch.manual_seed(123)  # the global seed must not matter
    b, _ = load_pipeline("tiny-sd")
    for (name, p), (_, q) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert torch.equal(p, q), name


def test_tiny_sdxl_unet_accepts_the_arch_conditioning():
    pipe, arch = load_pipeline("tiny-sdxl")
    embeds, pooled = arch.encode_prompts(pipe, ["a toy"])
    time_ids = arch.time_ids((64, 64), (0, 0), (64, 64))[None]
    latents = torch.randn(1, 4, 32, 32)
    out = pipe.unet(latents, torch.tensor([10]), embeds, **arch.unet_kwargs(pooled, time_ids)).sample
    assert out.shape == latents.shape


def test_detect_architecture_from_config_not_name():
    assert detect_family(unet_config={"addition_embed_type": "text_time", "cross_attention_dim": 2048}).name == "sdxl"
    assert detect_family(unet_config={"cross_attention_dim": 768}).name == "sd1"
    with pytest.raises(ValueError):
        detect_family(unet_config={})


def test_uncached_hub_model_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local cache and downloads are off") as info:
        load_pipeline("nobody/no-such-model-xyz")
    assert "\n" not in str(info.value) and "--model tiny-sd" in str(info.value)


def test_local_folder_without_model_index(tmp_path):
    with pytest.raises(ModelError, match="no model_index.json"):
        load_pipeline(str(tmp_path))


def test_local_diffusers_folder_loads(tmp_path):
    pipe, _ = load_pipeline("tiny-sd")
    pipe.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    loaded, arch = load_pipeline(str(tmp_path / "m"))
    assert arch.name == "sd1"
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_a_folder_loads_with_the_current_dtype_argument(tmp_path):
    """diffusers 0.42 deprecates `torch_dtype=` with a FutureWarning; sdlora passes `dtype=` where it is taken."""
    import warnings

    from sdlora.models.loading import load_base_vae

    pipe, _ = load_pipeline("tiny-sd")
    pipe.save_pretrained(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        loaded, _ = load_pipeline(str(tmp_path / "m"), dtype=torch.bfloat16)
        vae = load_base_vae(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert loaded.unet.dtype == torch.bfloat16 and vae.dtype == torch.bfloat16


def test_weights_fingerprint_changes_with_a_hub_models_cached_commit(tmp_path, monkeypatch):
    """The caches' key for a hub id: the commit of its cached snapshot, so a newer download of `main` is a new
    key; None for a tiny model and for an id that is not cached."""
    import huggingface_hub.constants

    from sdlora.models.loading import weights_fingerprint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--model"

    def cache(commit: str) -> None:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "model_index.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    assert weights_fingerprint("org/model") is None
    cache("a" * 40)
    assert weights_fingerprint("org/model") == "a" * 40
    cache("b" * 40)  # the hub's main moved on and was downloaded again
    assert weights_fingerprint("org/model") == "b" * 40
    assert weights_fingerprint("org/model", revision="a" * 40) == "a" * 40
    assert weights_fingerprint("tiny-sd") is None
