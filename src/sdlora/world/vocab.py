"""The world's vocabulary, declared once: classes, colours, patterns, features, backgrounds.

Captions (scenes.py), the zero-shot label sets of the world's CLIP and the prompts of the demo
and the learning tests all read these tables, so a word means one thing everywhere. Colours are
far apart in RGB (a 32 px model must tell them apart); each background has its own palette.
"""

from __future__ import annotations

from dataclasses import dataclass

# Object classes, by the word a caption uses. Each has its own silhouette (objects.py draws it).
CLASSES = ("toy", "cup", "ball", "robot", "car", "bottle")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (250, 215, 30),
    "green": (40, 165, 60),
    "blue": (35, 80, 220),
    "purple": (130, 50, 180),
    "pink": (250, 140, 190),
    "white": (242, 242, 238),
    "black": (30, 30, 32),
    "brown": (125, 75, 35),
}

# Pattern -> the phrase a caption uses with its colour ("with yellow stripes"); "plain" says nothing.
PATTERNS: dict[str, str] = {
    "plain": "",
    "stripes": "stripes",
    "dots": "dots",
    "checks": "checks",
}

# Optional features -> caption phrase. A class's built-in parts (a car's wheels, a cup's handle,
# a toy's eyes) are always drawn and never named: every car has wheels.
FEATURES: dict[str, str] = {
    "eyes": "eyes",
    "wheels": "wheels",
    "handle": "a handle",
}
BUILT_IN: dict[str, frozenset[str]] = {
    "toy": frozenset({"eyes"}),
    "cup": frozenset({"handle"}),
    "ball": frozenset(),
    "robot": frozenset(),
    "car": frozenset({"wheels"}),
    "bottle": frozenset(),
}


@dataclass(frozen=True)
class Background:
    phrase: str  # what a caption and a prompt say: "on the beach"
    sky: tuple[int, int, int]
    ground: tuple[int, int, int]
    accent: tuple[int, int, int]  # the colour of its few shapes (sun, clouds, buildings, trees...)
    horizon: float  # where the ground starts, as a share of the height


BACKGROUNDS: dict[str, Background] = {
    "beach": Background("on the beach", (135, 200, 240), (235, 210, 150), (40, 120, 190), 0.55),
    "snow": Background("in the snow", (200, 210, 222), (250, 250, 252), (150, 165, 185), 0.5),
    "grass": Background("on the grass", (120, 185, 245), (70, 160, 50), (250, 250, 250), 0.5),
    "table": Background("on a table", (225, 215, 195), (150, 95, 55), (95, 130, 150), 0.6),
    "city": Background("in a city", (170, 180, 190), (85, 85, 90), (110, 105, 120), 0.62),
    "night": Background("at night", (15, 20, 55), (25, 35, 40), (245, 240, 200), 0.6),
    "forest": Background("in the forest", (175, 210, 190), (95, 70, 40), (25, 90, 45), 0.6),
    "desert": Background("in the desert", (245, 190, 120), (215, 160, 90), (60, 130, 70), 0.55),
}

# Neutral colours for parts that carry no colour word.
WHEEL = (25, 25, 28)
HUB = (190, 190, 195)
EYE_WHITE = (250, 250, 250)
PUPIL = (15, 15, 15)
WINDOW = (170, 215, 240)


def object_phrase(cls: str, colour: str, pattern: str, pattern_colour: str | None, features: tuple[str, ...]) -> str:
    """ "red toy with yellow stripes and wheels": the object as captions and prompts name it."""
    withs = []
    if pattern != "plain":
        withs.append(f"{pattern_colour} {PATTERNS[pattern]}")
    withs += [FEATURES[f] for f in features if f not in BUILT_IN[cls]]
    phrase = f"{colour} {cls}"
    if withs:
        phrase += " with " + (withs[0] if len(withs) == 1 else ", ".join(withs[:-1]) + " and " + withs[-1])
    return phrase


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(object_phrase: str, background: str) -> str:
    """ "a photo of a red toy with yellow stripes on the beach"."""
    return f"a photo of {article(object_phrase)} {object_phrase} {BACKGROUNDS[background].phrase}"


def class_labels() -> list[str]:
    """Zero-shot labels for the object's class, in CLASSES order."""
    return [f"a photo of {article(c)} {c}" for c in CLASSES]


def colour_labels() -> list[str]:
    """Zero-shot labels for the object's colour, in COLOURS order."""
    return [f"a photo of {article(c)} {c} object" for c in COLOURS]


def background_labels() -> list[str]:
    """Zero-shot labels for the background, in BACKGROUNDS order."""
    return [f"a photo of something {b.phrase}" for b in BACKGROUNDS.values()]


def prompts(subject: str) -> list[str]:
    """A subject (a token phrase such as "sksToy toy") in every background: the demo's and the
    learning tests' prompts."""
    return [f"a photo of {subject} {b.phrase}" for b in BACKGROUNDS.values()]
