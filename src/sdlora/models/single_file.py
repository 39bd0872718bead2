"""Base models from one checkpoint file, as Civitai, ComfyUI and Forge keep them: `.safetensors` files.

The family is read from the file's header, never from its name and without loading a tensor: each family
declares a key prefix only its files have (`Family.single_file_key`: SDXL's second text encoder
`conditioner.embedders.1.*`, SD 1.x's one CLIP `cond_stage_model.transformer.*`), asked in registry order.
What the file lacks (component configs, tokenizers) comes from the package, never from the hub: the
configs of each family's base model ship in `base_configs/<Family.base_config>/`, and the real CLIP tokenizer is built
offline from open_clip's BPE file (models/tiny.py). They are assembled once into a diffusers-style folder
in sdlora's cache, which diffusers' `from_single_file(config=folder, local_files_only=True)` reads.
v-prediction cannot be told from the keys, so the scheduler is the family's own (epsilon), as in diffusers.

Pickle checkpoints (`.ckpt`, `.pt`) are refused unopened: unpickling a downloaded file can run its code.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sdlora.errors import ModelError
from sdlora.models import families
from sdlora.models.families import Family

SAFETENSORS = ".safetensors"
PICKLES = (".ckpt", ".pt", ".pth", ".bin")
# The shipped configs, one folder per family; tests point this at the tiny models' configs.
CONFIGS = Path(__file__).parent / "base_configs"

UNET_PREFIX = "model.diffusion_model."
UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
CONVERT = (
    'convert it to .safetensors first: python -c "import torch, safetensors.torch as st; '
    "sd = torch.load('{path}', weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({{k: v.clone().contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, '{out}')\""
)


def is_single_file(model: str) -> bool:
    """Whether `model` names a checkpoint file (by its suffix; it may not exist)."""
    return Path(model).suffix.lower() in (SAFETENSORS, *PICKLES)


def _damaged(path: Path, exc: BaseException) -> ModelError:
    lines = str(exc).strip().splitlines()
    reason = (lines[0] if lines else type(exc).__name__).removeprefix("Error while deserializing header: ")
    return ModelError(f"{path}: damaged or incomplete .safetensors file ({reason[:200]}); download or copy it again")


def family_of(path: str | os.PathLike[str]) -> str:
    """The name of the shipped config folder the file loads with ("sd15", "sdxl"): `detect(path).base_config`."""
    return detect(path).base_config


def detect(path: str | os.PathLike[str]) -> Family:
    """The file's family, from its header alone; ModelError (one line) for anything sdlora cannot load."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file" if not path.is_dir() else f"{path}: a folder, not a checkpoint file")
    if path.suffix.lower() in PICKLES:
        out = path.with_suffix(SAFETENSORS)
        raise ModelError(
            f"{path}: a pickle checkpoint, not opened (loading one can run code); {CONVERT.format(path=path, out=out)}"
        )
    try:  # safe_open reads the header and checks that it covers the whole file: no tensor is read
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            conv_in = f.get_slice(UNET_CONV_IN).get_shape() if UNET_CONV_IN in keys else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _damaged(path, exc) from None
    if conv_in is None:
        raise ModelError(f"{path}: not a Stable Diffusion checkpoint (no {UNET_PREFIX}* weights)")
    family = next((f for f in families.FAMILIES if any(k.startswith(f.single_file_key) for k in keys)), None)
    if family is None:
        known = " or ".join(f.label for f in families.FAMILIES)
        raise ModelError(
            f"{path}: an unsupported model family (not the text encoders of {known}; "
            f"SD 2.x and the SDXL refiner are not supported); use an {known} checkpoint"
        )
    if len(conv_in) != 4 or conv_in[1] != 4:
        raise ModelError(
            f"{path}: its UNet takes {conv_in[1] if len(conv_in) > 1 else '?'} input channels (an inpainting or "
            "other special model); sdlora trains text-to-image models, with 4"
        )
    return family


def config_folder(name: str) -> Path:
    """A diffusers-style folder with the family's configs and tokenizers, made once in sdlora's cache.

    Its name carries a digest of the shipped configs, so a changed config gets a new folder; it is
    written to a temp folder and renamed, so a process never reads a half-written one."""
    from sdlora.fsutil import cache_dir

    source = CONFIGS / name
    files = sorted(p for p in source.rglob("*.json") if p.is_file())
    if not files:
        raise ModelError(f"{source}: no configs for {name} (a broken sdlora install?)")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(source).as_posix().encode() + b"\0" + file.read_bytes())
    folder = cache_dir() / "base-configs" / f"{name}-{digest.hexdigest()[:16]}"
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        for file in files:
            target = tmp / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
        _write_tokenizers(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process made it first
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_tokenizers(folder: Path) -> None:
    """SD 1.5's tokenizer (pads with the end token) and, for SDXL, tokenizer_2 (pads with "!"), as the
    real models ship them: CLIP's 49,408-token BPE vocabulary, 77 positions."""
    import json

    from sdlora.models.tiny import clip_tokenizer

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        if name in index:
            clip_tokenizer(pad_token=pad).save_pretrained(str(folder / name))


def _failed(path: Path, family: Family, exc: BaseException) -> ModelError:
    lines = str(exc).strip().splitlines()
    reason = lines[0][:200] if lines else type(exc).__name__
    return ModelError(f"{path}: could not be loaded as an {family.label} checkpoint ({reason})")


def load_pipeline(path: str, family: Family, dtype_kwargs: dict[str, Any], **components: Any) -> Any:
    """The diffusers pipeline from one file, with the family's shipped configs (`components` replace parts,
    e.g. vae=...)."""
    components = {**family.pipeline_kwargs(), **components}
    try:
        return family.pipeline_cls().from_single_file(
            path, config=str(config_folder(family.base_config)), local_files_only=True, **dtype_kwargs, **components
        )
    except ModelError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise _failed(Path(path), family, exc) from exc


def load_vae(path: str, family: Family, dtype_kwargs: dict[str, Any]) -> Any:
    """Only the VAE of the file (the same weights `load_pipeline` gives it)."""
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_single_file(
            path, config=str(config_folder(family.base_config)), subfolder="vae", local_files_only=True, **dtype_kwargs
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise _failed(Path(path), family, exc) from exc
