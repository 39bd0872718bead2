"""Aspect-ratio buckets: a size for each photo that keeps its shape at about the training area.

Phone photos are 4:3 or 3:4; a square center crop cuts the object. A bucket is a (width,
height) with sides multiples of 64, area at most resolution^2 and aspect between 1:2 and 2:1
(kohya's and SDXL's scheme: for each width the largest height that fits the area). A photo
goes to the bucket whose aspect ratio is closest to its own (in log ratio, so 4:3 and 3:4 are
treated alike; ties go to the larger area), and is resized to cover it and center-cropped,
which cuts at most a few percent off one side.

`sdlora prepare --keep-aspect` writes images at their bucket size; `sdlora train` groups equal
sizes into batches and tells SDXL the true original size and crop (its micro-conditioning).

Also the one rule for a resolution (`check_resolution`, every stage's --resolution, --height,
--width) and an image's training geometry (`geometry`: its size and crop), which `prepare`
stores per image in manifest.json and `train` reads back (`Manifest.geometry`).
"""

from __future__ import annotations

import math
from functools import lru_cache

from sdlora.errors import ConfigError

STEP = 64  # sides are multiples of this (the VAE's 8x and the UNet's downsampling both divide it)
MAX_RATIO = 2.0  # no bucket longer than 2:1 either way
RESOLUTION_MULTIPLE = 8  # the VAE's downsampling: latents are resolution / 8
MAX_RESOLUTION = 4096  # 16 MP per image: far beyond SD 1.x (512) and SDXL (1024)


def resolution_problem(value: int, flag: str = "--resolution") -> str | None:
    """What is wrong with an image side given as `flag`, in one line, or None when it is usable."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{flag} {value!r}: must be a whole number of pixels, e.g. 512"
    if value < RESOLUTION_MULTIPLE or value % RESOLUTION_MULTIPLE or value > MAX_RESOLUTION:
        return (
            f"{flag} {value}: must be a positive multiple of {RESOLUTION_MULTIPLE}, at most {MAX_RESOLUTION} "
            "(512 for SD 1.x, 1024 for SDXL)"
        )
    return None


def check_resolution(value: int, flag: str = "--resolution") -> int:
    """`value` when it is a usable image side (prepare's, train's, sample's --resolution, --height,
    --width), else ConfigError naming `flag`: the one rule every stage applies."""
    problem = resolution_problem(value, flag)
    if problem is not None:
        raise ConfigError(problem)
    return value


@lru_cache(maxsize=32)
def bucket_sizes(resolution: int, step: int = STEP, max_ratio: float = MAX_RATIO) -> tuple[tuple[int, int], ...]:
    """All (width, height) buckets for `resolution`, from the tallest to the widest."""
    if resolution < step:
        return ((resolution, resolution),)
    area = resolution * resolution
    sizes = set()
    for width in range(step, int(resolution * math.sqrt(max_ratio)) + step, step):
        height = min((area // width) // step * step, resolution * 4)
        if height >= step and 1 / max_ratio <= width / height <= max_ratio:
            sizes.update({(width, height), (height, width)})  # portrait and landscape alike
    sizes.add((resolution // step * step or resolution,) * 2)
    return tuple(sorted(sizes, key=lambda wh: wh[0] / wh[1]))


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (width, height) bucket for a photo of `width` x `height` at `resolution`."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = math.log(width / height)
    return min(
        bucket_sizes(resolution), key=lambda wh: (round(abs(math.log(wh[0] / wh[1]) - aspect), 9), -wh[0] * wh[1])
    )


def cover_crop(width: int, height: int, target: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize-to-cover then center-crop: the resized (width, height) and the crop's (top, left)."""
    tw, th = target
    scale = max(tw / width, th / height)
    rw, rh = max(tw, round(width * scale)), max(th, round(height * scale))
    return (rw, rh), ((rh - th) // 2, (rw - tw) // 2)


def geometry(
    original_wh: tuple[int, int], resolution: int, *, keep_aspect: bool, crop: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The training size (height, width) of a photo and where its crop starts (top, left).

    A keep-aspect dataset's photo goes to its bucket at `resolution` (so training at another
    resolution than prepare's still buckets it); any other dataset is square. A photo padded to
    a square (`--crop pad`) lost nothing, so its crop starts at (0, 0).
    """
    w, h = original_wh
    if w <= 0 or h <= 0:  # no usable record of the photo: treat it as already square
        w = h = resolution
    tw, th = bucket_size(w, h, resolution) if keep_aspect else (resolution, resolution)
    top_left = cover_crop(w, h, (tw, th))[1] if keep_aspect or crop == "center" else (0, 0)
    return (th, tw), top_left
