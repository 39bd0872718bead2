"""Encode once, train many times: VAE latents and text embeddings cached on disk.

Training never runs the VAE or the (frozen) text encoders: every image is encoded once (and
its mirror image, for `--random-flip`), every distinct caption once, and the tensors are kept
in `<dataset>/.cache/{latents,text}/<key>.safetensors`. A key covers everything that changes
the tensor (model, revision, variant, VAE, the state of their weights (`models.loading.weights_fingerprint`),
dtype, the image's training size, its own sha256 or the caption), so a changed photo, another model, a
model folder retrained in place or another size (resolution or aspect bucket) never reuses a stale entry,
and a second run on the same dataset encodes nothing. Subject masks (the masked loss) are kept beside
them, on the latent grid, in `masks/<key>.safetensors`, keyed by the mask file's sha256 and the sizes, so
a changed mask is computed again and the latents are not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from sdlora.events import ProgressFn
from sdlora.fsutil import atomic_path, sha256_file
from sdlora.models.families import Family

CACHE_DIR = ".cache"


def cache_key(*parts: Any) -> str:
    """24 hex digits naming one cached tensor set."""
    text = "\n".join("" if p is None else str(p) for p in parts)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class TensorCache:
    """A folder of `<key>.safetensors` files; `folder=None` keeps nothing (every call encodes)."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if self.folder is None:
            return None
        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception:  # a damaged entry (disk full, killed writer): encode it again
            return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / f"{key}.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


@dataclass
class CacheStats:
    encoded: int = 0
    reused: int = 0


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """An RGB image as a (3, height, width) tensor in [-1, 1] at `size` (height, width).

    Resized to cover the size and center-cropped; a file already at that size is used as it is.
    """
    import numpy as np
    from PIL import Image

    from sdlora.data.images import cover

    height, width = size
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (width, height):
            img = cover(img, (width, height))  # what `sdlora prepare --keep-aspect` does
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@torch.no_grad()
def encode_latents(
    arch: Family,
    vae: Any,
    images: Sequence[Path],
    *,
    sizes: Sequence[tuple[int, int]],
    key_parts: Sequence[Any],
    cache: TensorCache,
    flip: bool,
    device: Any,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4,
    on_progress: ProgressFn | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, CacheStats]:
    """Latents (C, h, w) of `images` at their `sizes` (height, width) as the family's denoiser sees them
    (`Family.scale_latents`), and of their mirror images when `flip`, as float32 on CPU, one per image (sizes
    may differ: aspect buckets).

    The latent is the mean of the VAE's posterior: deterministic, so a cached latent equals a
    fresh one. Images of one size are encoded together. The VAE is moved to `device` only if
    something has to be encoded.
    """
    stats = CacheStats()
    keys = [
        cache_key("latent-v1", *key_parts, f"{h}x{w}", str(dtype), flip, sha256_file(p))
        for p, (h, w) in zip(images, sizes)
    ]
    found: list[dict[str, torch.Tensor] | None] = [cache.get(k) for k in keys]
    todo = [i for i, f in enumerate(found) if f is None]
    stats.reused = len(images) - len(todo)
    if todo:
        vae.to(device=device, dtype=dtype)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in todo:
        by_size.setdefault(sizes[i], []).append(i)
    chunks = [group[s : s + batch_size] for group in by_size.values() for s in range(0, len(group), batch_size)]
    for chunk in chunks:
        pixels = torch.stack([load_image(images[i], sizes[i]) for i in chunk])
        batch = torch.cat([pixels, pixels.flip(-1)]) if flip else pixels
        mean = vae.encode(batch.to(device=device, dtype=dtype)).latent_dist.mean
        latents = arch.scale_latents(vae, mean.float()).cpu()
        for j, i in enumerate(chunk):
            entry = {"latent": latents[j].clone()}
            if flip:
                entry["flipped"] = latents[len(chunk) + j].clone()
            cache.put(keys[i], entry)
            found[i] = entry
        stats.encoded += len(chunk)
        if on_progress:
            on_progress("encoding images", stats.encoded, len(todo))
    latents = [f["latent"].float() for f in found]  # type: ignore[index]
    flipped = [f["flipped"].float() for f in found] if flip else None  # type: ignore[index]
    return latents, flipped, stats


def load_mask_at(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """A subject mask (white = object) as a (1, height, width) float32 tensor in [0, 1] at `size`, through
    the same cover-and-crop as its image (`load_image`). DataError for a missing or damaged file."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from sdlora.data.images import cover
    from sdlora.errors import DataError

    height, width = size
    try:
        with Image.open(path) as img:
            img = img.convert("L")
            if img.size != (width, height):
                img = cover(img, (width, height))
            array = np.asarray(img, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DataError(f"{path}: mask missing; re-run `sdlora prepare` with the same --masks to rewrite it") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable mask ({exc}); re-run `sdlora prepare` to rewrite it") from None
    return torch.from_numpy(array)[None].contiguous()


def encode_masks(
    masks: Sequence[Path | None],
    *,
    sizes: Sequence[tuple[int, int]],
    latent_sizes: Sequence[tuple[int, int]],
    cache: TensorCache,
) -> tuple[list[torch.Tensor | None], CacheStats]:
    """Each image's mask on its latent grid, (1, h, w) float32 in [0, 1] (area interpolation: a latent
    cell holds the share of its pixels that are object); None for an image without a mask."""
    import torch.nn.functional as F

    stats = CacheStats()
    out: list[torch.Tensor | None] = []
    for path, (h, w), (lh, lw) in zip(masks, sizes, latent_sizes):
        if path is None:
            out.append(None)
            continue
        key = cache_key("mask-v1", f"{h}x{w}", f"{lh}x{lw}", sha256_file(path) if Path(path).is_file() else path)
        entry = cache.get(key)
        if entry is None:
            pixels = load_mask_at(Path(path), (h, w))
            entry = {"mask": F.interpolate(pixels[None], size=(lh, lw), mode="area")[0].clamp(0.0, 1.0)}
            cache.put(key, entry)
            stats.encoded += 1
        else:
            stats.reused += 1
        out.append(entry["mask"].float())
    return out, stats


@torch.no_grad()
def encode_texts(
    arch: Family,
    pipe: Any,
    captions: Sequence[str],
    *,
    key_parts: Sequence[Any],
    cache: TensorCache,
    device: Any,
    dtype: torch.dtype,
    on_progress: ProgressFn | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], CacheStats]:
    """caption -> (prompt embeddings (L, D), pooled (Dp,) or None), float32 on CPU, each encoded once by the
    text encoders on `device` in `dtype` (a key part: embeddings encoded in another dtype are not reused)."""
    stats = CacheStats()
    unique = list(dict.fromkeys(captions))
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    todo = []
    for text in unique:
        entry = cache.get(cache_key("text-v1", *key_parts, arch.name, str(dtype), text))
        if entry is None:
            todo.append(text)
        else:
            out[text] = (entry["embeds"], entry.get("pooled"))
    stats.reused = len(unique) - len(todo)
    encoders = [getattr(pipe, name) for name in arch.text_encoders]
    if todo:
        for encoder in encoders:
            encoder.to(device, dtype=dtype)
    for n, text in enumerate(todo, start=1):
        embeds, pooled = arch.encode_tokens(encoders, arch.tokenize(pipe, [text]))
        entry = {"embeds": embeds[0].float().cpu()}
        if pooled is not None:
            entry["pooled"] = pooled[0].float().cpu()
        cache.put(cache_key("text-v1", *key_parts, arch.name, str(dtype), text), entry)
        out[text] = (entry["embeds"], entry.get("pooled"))
        stats.encoded += 1
        if on_progress:
            on_progress("encoding captions", n, len(todo))
    return out, stats
