"""What `sdlora train` keeps in memory: the denoiser loads straight into its storage dtype, the encoders leave
before the UNet's steps, and a VAE released after encoding comes back for the validation samples alone, giving
the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.models.tiny import tiny_sd
from sdlora.train import loop, lora, resolve
from test_train import tiny_cfg


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """tiny-sd saved as a diffusers folder: a model whose VAE can be loaded again from its files."""
    folder = tmp_path_factory.mktemp("tiny-sd-folder")
    tiny_sd().save_pretrained(folder)
    return folder


def _samples(run_dir: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p), dtype=np.float32) for p in sorted(run_dir.glob("samples/step-*/*.png"))]


def test_encoders_leave_before_the_steps_and_the_vae_returns_for_samples(
    tmp_path: Path, tiny_dataset: Path, tiny_folder: Path
):
    flags = {"train.max_steps": 1, "validation.prompts": ["a photo of {token} {class}"], "embedding.train": False}
    runs = {}
    for name, model in (("folder", str(tiny_folder)), ("built", "tiny-sd")):
        cfg = tiny_cfg(tmp_path / name, tiny_dataset, {**flags, "model.name": model})
        state = loop.setup(cfg)
        try:
            if name == "folder":  # before the first step: no VAE, no text encoder left in the pipeline
                assert state.pipe.vae is None
                assert state.pipe.text_encoder is None
            else:  # a tiny model's VAE is built in memory, not reloadable: it stays on the CPU
                assert state.pipe.vae is not None
            result = loop.train(state)
        finally:
            loop.cleanup(state)
        if name == "folder":
            assert state.pipe.vae is None  # sampled, then released again
        runs[name] = _samples(result.run_dir)
    assert len(runs["folder"]) == len(runs["built"]) == 1
    # The same weights through the same pipeline: the same sample image (8-bit pixels, any thread count).
    assert np.abs(runs["folder"][0] - runs["built"][0]).max() <= 2


@pytest.mark.parametrize("replacement_vae, expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_the_reloaded_vae_decodes_in_the_dtype_encoding_used(
    tmp_path: Path, tiny_dataset: Path, tiny_folder: Path, monkeypatch, replacement_vae, expected
):
    """The model's own VAE decodes in float32 (the SDXL VAE overflows in fp16); a replacement --vae in
    the training precision, as it encoded."""
    reloaded = []

    def spy(cfg, dtype):
        vae = real_reload(cfg, dtype)
        reloaded.append(next(vae.parameters()).dtype)
        return vae

    real_reload = lora.reload_vae
    monkeypatch.setattr(lora, "reload_vae", spy)
    flags = {
        "train.max_steps": 1,
        "train.mixed_precision": "bf16",
        "validation.prompts": ["a photo of {token} {class}"],
        "embedding.train": False,
        "model.name": str(tiny_folder),
        "model.vae": str(tiny_folder / "vae") if replacement_vae else None,
    }
    loop.run_training(tiny_cfg(tmp_path, tiny_dataset, flags))
    assert reloaded == [expected]


@pytest.mark.parametrize("base_precision", ["auto", "bf16", "fp8"])
def test_a_bf16_denoiser_loads_straight_into_bf16_never_as_a_float32_copy(
    tmp_path: Path, tiny_dataset: Path, tiny_folder: Path, monkeypatch, base_precision
):
    """From a diffusers folder, the UNet's weights load tensor by tensor into bf16 (diffusers' per-part
    dtype): no whole-module cast of a float32 UNet ever runs (a FLUX.1 transformer is 24 GB in bf16, 48 GB
    in float32). The encoders and the VAE load in float32, as they encode."""
    from diffusers import UNet2DConditionModel

    if base_precision == "fp8":
        pytest.importorskip("torchao")

    casts = []
    real_apply = torch.nn.Module._apply

    def spy(module, fn, *args, **kwargs):
        if isinstance(module, UNet2DConditionModel):
            casts.append(next(module.parameters()).dtype)
        return real_apply(module, fn, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "_apply", spy)
    import safetensors.torch

    mapped, real_load_file = [], safetensors.torch.load_file
    monkeypatch.setattr(
        safetensors.torch, "load_file", lambda path, *a, **k: mapped.append(Path(path)) or real_load_file(path, *a, **k)
    )
    flags = {"train.mixed_precision": "bf16", "train.base_precision": base_precision, "model.name": str(tiny_folder)}
    cfg = resolve.resolve_precision(tiny_cfg(tmp_path, tiny_dataset, flags))
    pipe, arch, _ = lora.load_base(cfg, lambda event: None)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}  # fp8: dequantizes to bf16
    if base_precision == "fp8":
        assert all(hasattr(m.weight, "qdata") for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear))
    assert torch.float32 not in casts  # no float32 UNet was cast (moved is fine: .to(device) keeps bf16)
    # Its file read tensor by tensor (models/streaming.py), not converted from a map of the whole file.
    assert mapped and not [path for path in mapped if path.parent.name == "unet"]
    assert (
        {p.dtype for p in pipe.text_encoder.parameters()} == {p.dtype for p in pipe.vae.parameters()} == {torch.float32}
    )
