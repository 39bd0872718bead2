"""Load a base model: a hub id, a local diffusers folder, one SD 1.x / SDXL .safetensors file
(models/single_file.py), or a tiny random model.

Loading goes through diffusers and huggingface_hub with the normal HF cache, so a model
downloaded once works offline afterwards. Before the first hub access `models.hub.hub_offline()`
checks (once, in about 3 s at most) that the hub answers, and goes offline when it does not; a
model that is neither cached nor reachable gives one line (`models.hub.hub_error`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from sdlora.errors import ModelError
from sdlora.models import single_file
from sdlora.models.arch import Architecture, detect_architecture
from sdlora.models.hub import hub_error, hub_offline

TINY_MODELS: dict[str, str] = {"tiny-sd": "tiny_sd", "tiny-sdxl": "tiny_sdxl"}
TINY_WARNING = "tiny random-weight model: its images are noise (use a real --model for real results)"


def is_tiny(model: str) -> bool:
    return model in TINY_MODELS


def _build_tiny(model: str) -> Any:
    from sdlora.models import tiny

    builder: Callable[[], Any] = getattr(tiny, TINY_MODELS[model])
    return builder()


def _pipeline_class(model: str, revision: str | None) -> Any:
    """The pipeline class for a hub id or folder, from its model_index.json (SD 1.x or SDXL)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = _read_model_index(model, revision)
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def _read_model_index(model: str, revision: str | None) -> dict[str, Any]:
    folder = Path(model)
    if folder.is_dir():
        path = folder / "model_index.json"
        if not path.is_file():
            raise ModelError(f"{folder}: not a diffusers model folder (no model_index.json)")
        return json.loads(path.read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    hub_offline()
    try:
        path = hf_hub_download(model, "model_index.json", revision=revision)
    except Exception as exc:  # huggingface_hub raises many types: offline, 404, gated, bad id
        raise _model_error(model, exc) from exc
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _model_error(model: str, exc: Exception) -> ModelError:
    return hub_error(f"model {model}", exc, "or use --model tiny-sd for an offline try")


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`dtype=` where diffusers takes it (0.42 deprecates `torch_dtype` with a FutureWarning), else `torch_dtype=`."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def load_pipeline(
    model: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, Architecture]:
    """The diffusers pipeline for `model` and its architecture (SD 1.x or SDXL)."""
    if is_tiny(model):
        pipe = _build_tiny(model)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    elif single_file.is_single_file(model):
        family = single_file.family_of(model)  # before any weight is read: one line for a file it cannot load
        extra = {"vae": load_vae(vae, dtype)} if vae else {}
        pipe = single_file.load_pipeline(model, family, dtype_kwargs(dtype), **extra)
    else:
        cls = _pipeline_class(model, revision)
        kwargs: dict[str, Any] = {**dtype_kwargs(dtype), "revision": revision, "variant": variant}
        if cls.__name__ == "StableDiffusionPipeline":
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        if vae:
            kwargs["vae"] = load_vae(vae, dtype)
        try:
            pipe = cls.from_pretrained(model, **{k: v for k, v in kwargs.items() if v is not None})
        except ModelError:
            raise
        except (OSError, EnvironmentError, ValueError) as exc:
            raise _model_error(model, exc) from exc
    return pipe, detect_architecture(pipe.unet.config)


def load_vae(vae: str, dtype: torch.dtype) -> Any:
    """A replacement VAE (e.g. madebyollin/sdxl-vae-fp16-fix, safe in fp16) from a hub id or folder."""
    from diffusers import AutoencoderKL

    if not Path(vae).is_dir():
        hub_offline()
    try:
        return AutoencoderKL.from_pretrained(vae, **dtype_kwargs(dtype))
    except (OSError, ValueError) as exc:
        raise _model_error(vae, exc) from exc


def load_base_vae(
    model: str, *, revision: str | None = None, variant: str | None = None, vae: str | None = None, dtype: torch.dtype
) -> Any:
    """The VAE `load_pipeline` gives `model` (the replacement `vae` when given), loaded on its own: the
    same weights, from the same files. Not for the tiny models (built in memory, nothing to reload)."""
    if vae:
        return load_vae(vae, dtype)
    if single_file.is_single_file(model):
        return single_file.load_vae(model, single_file.family_of(model), dtype_kwargs(dtype))
    from diffusers import AutoencoderKL

    if not Path(model).is_dir():
        hub_offline()
    kwargs = {"revision": revision, "variant": variant}
    try:
        return AutoencoderKL.from_pretrained(
            model, subfolder="vae", **dtype_kwargs(dtype), **{k: v for k, v in kwargs.items() if v is not None}
        )
    except (OSError, ValueError) as exc:
        raise _model_error(model, exc) from exc


def default_resolution(model: str, arch: Architecture) -> int:
    """The training and sampling resolution a model was made for (64 for the tiny models)."""
    if is_tiny(model):
        from sdlora.models.tiny import TINY_RESOLUTION

        return TINY_RESOLUTION
    return arch.default_resolution
