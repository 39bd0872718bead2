"""Aspect-ratio buckets: a size for each photo that keeps its shape at about the training area.

Phone photos are 4:3 or 3:4; a square center crop cuts the object. A bucket is a (width,
height) with sides multiples of 64, area at most resolution^2 and aspect between 1:2 and 2:1
(kohya's and SDXL's scheme: for each width the largest height that fits the area). A photo
goes to the bucket whose aspect ratio is closest to its own (in log ratio, so 4:3 and 3:4 are
treated alike; ties go to the larger area), and is resized to cover it and center-cropped,
which cuts at most a few percent off one side.

`sdlora prepare --keep-aspect` writes images at their bucket size; `sdlora train` groups equal
sizes into batches and tells SDXL the true original size and crop (its micro-conditioning).
"""

from __future__ import annotations

import math
from functools import lru_cache

STEP = 64  # sides are multiples of this (the VAE's 8x and the UNet's downsampling both divide it)
MAX_RATIO = 2.0  # no bucket longer than 2:1 either way


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
