"""Decode one photo the way a phone displays it, and make its training image.

The training image is a square (center crop or white pad) or, with `keep_aspect`, the photo's
aspect-ratio bucket (data/buckets.py): resized to cover it and center-cropped.

Runs inside decode worker processes, so it imports only Pillow, pillow-heif, numpy and the
bucket arithmetic. Every problem with a file becomes a `BadImage` with a short reason category
(for the summary table) and a detail; nothing here knows about datasets, manifests or the CLI.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from sdlora.data.buckets import bucket_size, cover_crop, geometry

CROPS: tuple[str, ...] = ("center", "pad")

# Room for 200-MP phone photos (16320x12240); Pillow's default refuses anything above ~179 MP.
MAX_PIXELS = 256_000_000
# What one decode worker may hold for one photo: the decoded pixels and the conversions to RGB
# (bytes per pixel of each mode below), after a JPEG's draft (1/2..1/8 scale). A 200-MP JPEG
# drafts to a few MP; a 48-MP HEIC needs ~150 MB; a 16-bit 16000x16000 PNG (0.5 MB on disk)
# would need 2.8 GB and is refused as "too large" before it is decoded.
MAX_DECODE_BYTES = 1 << 30
_WORK_BYTES_PER_PIXEL = {  # decoded + every copy `_to_rgb` makes
    "1": 4, "L": 4, "P": 16, "PA": 16, "LA": 15, "La": 15, "RGB": 3, "YCbCr": 6, "RGBA": 15, "RGBa": 15,
    "CMYK": 7, "LAB": 6, "HSV": 6, "I;16": 11, "I;16B": 11, "I;16L": 11, "I": 13, "F": 8,
}  # fmt: skip
# Resize by a cheap integer box-reduce until within 2x of the target, then LANCZOS: Pillow's
# documented speed/quality trade-off; 2x faster than plain LANCZOS on a 12-MP photo.
REDUCING_GAP = 2.0
PNG_COMPRESS_LEVEL = 3  # 3x faster than Pillow's default 6 for ~5% larger files

# Reason categories shown in the summary table.
EMPTY = "empty file"
NOT_IMAGE = "not an image"
CORRUPT = "corrupt or truncated"
TOO_LARGE = "too large"

_heif_ready = False


class BadImage(Exception):
    """A file that cannot become a training image; `reason` is a table category."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def register_heif(decode_threads: int | None = None) -> None:
    """Teach Pillow to open HEIC/HEIF (once per process); optionally pin libheif's threads.

    Decode workers use one libheif thread each: the parallelism comes from the processes.
    """
    global _heif_ready
    import pillow_heif

    if not _heif_ready:
        pillow_heif.register_heif_opener()
        _heif_ready = True
    if decode_threads is not None:
        pillow_heif.options.DECODE_THREADS = decode_threads


class BadMask(Exception):
    """A user's mask file that cannot become its photo's mask (not an image, another shape)."""


@dataclass
class Prepared:
    image: Image.Image  # RGB at `target_size`: square, or the photo's bucket with keep_aspect
    original_size: tuple[int, int]  # (width, height) after orientation, before crop/resize
    format: str  # what Pillow called the file ("HEIF", "JPEG", ...)
    # Grayscale ("L") mask at the image's size, through exactly the image's transform: the photo's
    # alpha channel (`alpha=True`; None when it has none or it is fully opaque) or the user's mask.
    mask: Image.Image | None = None
    frames: int = 1  # frames (an animation) or pages (a TIFF) in the file; only the first is used


# Formats whose extra frames are pictures a user may have meant (an animation, a TIFF's pages); the
# extra images of MPO (a camera JPEG's preview) or HEIF (depth, thumbnails) are not, and go unmentioned.
MULTI_FRAME = {"GIF": "animated GIF", "WEBP": "animated WebP", "PNG": "animated PNG", "TIFF": "multi-page TIFF"}


def square_side(size: tuple[int, int], crop: str) -> int:
    """Side of the square region that becomes the training image (before resizing)."""
    return min(size) if crop == "center" else max(size)


def target_size(size: tuple[int, int], resolution: int, keep_aspect: bool = False) -> tuple[int, int]:
    """(width, height) of the training image made from an oriented photo of `size` (data/buckets.py
    `geometry`, which gives train the same size)."""
    (height, width), _crop_top_left = geometry(size, resolution, keep_aspect=keep_aspect, crop="center")
    return width, height


def scale_factor(size: tuple[int, int], resolution: int, crop: str = "center", keep_aspect: bool = False) -> float:
    """How much the oriented photo is scaled to make its training image (above 1: upscaled)."""
    if keep_aspect:
        tw, th = bucket_size(*size, resolution)
        return max(tw / size[0], th / size[1])  # cover the bucket, as `cover_crop` does
    return resolution / square_side(size, crop)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited over white (not black, as a plain convert would)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: convert("RGB") would clip to white; scale to 8 bits first.
        import numpy as np

        arr = np.asarray(img, dtype=np.uint32)
        img = Image.fromarray((arr >> (8 if arr.max() > 255 else 0)).astype("uint8"), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _draft(img: Image.Image, scale: float) -> None:
    """Let the JPEG decoder scale by 1/2, 1/4 or 1/8 while keeping at least `scale` of each side.

    `scale` is the training image's scale factor; it is the same for both sides, so it holds
    for the stored (not yet EXIF-rotated) width and height alike.
    """
    if img.format != "JPEG" or scale >= 1:
        return
    w, h = img.size
    img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))


def _filter(img: Image.Image) -> Image.Resampling:
    """LANCZOS for photos; BILINEAR for masks ("L"), whose hard edges LANCZOS would ring around.
    The geometry (crop box, size, padding) is the same for both."""
    return Image.Resampling.BILINEAR if img.mode == "L" else Image.Resampling.LANCZOS


def square(img: Image.Image, resolution: int, crop: str) -> Image.Image:
    """Center-crop (`center`) or pad (`pad`: white for a photo, 0 = background for a mask) to a
    square and resize (LANCZOS; a mask BILINEAR)."""
    w, h = img.size
    if crop == "center":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
        return img.resize((resolution, resolution), _filter(img), box=box, reducing_gap=REDUCING_GAP)
    if crop == "pad":
        side = max(w, h)
        scale = resolution / side
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        inner = img.resize((nw, nh), _filter(img), reducing_gap=REDUCING_GAP)
        canvas = Image.new(img.mode, (resolution, resolution), 0 if img.mode == "L" else (255, 255, 255))
        canvas.paste(inner, ((resolution - nw) // 2, (resolution - nh) // 2))
        return canvas
    raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")


def cover(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Resize (LANCZOS; a mask BILINEAR) to cover `target` and center-crop to exactly it, in one pass."""
    w, h = img.size
    (rw, rh), (top, left) = cover_crop(w, h, target)
    sx, sy = w / rw, h / rh  # the crop box in source pixels: crop and resize at once
    box = (left * sx, top * sy, (left + target[0]) * sx, (top + target[1]) * sy)
    return img.resize(target, _filter(img), box=box, reducing_gap=REDUCING_GAP)


def _alpha(img: Image.Image) -> Image.Image | None:
    """The photo's alpha channel ("L"), or None when it has none or it is fully opaque."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = img.getchannel("A")
    elif img.mode == "P" and "transparency" in img.info:
        alpha = img.convert("RGBA").getchannel("A")
    else:
        return None
    return None if alpha.getextrema() == (255, 255) else alpha


def _user_mask(data: bytes, oriented: tuple[int, int], work_size: tuple[int, int]) -> Image.Image:
    """A user's mask file ("L", white = object) at the decoded photo's size, ready for its transform.

    Its own EXIF orientation is applied. It must have the photo's size as displayed, or the same
    shape (a mask exported smaller or larger is scaled); any other shape is refused (BadMask).
    """
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            mask = ImageOps.exif_transpose(opened)
    except Exception as exc:  # noqa: BLE001 - not an image, truncated, broken EXIF
        raise BadMask(f"is not a readable image ({short_error(exc)})") from None
    mw, mh = mask.size
    ow, oh = oriented
    if (mw, mh) != (ow, oh) and abs(mw * oh - mh * ow) > max(mw, mh, ow, oh):  # off by over a pixel
        raise BadMask(f"is {mw}x{mh} but its photo is {ow}x{oh} as displayed; make the mask the photo's size")
    if mask.mode in ("RGBA", "LA", "PA") and mask.getchannel("A").getextrema()[0] < 255:
        mask = mask.getchannel("A")  # a cut-out given as the mask: its opaque part is the object
    if mask.mode in ("I;16", "I;16B", "I;16L", "I"):  # a 16-bit mask: convert("L") would clip it to white
        import numpy as np

        arr = np.asarray(mask, dtype=np.uint32)
        mask = Image.fromarray((arr >> (8 if arr.max() > 255 else 0)).astype("uint8"), "L")
    mask = mask.convert("L")
    return mask if mask.size == work_size else mask.resize(work_size, Image.Resampling.BILINEAR)


def prepare_image(
    source: str | Path | bytes,
    resolution: int,
    crop: str = "center",
    keep_aspect: bool = False,
    *,
    alpha: bool = False,
    mask: bytes | None = None,
) -> Prepared:
    """Decode, orient (EXIF orientation; libheif applies HEIF transforms), RGB, then square and
    resize, or with `keep_aspect` cover and crop to the photo's bucket (`target_size`).

    With `alpha` the photo's alpha channel, or with `mask` (a user's mask file's bytes) that mask,
    goes through the same orientation, crop or pad and resize and comes back as `Prepared.mask`.
    Raises BadImage for anything that is not a readable image, BadMask for an unusable `mask`.
    """
    if crop not in CROPS or (keep_aspect and crop != "center"):
        raise ValueError(f"crop must be one of {CROPS} (center with keep_aspect), got {crop!r}")
    register_heif()
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not data:
        raise BadImage(EMPTY)
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2  # Pillow errors at twice this, warns above it
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated photo is reported, not half-grey
    try:
        with warnings.catch_warnings():  # a big photo is judged by `_check_work` below, not by a raw warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage(NOT_IMAGE) from None
    except Image.DecompressionBombError as exc:
        raise BadImage(TOO_LARGE, short_error(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file, never a crash
        raise BadImage(CORRUPT, short_error(exc)) from None
    try:
        with img:
            img.seek(0)  # first frame of an animation or the primary image of a HEIF collection
            frames = int(getattr(img, "n_frames", 1) or 1) if img.format in MULTI_FRAME else 1
            # pillow-heif has already applied the HEIF rotation/mirror and set EXIF orientation to 1,
            # so exif_transpose only acts on JPEG/PNG/WebP/TIFF orientation tags: nothing turns twice.
            if img.format != "JPEG":  # a PNG's getexif() decodes the whole image: judge its size first
                _check_work(img, img.size)
            original = _oriented_size(img)
            _draft(img, scale_factor(original, resolution, crop, keep_aspect))
            _check_work(img, original)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no copy of a 12-MP image when upright
            shape = _alpha(img) if alpha else None
            rgb = _to_rgb(img)
            if mask is not None:
                shape = _user_mask(mask, original, rgb.size)
            # The bucket comes from the full-size photo: drafting rounds its sides slightly.
            target = target_size(original, resolution, True)
            out = cover(rgb, target) if keep_aspect else square(rgb, resolution, crop)
            if shape is not None:  # the mask: exactly the photo's transform
                shape = cover(shape, target) if keep_aspect else square(shape, resolution, crop)
    except (BadImage, BadMask):
        raise
    except Image.DecompressionBombError:
        raise BadImage(TOO_LARGE, _pixels(img.size)) from None
    except Exception as exc:  # noqa: BLE001 - truncated data, broken EXIF, decoder errors
        raise BadImage(CORRUPT, short_error(exc)) from None
    return Prepared(out, original, img.format or "?", shape, frames)


def first_frame_note(fmt: str, frames: int) -> str | None:
    """ "animated GIF, 12 frames" for a file of which only the first frame is trained on, else None."""
    return f"{MULTI_FRAME[fmt]}, {frames} {'pages' if fmt == 'TIFF' else 'frames'}" if frames > 1 else None


def _pixels(size: tuple[int, int]) -> str:
    return f"{size[0]} x {size[1]} pixels"


def _check_work(img: Image.Image, original: tuple[int, int]) -> None:
    """BadImage("too large") when decoding `img` (at its drafted size) would take more than
    MAX_DECODE_BYTES of one worker's memory, or it has more than MAX_PIXELS pixels."""
    w, h = img.size
    work = w * h * _WORK_BYTES_PER_PIXEL.get(img.mode, 16)
    if work > MAX_DECODE_BYTES or original[0] * original[1] > MAX_PIXELS:
        raise BadImage(TOO_LARGE, _pixels(original))


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: treat as upright
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def short_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:120]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def pixel_digest(img: Image.Image) -> str:
    """Checksum of the prepared pixels: equal decoded photos give equal prepared pixels."""
    return hashlib.sha256(img.tobytes()).hexdigest()


def perceptual_hash(img: Image.Image) -> str:
    """64-bit DCT perceptual hash (imagehash.phash) as hex; compare with `hash_distance`."""
    import imagehash

    return str(imagehash.phash(img))


def hash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex perceptual hashes."""
    return bin(int(a, 16) ^ int(b, 16)).count("1")
