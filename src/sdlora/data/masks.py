"""Subject masks of a prepared dataset: where they come from, how they are checked, how train reads them.

`sdlora prepare PHOTOS --masks auto|alpha|FOLDER` writes one 8-bit grayscale PNG per image under
`masks/`, named like the image (white = object), and records in manifest.json, per image, the mask
file (`ImageRecord.mask`), its source (`mask_source`: {"kind": "auto", "model", "revision"},
{"kind": "alpha"} or {"kind": "file", "path"}) and the share of the frame it covers
(`mask_coverage`). The sources:

- `auto`: a text-prompted segmentation model finds the object by its class word (data/automask.py);
- `alpha`: the photo's own alpha channel (cut-outs: iPhone "lift subject", background removers);
- a folder: the user's masks, matched to photos by file stem (data/caption_import.py `StemIndex`).

A photo's alpha or user mask goes through exactly its photo's transform (data/images.py
`prepare_image`); auto masks are computed on the prepared image itself, so they cover exactly what
is trained. Every mask is then dilated by `--mask-dilate` pixels (at 512 px; scaled with the
resolution) so the object's edges stay inside it, and checked (`mask_problem`).

For the training side: `load_mask(dataset_dir, record)` (a float32 array in [0, 1] at the image's
size, or None for an image without a mask) and `Manifest.has_masks`.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from sdlora.errors import ConfigError, DataError

MASKS = "masks"
AUTO = "auto"
ALPHA = "alpha"
FOLDER = "folder"
DEFAULT_MASK_MODEL = "CIDAS/clipseg-rd64-refined"
DEFAULT_MASK_PROMPT = "a photo of a {class}"
# CLIPSeg's sigmoid output is soft and rarely reaches 1 on thin parts: 0.5 cuts legs and handles
# away, 0.3 (OneTrainer's default) lets shadows in; 0.4 sits between, and the dilation restores edges.
DEFAULT_THRESHOLD = 0.4
DEFAULT_DILATE = 4  # pixels at 512 px: a thin band of background so the object's edges stay in
DILATE_AT = 512

# Quality checks shown in the summary table.
MIN_COVERAGE = 0.03
MAX_COVERAGE = 0.97
MAX_PIECES = 4  # more separate pieces than this: probably background bits, not one object
MIN_PIECE = 0.002  # a piece counts when it covers at least this share of the frame (specks do not)

# Why an image has no mask (a row in the summary table; it trains on the whole frame).
NO_ALPHA_CHANNEL = "no alpha channel"
NO_MASK_FILE = "no mask file"


@dataclass(frozen=True)
class MaskOptions:
    """`--masks` and its settings. `masks` is None (no masks), "auto", "alpha" or a folder."""

    masks: str | None = None
    model: str = DEFAULT_MASK_MODEL
    threshold: float = DEFAULT_THRESHOLD
    dilate: int = DEFAULT_DILATE

    @property
    def kind(self) -> str | None:
        if self.masks is None:
            return None
        return self.masks if self.masks in (AUTO, ALPHA) else FOLDER

    @property
    def folder(self) -> Path:
        return Path(self.masks or "").expanduser()

    def check(self) -> "MaskOptions":
        if self.masks is None:
            return self
        if self.kind == FOLDER:
            if not self.folder.is_dir():
                raise ConfigError(
                    f"--masks {self.masks}: no such folder; use auto, alpha or a folder of mask images (white = object)"
                )
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"--mask-threshold {self.threshold}: use a probability between 0 and 1, e.g. 0.4")
        if self.dilate < 0:
            raise ConfigError(f"--mask-dilate {self.dilate}: use 0 or more pixels, e.g. {DEFAULT_DILATE}")
        return self

    def dilate_px(self, resolution: int) -> int:
        """The dilation in pixels of an image at `resolution` (`dilate` is given at 512 px)."""
        return round(self.dilate * resolution / DILATE_AT)

    def settings(self) -> dict[str, Any]:
        """What manifest.json `options["masks"]` records."""
        out: dict[str, Any] = {"kind": self.kind, "dilate": self.dilate}
        if self.kind == FOLDER:
            out["folder"] = str(self.folder.resolve())
        if self.kind == AUTO:
            out.update(model=self.model, prompt=DEFAULT_MASK_PROMPT, threshold=self.threshold)
        return out


def mask_key(image_key: str, identity: str, dilate_px: int) -> str:
    """Content address of a mask: the image's key, where the mask comes from (the model and its
    revision with prompt and threshold, `alpha`, or the user file's checksum) and the dilation."""
    return hashlib.sha256(f"sdlora-mask|v1|{image_key}|{identity}|{dilate_px}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- one mask


@dataclass
class MaskResult:
    """A finished mask (PNG, checks) or why an image has none (`none`), or a bad user mask (`error`)."""

    png: bytes | None = None
    coverage: float = 0.0
    pieces: int = 0
    none: str | None = None  # the image keeps no mask, e.g. NO_ALPHA_CHANNEL
    error: str | None = None  # the user's mask file is unusable: the whole prepare is refused

    def cache_entry(self) -> dict[str, Any]:
        return {"coverage": self.coverage, "pieces": self.pieces, "none": self.none}


NO_ALPHA = MaskResult(none=NO_ALPHA_CHANNEL)


def dilate(arr: np.ndarray, px: int) -> np.ndarray:
    """Grey dilation by a (2 px + 1) square: the mask grows by `px` pixels on every side."""
    if px <= 0:
        return arr
    from scipy.ndimage import maximum_filter

    return maximum_filter(arr, size=2 * px + 1, mode="constant", cval=0)


def mask_stats(arr: np.ndarray) -> tuple[float, int]:
    """(covered share of the frame, pieces): a pixel counts from half-white up; a piece counts from
    MIN_PIECE of the frame (8-connected)."""
    from scipy.ndimage import label

    on = arr >= 128
    coverage = float(on.mean()) if on.size else 0.0
    labels, n = label(on, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return coverage, 0
    sizes = np.bincount(labels.ravel())[1:]
    return coverage, int((sizes >= MIN_PIECE * on.size).sum())


def finish(mask: Image.Image | np.ndarray, dilate_px: int) -> MaskResult:
    """Dilate, check and encode a mask at its image's size."""
    arr = np.asarray(mask, dtype=np.uint8)
    arr = dilate(arr, dilate_px)
    coverage, pieces = mask_stats(arr)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, "PNG", compress_level=3)
    return MaskResult(buf.getvalue(), round(coverage, 4), pieces)


def mask_problem(coverage: float, pieces: int) -> str | None:
    """Why a mask is probably wrong (for the summary table), or None."""
    if coverage < MIN_COVERAGE:
        return f"covers {coverage:.0%} of the frame (under {MIN_COVERAGE:.0%}): object missed?"
    if coverage > MAX_COVERAGE:
        return f"covers {coverage:.0%} of the frame (over {MAX_COVERAGE:.0%}): background taken as object?"
    if pieces > MAX_PIECES:
        return f"{pieces} separate pieces (over {MAX_PIECES}): bits of background?"
    return None


# ---------------------------------------------------------------------------- the user's folder


def read_mask_folder(folder: Path, exclude: Path | None = None) -> list[Path]:
    """The mask images in `folder` (recursive; hidden and system files skipped). A file that is not
    an image is refused with one line naming it, before anything is decoded or written."""
    from sdlora.data.sources import _skip_by_name

    excluded = exclude.resolve() if exclude is not None else None
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if excluded is not None and path.resolve().is_relative_to(excluded):
            continue
        if _skip_by_name(rel.as_posix()):
            continue
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 - the header is enough to know it is an image
        except (OSError, UnidentifiedImageError, ValueError):
            raise DataError(
                f"--masks {folder}: {rel.as_posix()} is not an image; the folder may hold only mask images "
                "(white = object, named like their photos), move it out"
            ) from None
        files.append(path)
    if not files:
        raise DataError(f"--masks {folder}: no mask images in this folder (white = object, named like their photos)")
    return files


def match_masks(mask_files: list[Path], photo_names: list[str], folder: Path) -> tuple[dict[str, Path], list[str]]:
    """({photo name: its mask file}, lines for mask files that match no photo), by file stem as
    `caption --from` matches captions: IMG_1.png is the mask of IMG_1.HEIC in any subfolder."""
    from sdlora.data.caption_import import StemIndex
    from sdlora.data.manifest import ImageRecord, Manifest

    # The photos as records whose source is their name, so URLs (Yandex) match by their file name too.
    records = {n: ImageRecord(n, n, "", (0, 0), (0, 0)) for n in photo_names}
    index = StemIndex(photo_names, Manifest(images=records))
    matched: dict[str, Path] = {}
    unmatched: list[str] = []
    for path in mask_files:
        rel = path.relative_to(folder).as_posix()
        photo, why = index.lookup(path.name)
        if photo is None:
            unmatched.append(f"{rel} ({'no photo with this stem' if why.startswith('no ') else why})")
        elif photo in matched:
            unmatched.append(f"{rel} (a second mask for {photo}; {matched[photo].relative_to(folder)} is used)")
        else:
            matched[photo] = path
    if not matched:
        example = mask_files[0].relative_to(folder).as_posix()
        raise DataError(
            f"--masks {folder}: none of its {len(mask_files)} mask files matches a photo by file stem "
            f"(e.g. {example}); name each mask like its photo, e.g. IMG_1.png for IMG_1.HEIC"
        )
    return matched, unmatched


# ---------------------------------------------------------------------------- for train


def load_mask(dataset_dir: str | Path, record) -> np.ndarray | None:
    """Image `record`'s mask as float32 in [0, 1], shape (height, width) of the prepared image; None
    when the image has no mask (train it on the whole frame). DataError for a missing or damaged file."""
    if not getattr(record, "mask", None):
        return None
    path = Path(dataset_dir) / MASKS / record.mask
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DataError(f"{path}: mask missing; re-run `sdlora prepare` with the same --masks to rewrite it") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable mask ({exc}); re-run `sdlora prepare` to rewrite it") from None
    w, h = (int(v) for v in record.size)
    if arr.shape != (h, w):
        raise DataError(
            f"{path}: mask is {arr.shape[1]}x{arr.shape[0]}, its image {w}x{h}; re-run `sdlora prepare` to rewrite it"
        )
    return arr
