"""Phone-style photos of a novel object: exactly what a user hands `sdlora prepare`.

`write_photos(out, k, count)` renders `count` photos of novel object `k` (objects.py) at 640x480,
on the world's backgrounds in turn, or with `clutter` in one cluttered room seen from slightly
different places each time (the case subject masks are for). Like a phone's, most are HEIC and
some JPEG, and some are stored sideways or upside down with an EXIF orientation tag (pillow-heif
writes it into a HEIC as the HEIF rotation) that a viewer, and `prepare`, must turn upright. With
`masks` the object's true mask of each photo, as displayed, goes there as `<stem>.png` (white =
object), ready for `sdlora prepare PHOTOS --masks FOLDER`. Deterministic for (k, count, seed, clutter).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdlora.errors import ConfigError
from sdlora.world import vocab
from sdlora.world.backgrounds import clutter as scatter
from sdlora.world.backgrounds import draw_background
from sdlora.world.objects import WorldObject, novel_object
from sdlora.world.scenes import Scene, random_scene, render

SIZE = (640, 480)  # as displayed: landscape 4:3
ROOM = "table"  # the cluttered room's background
ROOM_SCALE = 1.5  # the room is this much larger than a photo; each photo frames part of it
# Photo i is stored with orientation PLAN[i % len(PLAN)] and format FORMATS[i % len(FORMATS)]:
# upright, sideways both ways and upside down, in both HEIC and JPEG within the first eight.
ORIENTATIONS = (1, 6, 1, 8, 1, 3, 1, 6)
FORMATS = ("HEIC", "JPEG", "HEIC", "HEIC", "JPEG", "HEIC", "HEIC", "JPEG")
SUFFIX = {"HEIC": ".HEIC", "JPEG": ".JPG"}
SAVE_AS = {"HEIC": "HEIF", "JPEG": "JPEG"}  # Pillow's format names (pillow-heif registers HEIF)
QUALITY = {"HEIC": 80, "JPEG": 90}
# x265's fastest preset: 0.07 s a photo against the default's 0.66 s, and the decoded pixels as close to the
# rendered ones (0.90 against 0.81 levels of 255, mean absolute); phone encoders do not search hard either.
ENCODER = {"HEIC": {"enc_params": {"preset": "ultrafast"}}, "JPEG": {}}
MAX_COUNT = 10_000


@dataclass(frozen=True)
class Photo:
    name: str  # file name: IMG_0001.HEIC
    image: Image.Image  # as displayed
    mask: np.ndarray  # bool, as displayed
    scene: Scene
    format: str
    orientation: int  # EXIF orientation stored with it (1 = upright)


def stored(img: Image.Image, orientation: int) -> Image.Image:
    """The pixels a camera stores when a viewer must apply `orientation` to show `img`."""
    # 6 = turn 90 degrees clockwise to display, so the stored pixels are turned counter-clockwise.
    turn = {1: 0, 3: 180, 6: 90, 8: -90}[orientation]
    return img.rotate(turn, expand=True) if turn else img


def room(seed: int) -> Image.Image:
    """The cluttered room that every photo of a `--clutter` set is taken in."""
    rng = np.random.default_rng([seed, 1])
    size = (round(SIZE[0] * ROOM_SCALE), round(SIZE[1] * ROOM_SCALE))
    img, horizon = draw_background(ROOM, size, rng)
    scatter(img, horizon, rng, count=14)
    return img


def _framed(backdrop: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Part of the room, as one photo frames it: a 4:3 window at a random place and zoom."""
    zoom = float(rng.uniform(0.7, 0.95))
    w, h = round(backdrop.width * zoom), round(backdrop.width * zoom * SIZE[1] / SIZE[0])
    x, y = int(rng.integers(0, backdrop.width - w + 1)), int(rng.integers(0, backdrop.height - h + 1))
    return backdrop.crop((x, y, x + w, y + h)).resize(SIZE, Image.Resampling.BICUBIC)


def render_photos(k: int, count: int, seed: int = 0, clutter: bool = False) -> list[Photo]:
    """The photos of novel object `k`, as displayed, with their masks and how each is stored."""
    if not 1 <= count <= MAX_COUNT:
        raise ConfigError(f"--count {count}: give between 1 and {MAX_COUNT} photos")
    obj: WorldObject = novel_object(k)
    rng = np.random.default_rng([seed, 0])
    backgrounds = [str(b) for b in rng.permutation(list(vocab.BACKGROUNDS))]
    backdrop = room(seed) if clutter else None
    photos = []
    for i in range(count):
        background = ROOM if clutter else backgrounds[i % len(backgrounds)]
        scene = random_scene(rng, obj=obj, background=background)
        framed = _framed(backdrop, rng) if backdrop is not None else None
        image, mask = render(scene, SIZE, backdrop=framed)
        fmt, orientation = FORMATS[i % len(FORMATS)], ORIENTATIONS[i % len(ORIENTATIONS)]
        photos.append(Photo(f"IMG_{i + 1:04d}{SUFFIX[fmt]}", image, mask, scene, fmt, orientation))
    return photos


def write_photos(
    out: str | Path, k: int, count: int, seed: int = 0, clutter: bool = False, masks: str | Path | None = None
) -> list[Path]:
    """Write the photos of novel object `k` into `out` (and their masks into `masks`), each
    atomically; return the photos' paths."""
    import pillow_heif

    from sdlora.fsutil import atomic_path

    pillow_heif.register_heif_opener()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: not a folder")
    if masks is not None and Path(masks).resolve().is_relative_to(out.resolve()):
        raise ConfigError(f"--masks {masks}: put the masks outside --out, or prepare would take them for photos")
    paths = []
    for photo in render_photos(k, count, seed, clutter):
        path = out / photo.name
        exif = Image.Exif()
        if photo.orientation != 1:
            exif[0x0112] = photo.orientation
        with atomic_path(path) as tmp:
            pixels = stored(photo.image, photo.orientation)
            pixels.save(
                tmp,
                format=SAVE_AS[photo.format],
                quality=QUALITY[photo.format],
                exif=exif.tobytes(),
                **ENCODER[photo.format],
            )
        if masks is not None:
            with atomic_path(Path(masks) / f"{Path(photo.name).stem}.png") as tmp:
                Image.fromarray(photo.mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        paths.append(path)
    return paths
