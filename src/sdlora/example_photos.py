"""Synthetic "phone photos" of one toy, as HEIC: the offline demo's and the examples' data.

The toy (a red car with a yellow cabin, black wheels and a blue antenna ball) is drawn the same
way each time, at varied angles, sizes and positions on varied backgrounds, so
`sdlora prepare` has something realistic to chew on without a phone. Like a phone, three
photos are stored sideways with an orientation tag (EXIF 6 / 8, which pillow-heif writes as a
HEIF rotation) that a viewer, and sdlora, turn upright. Deterministic: the same call gives the
same pictures. `examples/photos/` in the repository is `write_example_photos("examples/photos")`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

import numpy as np
import pillow_heif
from PIL import Image, ImageDraw, ImageFilter

SIZE = (640, 480)  # landscape, as displayed
COUNT = 12
SIDEWAYS = {3: 6, 7: 8, 11: 6}  # photo index -> EXIF orientation stored in the file
QUALITY = 60


def background(rng: random.Random, kind: int) -> Image.Image:
    w, h = SIZE
    img = Image.new("RGB", SIZE)
    draw = ImageDraw.Draw(img)
    c1 = tuple(rng.randrange(40, 230) for _ in range(3))
    c2 = tuple(rng.randrange(40, 230) for _ in range(3))
    if kind == 0:  # vertical gradient: a wall meeting a floor
        for y in range(h):
            t = y / (h - 1)
            draw.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(c1, c2)))
    elif kind == 1:  # stripes: a rug
        step = rng.randrange(20, 50)
        for x in range(-h, w, step * 2):
            draw.polygon([(x, 0), (x + step, 0), (x + step + h, h), (x + h, h)], fill=c1)
            draw.polygon([(x + step, 0), (x + 2 * step, 0), (x + 2 * step + h, h), (x + step + h, h)], fill=c2)
    elif kind == 2:  # checkerboard: tiles
        step = rng.randrange(30, 70)
        for y in range(0, h, step):
            for x in range(0, w, step):
                draw.rectangle([x, y, x + step, y + step], fill=c1 if (x // step + y // step) % 2 else c2)
    else:  # table edge: two flat areas and a shadow line
        split = rng.randrange(h // 3, 2 * h // 3)
        draw.rectangle([0, 0, w, split], fill=c1)
        draw.rectangle([0, split, w, h], fill=c2)
        draw.line([(0, split), (w, split)], fill=(30, 30, 30), width=4)
    return img.filter(ImageFilter.GaussianBlur(2))


def toy(scale: float) -> Image.Image:
    """The object, always the same shape and colours, on a transparent layer."""
    s = scale
    layer = Image.new("RGBA", (int(300 * s), int(260 * s)), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    d.ellipse([40 * s, 215 * s, 270 * s, 245 * s], fill=(0, 0, 0, 70))  # shadow
    d.rounded_rectangle([30 * s, 120 * s, 270 * s, 200 * s], radius=int(30 * s), fill=(210, 30, 40, 255))  # body
    d.rounded_rectangle([90 * s, 70 * s, 210 * s, 135 * s], radius=int(20 * s), fill=(250, 205, 40, 255))  # cabin
    d.rectangle([110 * s, 82 * s, 190 * s, 115 * s], fill=(120, 190, 230, 255))  # window
    for cx in (85, 215):  # wheels with hubs
        d.ellipse([(cx - 32) * s, 170 * s, (cx + 32) * s, 234 * s], fill=(25, 25, 25, 255))
        d.ellipse([(cx - 12) * s, 190 * s, (cx + 12) * s, 214 * s], fill=(200, 200, 200, 255))
    d.line([200 * s, 72 * s, 235 * s, 10 * s], fill=(40, 40, 40, 255), width=max(2, int(5 * s)))  # antenna
    d.ellipse([225 * s, 0, 247 * s, 22 * s], fill=(40, 90, 220, 255))
    return layer


def render(index: int) -> Image.Image:
    rng = random.Random(1000 + index)
    img = background(rng, index % 4)
    obj = toy(rng.uniform(0.9, 1.35))
    obj = obj.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BICUBIC, expand=True)
    if rng.random() < 0.5:
        obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # seen from the other side
    x = (SIZE[0] - obj.width) // 2 + rng.randrange(-60, 61)
    y = (SIZE[1] - obj.height) // 2 + rng.randrange(-30, 31)
    img.paste(obj, (x, y), obj)
    # A little light falloff and sensor-like grain, so it is not flat vector art.
    cx, cy = rng.uniform(0.3, 0.7) * SIZE[0], rng.uniform(0.3, 0.7) * SIZE[1]
    mask = Image.new("L", SIZE)
    ImageDraw.Draw(mask).ellipse([cx - 500, cy - 420, cx + 500, cy + 420], fill=255)
    dark = Image.eval(img, lambda v: int(v * 0.75))
    img = Image.composite(img, dark, mask.filter(ImageFilter.GaussianBlur(120)))
    noise = np.random.default_rng(index).normal(0, 4, size=(SIZE[1], SIZE[0], 1))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def stored_sideways(img: Image.Image, orientation: int) -> Image.Image:
    """The pixels as a phone stores them when a viewer must apply `orientation` to show `img`."""
    # 6 = rotate 90 deg clockwise to display, so the stored pixels are turned counter-clockwise.
    return img.rotate(90 if orientation == 6 else -90, expand=True)


def write_example_photos(out: str | Path, indices: Iterable[int] | None = None) -> list[Path]:
    """Write toy_01.heic ... toy_12.heic (or only those of `indices`, 0-based) into `out`
    (atomically, each) and return their paths."""
    from sdlora.fsutil import atomic_path

    pillow_heif.register_heif_opener()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(COUNT) if indices is None else sorted(set(indices)):
        img = render(i)
        path = out / f"toy_{i + 1:02d}.heic"
        with atomic_path(path) as tmp:
            if i in SIDEWAYS:
                exif = Image.Exif()
                exif[0x0112] = SIDEWAYS[i]
                stored_sideways(img, SIDEWAYS[i]).save(tmp, format="HEIF", quality=QUALITY, exif=exif.tobytes())
            else:
                img.save(tmp, format="HEIF", quality=QUALITY)
        paths.append(path)
    return paths
