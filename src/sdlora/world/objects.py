"""Objects of the world: compositions of parts, the base/novel split, and drawing one.

An object is a class (its silhouette), a colour, a pattern in a second colour, and optional
features (eyes, wheels, a handle), plus continuous details (proportions, the pattern's scale and
angle, the eyes' size) that make one instance. The discrete part, `Composition`, is what the
split is over:

- a composition is **held out** when the first 8 bytes of sha256 of its key, as an integer,
  are divisible by HOLD_OUT (a quarter of the space, spread over every class, colour and
  pattern, so each word is still seen in base training: only the combination is new);
- base scenes (the models' training data) draw only compositions that are not held out;
- novel object K is held-out composition number K mod len(held_out()) in a seeded shuffle, with
  details from a seed of K: for K below that count every novel object is a combination the base
  models never saw, and beyond it the combinations come round again with new details.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from sdlora.world import vocab

HOLD_OUT = 4  # one composition in HOLD_OUT is held out for novel objects
NOVEL_SHUFFLE_SEED = 19  # the order of the held-out compositions, so novel object 0 is not always a toy
SMOOTH_AT = 256  # a layer smaller than this many pixels is drawn larger and reduced, for smooth edges


@dataclass(frozen=True)
class Composition:
    cls: str
    colour: str
    pattern: str  # "plain" or a key of vocab.PATTERNS
    pattern_colour: str | None  # None exactly when plain
    features: tuple[str, ...]  # optional features (not the class's built-in ones), in vocab.FEATURES order

    @property
    def key(self) -> str:
        return "|".join([self.cls, self.colour, self.pattern, self.pattern_colour or "-", "+".join(self.features)])

    @property
    def held_out(self) -> bool:
        return int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:8], "big") % HOLD_OUT == 0

    @property
    def drawn_features(self) -> frozenset[str]:
        return vocab.BUILT_IN[self.cls] | set(self.features)

    @property
    def phrase(self) -> str:
        return vocab.object_phrase(self.cls, self.colour, self.pattern, self.pattern_colour, self.features)


@dataclass(frozen=True)
class Details:
    """The continuous look of one instance."""

    aspect: float = 1.0  # width stretch of the silhouette
    pattern_count: int = 4  # stripes or checks across the body; dots per row
    pattern_angle: float = 0.0  # degrees
    eye_scale: float = 1.0

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "Details":
        return cls(
            aspect=float(rng.uniform(0.85, 1.15)),
            pattern_count=int(rng.integers(3, 7)),
            pattern_angle=float(rng.choice([0.0, 45.0, 90.0, 135.0])),
            eye_scale=float(rng.uniform(0.8, 1.25)),
        )


@dataclass(frozen=True)
class WorldObject:
    composition: Composition
    details: Details


def optional_features(cls: str) -> list[str]:
    return [f for f in vocab.FEATURES if f not in vocab.BUILT_IN[cls]]


@functools.cache
def compositions() -> tuple[Composition, ...]:
    """Every composition of the world, in a fixed order."""
    out = []
    for cls in vocab.CLASSES:
        extras = optional_features(cls)
        subsets = [combo for n in range(len(extras) + 1) for combo in itertools.combinations(extras, n)]
        for colour in vocab.COLOURS:
            for pattern in vocab.PATTERNS:
                second = [None] if pattern == "plain" else [c for c in vocab.COLOURS if c != colour]
                for pattern_colour in second:
                    for features in subsets:
                        out.append(Composition(cls, colour, pattern, pattern_colour, tuple(features)))
    return tuple(out)


@functools.cache
def base_compositions() -> tuple[Composition, ...]:
    return tuple(c for c in compositions() if not c.held_out)


@functools.cache
def held_out() -> tuple[Composition, ...]:
    """The held-out compositions in novel-object order."""
    kept = [c for c in compositions() if c.held_out]
    order = np.random.default_rng(NOVEL_SHUFFLE_SEED).permutation(len(kept))
    return tuple(kept[i] for i in order)


def sample_base(rng: np.random.Generator) -> WorldObject:
    """A random object of the base distribution: a composition that is not held out, fresh details.

    Drawn attribute by attribute (class, colour, pattern...) and redrawn when held out, so each
    word is about equally common, whatever its number of combinations."""
    while True:
        cls = str(rng.choice(vocab.CLASSES))
        colour = str(rng.choice(list(vocab.COLOURS)))
        pattern = str(rng.choice(list(vocab.PATTERNS)))
        pattern_colour = None if pattern == "plain" else str(rng.choice([c for c in vocab.COLOURS if c != colour]))
        features = tuple(f for f in optional_features(cls) if rng.random() < 0.3)
        comp = Composition(cls, colour, pattern, pattern_colour, features)
        if not comp.held_out:
            return WorldObject(comp, Details.sample(rng))


def novel_object(k: int) -> WorldObject:
    """Novel object `k` (any integer): a held-out composition with details fixed by `k`."""
    pool = held_out()
    rng = np.random.default_rng([NOVEL_SHUFFLE_SEED, k & 0xFFFFFFFF, (k >> 32) & 0xFFFFFFFF, k < 0])
    return WorldObject(pool[k % len(pool)], Details.sample(rng))


# ---------------------------------------------------------------------------------------- drawing


def shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, v * factor))) for v in rgb)


def _pattern_fill(size: int, comp: Composition, d: Details) -> Image.Image:
    """The body's paint: the colour, with the pattern in the second colour, over the whole canvas
    (the silhouette cuts it). Drawn unrotated on a larger canvas, then turned and cropped."""
    base = vocab.COLOURS[comp.colour]
    if comp.pattern == "plain":
        return Image.new("RGB", (size, size), base)
    second = vocab.COLOURS[comp.pattern_colour]
    big = int(size * 1.5)
    img = Image.new("RGB", (big, big), base)
    draw = ImageDraw.Draw(img)
    step = size / d.pattern_count
    n = int(big / step) + 2
    if comp.pattern == "stripes":
        for i in range(n):
            x = i * step
            draw.rectangle([x, 0, x + step * 0.4, big], fill=second)
    elif comp.pattern == "dots":
        r = step * 0.3
        for i, j in itertools.product(range(n), range(n)):
            cx, cy = (i + 0.5 * (j % 2)) * step, j * step * 0.87
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=second)
    else:  # checks
        for i, j in itertools.product(range(n), range(n)):
            if (i + j) % 2:
                draw.rectangle([i * step, j * step, (i + 1) * step, (j + 1) * step], fill=second)
    img = img.rotate(d.pattern_angle, resample=Image.Resampling.NEAREST)
    off = (big - size) // 2
    return img.crop((off, off, off + size, off + size))


def _silhouette(cls: str, a: float) -> tuple[list[tuple[str, tuple]], dict]:
    """The patterned body parts of a class as (shape, box-or-points) in unit coordinates, and the
    anchors of its features: eyes (centre x, y, radius), wheels [(x, y, r)], handle box, legs."""
    w = lambda x: 0.5 + (x - 0.5) * a  # noqa: E731 -- stretch about the centre
    if cls == "ball":
        r = 0.36
        body = [("ellipse", (w(0.5 - r), 0.48 - r, w(0.5 + r), 0.48 + r))]
        return body, {
            "eyes": (0.5, 0.4, 0.07),
            "wheels": [(w(0.3), 0.86, 0.1), (w(0.7), 0.86, 0.1)],
            "handle": (w(0.8), 0.32, w(0.97), 0.64),
        }
    if cls == "cup":
        body = [("poly", ((w(0.2), 0.22), (w(0.72), 0.22), (w(0.66), 0.84), (w(0.26), 0.84)))]
        return body, {
            "eyes": (0.46, 0.45, 0.07),
            "wheels": [(w(0.3), 0.88, 0.09), (w(0.62), 0.88, 0.09)],
            "handle": (w(0.62), 0.32, w(0.9), 0.68),
            "rim": (w(0.2), 0.17, w(0.72), 0.27),
        }
    if cls == "robot":
        body = [("rect", (w(0.25), 0.42, w(0.75), 0.78)), ("rect", (w(0.33), 0.14, w(0.67), 0.38))]
        return body, {
            "eyes": (0.5, 0.25, 0.055),
            "wheels": [(w(0.33), 0.85, 0.09), (w(0.67), 0.85, 0.09)],
            "handle": (w(0.7), 0.46, w(0.92), 0.72),
            "legs": [(w(0.3), 0.78, w(0.42), 0.95), (w(0.58), 0.78, w(0.7), 0.95)],
            "antenna": (0.5, 0.14, 0.04),
        }
    if cls == "car":
        body = [("rrect", (w(0.04), 0.45, w(0.96), 0.74)), ("rrect", (w(0.24), 0.25, w(0.72), 0.5))]
        return body, {
            "eyes": (0.83, 0.55, 0.05),
            "wheels": [(w(0.25), 0.76, 0.12), (w(0.75), 0.76, 0.12)],
            "handle": (w(0.9), 0.38, w(1.0), 0.62),
            "window": (w(0.3), 0.3, w(0.66), 0.45),
        }
    if cls == "bottle":
        body = [("rrect", (w(0.3), 0.36, w(0.7), 0.92)), ("rect", (w(0.42), 0.14, w(0.58), 0.38))]
        return body, {
            "eyes": (0.5, 0.56, 0.06),
            "wheels": [(w(0.34), 0.92, 0.08), (w(0.66), 0.92, 0.08)],
            "handle": (w(0.64), 0.44, w(0.85), 0.74),
            "cap": (w(0.4), 0.07, w(0.6), 0.16),
        }
    # toy: a plush creature, a round body with a head and ears
    body = [
        ("ellipse", (w(0.24), 0.42, w(0.76), 0.9)),
        ("ellipse", (w(0.3), 0.12, w(0.7), 0.5)),
        ("ellipse", (w(0.27), 0.08, w(0.39), 0.22)),
        ("ellipse", (w(0.61), 0.08, w(0.73), 0.22)),
    ]
    return body, {
        "eyes": (0.5, 0.3, 0.06),
        "wheels": [(w(0.32), 0.9, 0.09), (w(0.68), 0.9, 0.09)],
        "handle": (w(0.68), 0.5, w(0.92), 0.78),
        "feet": [(w(0.28), 0.82, w(0.44), 0.96), (w(0.56), 0.82, w(0.72), 0.96)],
    }


def draw_object(obj: WorldObject, size: int) -> Image.Image:
    """The object on a transparent `size` x `size` RGBA layer, upright, facing right; its alpha is its mask."""
    comp, d = obj.composition, obj.details
    s = size * max(1, min(4, -(-SMOOTH_AT // size)))
    px = lambda box: tuple(v * s for v in box)  # noqa: E731
    body, at = _silhouette(comp.cls, d.aspect)
    feats = comp.drawn_features
    colour = vocab.COLOURS[comp.colour]
    dark = shade(colour, 0.85) if comp.colour != "black" else (70, 70, 75)

    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    line = max(1, round(0.035 * s))
    if "handle" in feats:  # behind the body: a thick ring whose inner part the body hides
        draw.ellipse(px(at["handle"]), outline=dark, width=max(2, round(0.06 * s)))
    for box in at.get("legs", []) if "wheels" not in feats else []:
        draw.rectangle(px(box), fill=dark)
    for box in at.get("feet", []) if "wheels" not in feats else []:
        draw.ellipse(px(box), fill=dark)
    if "antenna" in at:
        x, y, r = at["antenna"]
        draw.line([x * s, y * s, x * s, (y - 0.08) * s], fill=dark, width=line)
        draw.ellipse([(x - r) * s, (y - 0.08 - r) * s, (x + r) * s, (y - 0.08 + r) * s], fill=dark)
    if "cap" in at:
        draw.rectangle(px(at["cap"]), fill=dark)

    shape = Image.new("L", (s, s), 0)  # the patterned body
    sd = ImageDraw.Draw(shape)
    for kind, geom in body:
        if kind == "ellipse":
            sd.ellipse(px(geom), fill=255)
        elif kind == "rect":
            sd.rectangle(px(geom), fill=255)
        elif kind == "rrect":
            sd.rounded_rectangle(px(geom), radius=round(0.08 * s), fill=255)
        else:
            sd.polygon([(x * s, y * s) for x, y in geom], fill=255)
    layer.paste(_pattern_fill(s, comp, d), (0, 0), shape)

    if "rim" in at:
        draw.ellipse(px(at["rim"]), fill=dark)
    if "window" in at:
        draw.rounded_rectangle(px(at["window"]), radius=round(0.03 * s), fill=vocab.WINDOW)
    if "wheels" in feats:
        for x, y, r in at["wheels"]:
            draw.ellipse([(x - r) * s, (y - r) * s, (x + r) * s, (y + r) * s], fill=vocab.WHEEL)
            h = r * 0.4
            draw.ellipse([(x - h) * s, (y - h) * s, (x + h) * s, (y + h) * s], fill=vocab.HUB)
    if "eyes" in feats:
        x, y, r = at["eyes"]
        r *= d.eye_scale
        gap = 2.2 * r if comp.cls != "car" else 0.0  # a car has one headlight-eye, seen from the side
        for cx in [x - gap / 2 - r * 0.1, x + gap / 2 + r * 0.1] if gap else [x]:
            draw.ellipse([(cx - r) * s, (y - r) * s, (cx + r) * s, (y + r) * s], fill=vocab.EYE_WHITE)
            p = r * 0.5
            draw.ellipse([(cx + 0.2 * r - p) * s, (y - p) * s, (cx + 0.2 * r + p) * s, (y + p) * s], fill=vocab.PUPIL)
    return layer.resize((size, size), Image.Resampling.BOX)


def rotated(layer: Image.Image, degrees: float) -> Image.Image:
    return layer if abs(degrees) < 1e-6 else layer.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True)
