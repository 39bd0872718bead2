"""Backgrounds: a sky band and a ground band in the background's palette, with a few flat shapes.

Simple on purpose: at 32-64 px a small UNet must learn each one, and a caption's "on the beach"
must look like nothing else. Shapes vary in number and place with the scene's random numbers.
`clutter` adds other things around (books, plants, other objects of the world) for the photos of
a cluttered room that masks are for.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sdlora.world import vocab
from sdlora.world.objects import draw_object, rotated, sample_base, shade


def draw_background(name: str, size: tuple[int, int], rng: np.random.Generator) -> tuple[Image.Image, float]:
    """The background `name` at `size` (width, height), and where its ground starts (a share of the height)."""
    bg = vocab.BACKGROUNDS[name]
    w, h = size
    horizon = bg.horizon + float(rng.uniform(-0.05, 0.05))
    hy = horizon * h
    img = Image.new("RGB", size, bg.sky)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, hy, w, h], fill=bg.ground)
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    acc = bg.accent

    def disc(cx: float, cy: float, r: float, fill) -> None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)

    if name == "beach":
        draw.rectangle([0, hy - 0.1 * h, w, hy], fill=acc)  # the sea
        draw.line([0, hy, w, hy], fill=(250, 250, 245), width=max(1, h // 60))  # surf
        disc(u(0.1, 0.9) * w, u(0.08, 0.25) * h, 0.07 * h, (255, 225, 80))
    elif name == "snow":
        for _ in range(int(rng.integers(1, 3))):
            cx = u(0, 1) * w
            draw.ellipse([cx - 0.45 * w, hy - 0.18 * h, cx + 0.45 * w, hy + 0.18 * h], fill=acc)
        draw.rectangle([0, hy + 0.02 * h, w, h], fill=bg.ground)
        for _ in range(int(rng.integers(6, 14))):
            disc(u(0, 1) * w, u(0, 1) * h, 0.012 * h, (255, 255, 255))
    elif name == "grass":
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = u(0.05, 0.95) * w, u(0.08, horizon - 0.15) * h
            for dx in (-0.06, 0.0, 0.06):
                disc(cx + dx * h, cy + (0.015 if dx else -0.015) * h, 0.05 * h, acc)
        draw.rectangle([0, hy, w, hy + 0.03 * h], fill=shade(bg.ground, 0.8))
    elif name == "table":
        x = u(0.05, 0.6) * w
        draw.rectangle(
            [x, 0.1 * h, x + 0.3 * h, min(0.35 * h, hy - 0.08 * h)],
            fill=acc,
            outline=(60, 50, 40),
            width=max(1, h // 80),
        )
        draw.rectangle([0, hy, w, hy + 0.04 * h], fill=shade(bg.ground, 0.75))  # the table's edge
    elif name == "city":
        x = -u(0, 0.1) * w
        while x < w:
            bw, top = u(0.1, 0.22) * w, u(0.08, horizon - 0.12) * h
            draw.rectangle([x, top, x + bw, hy], fill=shade(acc, u(0.8, 1.2)))
            for wy in np.arange(top + 0.04 * h, hy - 0.04 * h, 0.08 * h):
                for wx in np.arange(x + 0.03 * w, x + bw - 0.03 * w, 0.06 * w):
                    draw.rectangle([wx, wy, wx + 0.02 * w, wy + 0.03 * h], fill=(200, 205, 170))
            x += bw + u(0.0, 0.04) * w
        for dx in np.arange(0, w, 0.2 * w):
            draw.rectangle([dx, 0.85 * h, dx + 0.1 * w, 0.87 * h], fill=(230, 230, 230))
    elif name == "night":
        for _ in range(int(rng.integers(10, 25))):
            disc(u(0, 1) * w, u(0, horizon - 0.05) * h, 0.006 * h + 0.5, (250, 250, 235))
        disc(u(0.1, 0.9) * w, u(0.1, 0.3) * h, 0.06 * h, acc)
    elif name == "forest":
        for _ in range(int(rng.integers(5, 9))):
            cx, th = u(-0.05, 1.05) * w, u(0.3, 0.55) * h
            draw.rectangle([cx - 0.015 * w, hy - 0.08 * h, cx + 0.015 * w, hy + 0.02 * h], fill=(70, 45, 25))
            draw.polygon([(cx, hy - th), (cx - 0.09 * w, hy - 0.06 * h), (cx + 0.09 * w, hy - 0.06 * h)], fill=acc)
    elif name == "desert":
        for _ in range(2):
            cx = u(0, 1) * w
            draw.ellipse([cx - 0.5 * w, hy - 0.07 * h, cx + 0.5 * w, hy + 0.1 * h], fill=shade(bg.ground, 0.9))
        disc(u(0.1, 0.9) * w, u(0.08, 0.22) * h, 0.06 * h, (255, 245, 200))
        cx = u(0.05, 0.95) * w
        draw.rectangle([cx - 0.02 * w, hy - 0.2 * h, cx + 0.02 * w, hy + 0.03 * h], fill=acc)
        draw.rectangle([cx - 0.07 * w, hy - 0.13 * h, cx - 0.02 * w, hy - 0.1 * h], fill=acc)
        draw.rectangle([cx - 0.07 * w, hy - 0.18 * h, cx - 0.045 * w, hy - 0.1 * h], fill=acc)
    return img, horizon


def clutter(img: Image.Image, horizon: float, rng: np.random.Generator, count: int = 10) -> None:
    """Things scattered over `img` in place: books, plants, mugs and other objects of the world."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    colours = list(vocab.COLOURS.values())
    for _ in range(count):
        kind = int(rng.integers(0, 3))
        x, y = float(rng.uniform(0, 1)) * w, float(rng.uniform(horizon + 0.05, 1.0)) * h
        if kind == 0:  # a stack of books
            for i in range(int(rng.integers(2, 5))):
                bw, bh = float(rng.uniform(0.12, 0.2)) * h, 0.035 * h
                c = colours[int(rng.integers(len(colours)))]
                draw.rectangle([x - bw / 2, y - (i + 1) * bh, x + bw / 2, y - i * bh], fill=c, outline=shade(c, 0.6))
        elif kind == 1:  # a potted plant
            draw.polygon(
                [(x - 0.04 * h, y - 0.08 * h), (x + 0.04 * h, y - 0.08 * h), (x + 0.03 * h, y), (x - 0.03 * h, y)],
                fill=(170, 90, 50),
            )
            for dx, dy in ((-0.04, -0.15), (0.04, -0.15), (0.0, -0.2)):
                r = 0.05 * h
                draw.ellipse([x + dx * h - r, y + dy * h - r, x + dx * h + r, y + dy * h + r], fill=(50, 130, 55))
        else:  # another object of the world, small
            size = int(float(rng.uniform(0.15, 0.25)) * h)
            layer = rotated(draw_object(sample_base(rng), size), float(rng.uniform(-30, 30)))
            layer = layer.crop(layer.getchannel("A").getbbox())  # standing on y, not floating above it
            img.paste(layer, (int(x - layer.width / 2), int(y - layer.height)), layer)
