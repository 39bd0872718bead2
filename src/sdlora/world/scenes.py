"""Scenes: one object of the world on a background, lit and shot like a phone photo, with its
caption and the object's true mask.

    rng = np.random.default_rng(0)
    image, caption, mask, scene = sample_scene(rng, 64)
    for batch in batches(seed=0, size=64, batch_size=32): ...

A `Scene` holds every choice (object, background, place, size, turn, light, blur, noise and the
seed of the background's shapes), so `render(scene, size)` is a pure function: the same scene
gives the same bytes at a size, and the same seed gives the same scenes. Base scenes draw only
objects of the base distribution (objects.py); pass `obj=novel_object(k)` for a novel one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sdlora.world import vocab
from sdlora.world.backgrounds import draw_background
from sdlora.world.objects import WorldObject, draw_object, rotated, sample_base

Size = int | tuple[int, int]  # an int is a square


@dataclass(frozen=True)
class Scene:
    obj: WorldObject
    background: str
    x: float  # the object's centre, a share of the width
    ground: float  # where the object stands, a share of the height
    scale: float  # the object's size, a share of the height
    angle: float  # degrees, counter-clockwise
    flip: bool  # seen from the other side
    brightness: float
    warmth: float  # red up and blue down by this share (negative: cooler)
    vignette: float  # darkening of the corners, 0..1
    blur: float  # Gaussian radius in pixels of a 256-px-high image
    noise: float  # sensor noise, standard deviation in 8-bit levels
    seed: int  # the background's shapes and the noise

    @property
    def caption(self) -> str:
        return vocab.caption(self.obj.composition.phrase, self.background)

    def attributes(self) -> dict:
        """What a caption or a zero-shot label can name."""
        c = self.obj.composition
        return {
            "class": c.cls,
            "colour": c.colour,
            "pattern": c.pattern,
            "pattern_colour": c.pattern_colour,
            "features": list(c.features),
            "background": self.background,
        }


class Sample(NamedTuple):
    image: Image.Image  # RGB
    caption: str
    mask: np.ndarray  # bool, (height, width): True where the object is
    scene: Scene


def random_scene(rng: np.random.Generator, *, obj: WorldObject | None = None, background: str | None = None) -> Scene:
    """A scene with every choice drawn from `rng`; `obj` and `background` fix those two."""
    obj = obj if obj is not None else sample_base(rng)
    background = background if background is not None else str(rng.choice(list(vocab.BACKGROUNDS)))
    scale = float(rng.uniform(0.4, 0.7))
    return Scene(
        obj=obj,
        background=background,
        x=float(rng.uniform(0.3, 0.7)),
        ground=float(rng.uniform(0.75, 0.97)),
        scale=scale,
        angle=float(rng.normal(0, 8)),
        flip=bool(rng.random() < 0.5),
        brightness=float(rng.uniform(0.88, 1.12)),
        warmth=float(rng.uniform(-0.06, 0.06)),
        vignette=float(rng.uniform(0.0, 0.3)),
        blur=float(rng.uniform(0.0, 1.2)),
        noise=float(rng.uniform(1.0, 5.0)),
        seed=int(rng.integers(2**63)),
    )


def _supersample(size: tuple[int, int]) -> int:
    return max(1, min(4, round(256 / min(size))))


def place(scene: Scene, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """The object's layer at `size`'s scale, turned, cropped to the object, and its top-left
    corner: standing on the scene's ground line, inside the frame."""
    w, h = size
    layer = draw_object(scene.obj, max(4, round(scene.scale * h)))
    if scene.flip:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    layer = rotated(layer, scene.angle)
    layer = layer.crop(layer.getchannel("A").getbbox())
    x = int(round(min(max(scene.x * w - layer.width / 2, 0), w - layer.width)))
    y = int(round(min(max(scene.ground * h - layer.height, 0), h - layer.height)))
    return layer, (x, y)


def render(scene: Scene, size: Size, backdrop: Image.Image | None = None) -> tuple[Image.Image, np.ndarray]:
    """The scene at `size` (an int for a square, or (width, height)) and the object's mask.

    `backdrop` replaces the drawn background (an RGB image of `size`: the photos' shared room)."""
    w, h = (size, size) if isinstance(size, int) else size
    ss = _supersample((w, h))
    big = (w * ss, h * ss)
    rng = np.random.default_rng(scene.seed)
    if backdrop is None:
        img, _ = draw_background(scene.background, big, rng)
    else:
        img = backdrop.convert("RGB").resize(big, Image.Resampling.BICUBIC)
    layer, (x, y) = place(scene, big)

    shadow = Image.new("L", big, 0)  # a soft contact shadow where the object stands
    sx, sy, sw = x + layer.width / 2, y + layer.height * 0.98, layer.width * 0.45
    ImageDraw.Draw(shadow).ellipse([sx - sw, sy - sw * 0.12, sx + sw, sy + sw * 0.12], fill=90)
    shadow = shadow.filter(ImageFilter.GaussianBlur(max(1, sw * 0.08)))
    img = Image.composite(Image.new("RGB", big, (0, 0, 0)), img, shadow)
    img.paste(layer, (x, y), layer)
    alpha = Image.new("L", big, 0)
    alpha.paste(layer.getchannel("A"), (x, y))

    if ss > 1:
        img, alpha = img.reduce(ss), alpha.reduce(ss)
    mask = np.asarray(alpha) >= 128
    return _photograph(img, scene, rng), mask


def _photograph(img: Image.Image, scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Light, a little blur and sensor noise, the way a phone's photos vary."""
    w, h = img.size
    if scene.blur * h / 256 >= 0.1:
        img = img.filter(ImageFilter.GaussianBlur(scene.blur * h / 256))
    a = np.asarray(img, dtype=np.float32)
    gain = np.array([1 + scene.warmth, 1.0, 1 - scene.warmth], dtype=np.float32) * scene.brightness
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    r2 = ((xx - cx) / w) ** 2 + ((yy - cy) / h) ** 2
    light = 1 - scene.vignette * np.clip(r2 / 0.5, 0, 1)
    a = a * gain * light[..., None]
    noise = rng.normal(0, scene.noise, size=(h, w, 1)) * 0.6 + rng.normal(0, scene.noise, size=(h, w, 3)) * 0.4
    return Image.fromarray(np.clip(a + noise, 0, 255).round().astype(np.uint8))


def sample_scene(
    rng: np.random.Generator, size: Size, *, obj: WorldObject | None = None, background: str | None = None
) -> Sample:
    """A random scene from `rng`, rendered at `size`: (image, caption, mask, scene)."""
    scene = random_scene(rng, obj=obj, background=background)
    image, mask = render(scene, size)
    return Sample(image, scene.caption, mask, scene)


class Batch(NamedTuple):
    images: np.ndarray  # uint8, (batch, height, width, 3)
    captions: list[str]
    masks: np.ndarray  # bool, (batch, height, width)
    scenes: list[Scene]


def batches(seed: int, size: Size, batch_size: int, *, obj: WorldObject | None = None) -> Iterator[Batch]:
    """Endless batches of base scenes (or of `obj`), the same ones for the same seed."""
    rng = np.random.default_rng(seed)
    while True:
        samples = [sample_scene(rng, size, obj=obj) for _ in range(batch_size)]
        yield Batch(
            np.stack([np.asarray(s.image) for s in samples]),
            [s.caption for s in samples],
            np.stack([s.mask for s in samples]),
            [s.scene for s in samples],
        )
