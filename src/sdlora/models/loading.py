"""Load a base model: a hub id, a local diffusers folder, one .safetensors checkpoint file
(models/single_file.py), or a tiny random model, of any family in models/families/.

Loading goes through diffusers and huggingface_hub with the normal HF cache, so a model
downloaded once works offline afterwards. Before the first hub access `models.hub.hub_offline()`
checks (once, in about 3 s at most) that the hub answers, and goes offline when it does not; a
model that is neither cached nor reachable gives one line (`models.hub.hub_error`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sdlora.errors import ModelError
from sdlora.models import families, precision, single_file
from sdlora.models.families import Family, UnknownFamily
from sdlora.models.hub import hub_error, hub_offline

TINY_WARNING = "tiny random-weight model: its images are noise (use a real --model for real results)"


def local_source(model: str) -> str:
    """Where `model` loads from: a shipped world model's folder (`world-sd`), else `model` as given."""
    from sdlora.world.shipped import shipped_folder

    folder = shipped_folder(model)
    return str(folder) if folder is not None else model


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf")


def weights_fingerprint(model: str, revision: str | None = None) -> str | None:
    """What tells one state of `model`'s weights from another, for the caches keyed on the model (so a folder
    retrained in place, or a hub model updated, never reuses their old latents): a local folder's or file's
    weights files by path, size and modification time; a hub id's cached snapshot (its commit); None for a
    tiny model (built from a seed) or a hub id not in the cache."""
    if is_tiny(model):
        return None
    path = Path(local_source(model)).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
        stats = [(f.relative_to(path).as_posix() if f != path else f.name, f.stat()) for f in files]
        return "\n".join(f"{name} {st.st_size} {st.st_mtime_ns}" for name, st in stats)
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model, "model_index.json", revision=revision)
    except ValueError:  # not a repo id
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def tiny_models() -> tuple[str, ...]:
    """The `--model` names of the families' tiny random-weight models."""
    return tuple(family.tiny_model for family in families.FAMILIES)


def is_tiny(model: str) -> bool:
    return families.tiny_family(model) is not None


def _family(model: str, revision: str | None) -> Family:
    """The family of a hub id or folder, from its model_index.json (a local folder's UNet config where
    the index names no known pipeline class)."""
    index = _read_model_index(model, revision)
    unet_config = Path(model) / "unet" / "config.json"
    try:
        return families.detect_family(
            index, unet_config=json.loads(unet_config.read_text(encoding="utf-8")) if unet_config.is_file() else None
        )
    except UnknownFamily as exc:
        raise UnknownFamily(f"{model}: {exc}") from None


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
    denoiser_dtype: torch.dtype | None = None,
    base_precision: str = "auto",
) -> tuple[Any, Family]:
    """The diffusers pipeline for `model` and its family.

    `dtype` is the dtype of its parts; the denoiser's is `denoiser_dtype` where given, stored as
    `base_precision` says (models/precision.py: fp8 and nf4 quantize its Linear weights from it). A
    diffusers folder or hub id loads each weight straight into its part's dtype, tensor by tensor, never a
    float32 copy of a bf16 denoiser first (the denoiser through models/streaming.py, which maps no whole
    file; the rest through diffusers' loader, a dict dtype); a single file loads as diffusers'
    `from_single_file` does (in `dtype`), its denoiser cast after."""
    model = local_source(model)
    denoiser_dtype = denoiser_dtype or dtype
    tiny = families.tiny_family(model)
    quantized_at_load = False
    in_its_dtype = False  # whether the denoiser loaded straight into `denoiser_dtype` (a folder or hub id)
    if tiny is not None:
        _no_nf4(base_precision, model)
        pipe = tiny.build_tiny()
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    elif single_file.is_single_file(model):
        family = single_file.detect(model)  # before any weight is read: one line for a file it cannot load
        _no_nf4(base_precision, model)
        extra = {"vae": load_vae(vae, dtype)} if vae else {}
        pipe = single_file.load_pipeline(model, family, dtype_kwargs(dtype), **extra)
    else:
        family = _family(model, revision)
        # A dict gives each part its own dtype ("default": the rest), as the weights load.
        part_dtypes = dtype if denoiser_dtype == dtype else {family.denoiser: denoiser_dtype, "default": dtype}
        kwargs: dict[str, Any] = {**dtype_kwargs(part_dtypes), "revision": revision, "variant": variant}
        if base_precision == "nf4":
            kwargs["quantization_config"] = precision.nf4_config(family.denoiser, denoiser_dtype)
            quantized_at_load = True
        kwargs.update(family.pipeline_kwargs())
        if vae:
            kwargs["vae"] = load_vae(vae, dtype)
        try:
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
            streams = denoiser_dtype != torch.float32 or base_precision == "fp8"  # `sdlora sample` in bf16 too
            if streams and not quantized_at_load:
                loaded = _stream_denoiser(model, family, kwargs, denoiser_dtype, base_precision == "fp8")
                if loaded is not None:
                    kwargs[family.denoiser] = loaded
                    quantized_at_load = base_precision == "fp8"
            pipe = family.pipeline_cls().from_pretrained(model, **kwargs)
            in_its_dtype = True
        except ModelError:
            raise
        except (OSError, EnvironmentError, ValueError) as exc:
            raise _model_error(model, exc) from exc
    family = families.family_of_pipeline(pipe)
    denoiser = getattr(pipe, family.denoiser)
    if not in_its_dtype and denoiser_dtype != dtype:
        denoiser.to(dtype=denoiser_dtype)  # a tiny model or a single file: built or loaded whole in `dtype`
    if base_precision == "fp8" and not quantized_at_load:
        precision.quantize_fp8(denoiser)
    return pipe, family


def _stream_denoiser(model: str, family: Family, kwargs: dict[str, Any], dtype: torch.dtype, fp8: bool) -> Any | None:
    """The denoiser of a diffusers folder or hub id (downloaded as `from_pretrained` would), read tensor by
    tensor into `dtype` (models/streaming.py), each Linear layer quantized to fp8 as it comes in with `fp8`;
    None where diffusers' own loader must do it."""
    from sdlora.models.streaming import load_model

    folder = Path(model)
    if not folder.is_dir():
        download = {k: v for k, v in kwargs.items() if k not in dtype_kwargs(dtype)}
        folder = Path(family.pipeline_cls().download(model, **download))
    return load_model(folder / family.denoiser, dtype, kwargs.get("variant"), precision.quantize_fp8 if fp8 else None)


def _no_nf4(base_precision: str, model: str) -> None:
    """nf4 quantizes as diffusers loads a folder's weights: not for a model built in memory or one file."""
    if base_precision == "nf4":
        raise ModelError(
            f"{precision.FLAG} nf4: {model} is not a diffusers folder or hub id (nf4 quantizes as such a model "
            f"loads); use {precision.FLAG} fp8"
        )


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
    model = local_source(model)
    if vae:
        return load_vae(vae, dtype)
    if single_file.is_single_file(model):
        return single_file.load_vae(model, single_file.detect(model), dtype_kwargs(dtype))
    # AutoModel: the class the folder's vae/config.json names (AutoencoderKL, FLUX.2's AutoencoderKLFlux2, ...)
    from diffusers import AutoModel

    if not Path(model).is_dir():
        hub_offline()
    kwargs = {"revision": revision, "variant": variant}
    try:
        return AutoModel.from_pretrained(
            model, subfolder="vae", **dtype_kwargs(dtype), **{k: v for k, v in kwargs.items() if v is not None}
        )
    except (OSError, ValueError) as exc:
        raise _model_error(model, exc) from exc


def default_resolution(model: str, family: Family) -> int:
    """The training and sampling resolution a model was made for (64 for the tiny models): a local
    folder's own, from its UNet's sample size and its VAE's downscaling (diffusers' SD pipelines take
    their default height the same way), or, for a transformer (whose config has no size), the size its
    VAE was made for (FLUX.1's: 1024; world-flux's: 32); else the family's."""
    if is_tiny(model):
        from sdlora.models.tiny import TINY_RESOLUTION

        return TINY_RESOLUTION
    folder = Path(local_source(model))
    unet, vae = folder / "unet" / "config.json", folder / "vae" / "config.json"
    if not vae.is_file():
        return family.default_resolution
    vae_config = json.loads(vae.read_text(encoding="utf-8"))
    if unet.is_file():
        sample_size = json.loads(unet.read_text(encoding="utf-8")).get("sample_size")
        levels = len(vae_config.get("block_out_channels", ()))
        if isinstance(sample_size, int) and levels:
            return sample_size * 2 ** (levels - 1)
    elif (folder / "transformer" / "config.json").is_file() and isinstance(vae_config.get("sample_size"), int):
        return vae_config["sample_size"]
    return family.default_resolution
