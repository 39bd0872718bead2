"""The prepared dataset contract: images/, captions.txt (data/captions.py), manifest.json (here).

`prepare` (data/ingest.py) writes it, `caption` edits captions.txt, `train` and `score` read it
through `load_manifest`, which checks every field's shape so a damaged manifest.json is one
DataError line naming the file and the field. Each image's training geometry (its size and
crop) is computed once, by `prepare`, and read back with `Manifest.geometry`. Keep this module
free of heavy imports: every stage reads it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from sdlora.data.buckets import geometry
from sdlora.errors import DataError
from sdlora.fsutil import write_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CAPTIONS = "captions.txt"
INCOMPLETE = ".sdlora-incomplete"  # written first and removed last by `prepare` (data/outdir.py)
IMAGES = "images"
DEFAULT_TOKEN = "sksToy"
DEFAULT_CLASS = "toy"


@dataclass
class ImageRecord:
    """One prepared image and where it came from."""

    file: str  # name inside images/
    source: str  # source path (relative to the source root) or URL
    source_sha256: str  # checksum of the source bytes
    original_size: tuple[int, int]  # (width, height) after orientation, before crop/resize
    size: tuple[int, int]  # (width, height) of the prepared image: square, or its bucket with keep_aspect
    # (top, left) of the crop in the photo resized to cover `size` (SDXL's crop time ids), at the
    # dataset's resolution; None in manifests written before prepare recorded it.
    crop_top_left: tuple[int, int] | None = None
    # The subject mask (`prepare --masks`, data/masks.py): its name inside masks/, where it came from
    # ({"kind": "auto", "model", "revision"} / {"kind": "alpha"} / {"kind": "file", "path"}) and the
    # share of the frame it covers. None (and absent from manifest.json) for an image without a mask.
    mask: str | None = None
    mask_source: dict[str, Any] | None = None
    mask_coverage: float | None = None


class Geometry(NamedTuple):
    """How an image is trained, in SDXL's time-id order: (height, width) and (top, left)."""

    original_hw: tuple[int, int]  # the photo after orientation, before crop/resize
    size_hw: tuple[int, int]  # the training image: square, or the photo's aspect bucket
    crop_top_left: tuple[int, int]  # where the crop starts in the photo resized to cover `size_hw`


@dataclass
class Manifest:
    token: str = DEFAULT_TOKEN
    class_word: str = DEFAULT_CLASS
    resolution: int = 512
    seed: int = 0
    val_fraction: float = 0.2
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    images: dict[str, ImageRecord] = field(default_factory=dict)
    # Prepare options that shaped the images; options.get("keep_aspect", False) tells whether the
    # images keep their photos' aspect ratios (data/buckets.py) instead of being square.
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def has_masks(self) -> bool:
        """Whether any image has a subject mask (`prepare --masks`; read one with data/masks.py `load_mask`)."""
        return any(rec.mask for rec in self.images.values())

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["images"] = {name: _record_json(rec) for name, rec in self.images.items()}
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST) -> "Manifest":
        """A Manifest from parsed JSON; DataError naming `where` and the field for any wrong shape."""
        _check_shape(data, where)
        images = {
            name: ImageRecord(
                file=rec["file"],
                source=rec["source"],
                source_sha256=rec["source_sha256"],
                original_size=tuple(rec["original_size"]),
                size=tuple(rec["size"]),
                crop_top_left=tuple(rec["crop_top_left"]) if rec.get("crop_top_left") is not None else None,
                mask=rec.get("mask"),
                mask_source=rec.get("mask_source"),
                mask_coverage=rec.get("mask_coverage"),
            )
            for name, rec in data.get("images", {}).items()
        }
        known = {f for f in cls.__dataclass_fields__ if f != "images"}
        return cls(images=images, **{k: v for k, v in data.items() if k in known})

    def geometry(self, name: str, resolution: int | None = None) -> Geometry:
        """Image `name`'s training geometry at `resolution` (default: the dataset's).

        At the dataset's resolution, the size and crop `prepare` stored; at another one (`train
        --resolution`), or for a manifest that predates the stored crop, the same computation
        (data/buckets.py `geometry`) from the photo's original size. An image without a record
        is taken as an upright square photo at `resolution`.
        """
        resolution = self.resolution if resolution is None else resolution
        record = self.images.get(name)
        w, h = (int(v) for v in record.original_size) if record is not None else (resolution, resolution)
        if record is not None and record.crop_top_left is not None and resolution == self.resolution:
            sw, sh = (int(v) for v in record.size)
            top, left = (int(v) for v in record.crop_top_left)
            return Geometry((h, w), (sh, sw), (top, left))
        crop = str(self.options.get("crop", "center"))
        keep_aspect = bool(self.options.get("keep_aspect", False))
        size, top_left = geometry((w, h), resolution, keep_aspect=keep_aspect, crop=crop)
        return Geometry((h, w), size, top_left)

    def save(self, dataset_dir: Path) -> None:
        write_json(Path(dataset_dir) / MANIFEST, self.to_json())


_MASK_FIELDS = ("mask", "mask_source", "mask_coverage")


def _record_json(rec: ImageRecord) -> dict[str, Any]:
    """A record as manifest.json holds it: the mask fields only for an image that has a mask, so a
    dataset prepared without --masks has the same manifest as before masks existed."""
    data = asdict(rec)
    if rec.mask is None:
        for key in _MASK_FIELDS:
            data.pop(key)
    return data


def load_manifest(dataset_dir: str | Path, *, allow_incomplete: bool = False) -> Manifest:
    """Read and check `dataset_dir/manifest.json`; one clear error if it is missing or bad.

    A dataset that `prepare` began and has not finished (its marker INCOMPLETE is there: it is
    running, or was killed between writing captions.txt and manifest.json) is refused, so no
    reader sees new captions with an old manifest; `prepare` itself reads it with `allow_incomplete`.
    """
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST
    if not dataset_dir.is_dir():
        raise DataError(
            f"{dataset_dir}: no such dataset folder (run `sdlora prepare PHOTOS --out {dataset_dir}` first)"
        )
    if not allow_incomplete and (dataset_dir / INCOMPLETE).is_file():
        try:
            source = json.loads((dataset_dir / INCOMPLETE).read_text(encoding="utf-8")).get("source") or "PHOTOS"
        except (OSError, ValueError, AttributeError):
            source = "PHOTOS"
        raise DataError(
            f"{dataset_dir}: `sdlora prepare` has not finished writing this dataset (still running, or stopped); "
            f"run the same `sdlora prepare {source} --out {dataset_dir}` (with its options) again to finish it"
        )
    if not path.is_file():
        raise DataError(f"{path}: missing; {dataset_dir} is not a prepared dataset (run `sdlora prepare` first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    return Manifest.from_json(data, where=str(path))


# ---------------------------------------------------------------------------- the shape check

_FIX = "re-run `sdlora prepare` to rewrite it"


def _kind(value: Any) -> str:
    return (
        "null"
        if value is None
        else {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value)


_TOP_FIELDS: dict[str, tuple[str, Any]] = {  # field -> (what it must be, check)
    "token": ("a string", lambda v: isinstance(v, str)),
    "class_word": ("a string", lambda v: isinstance(v, str)),
    "resolution": ("a whole number", _is_int),
    "seed": ("a whole number", _is_int),
    "val_fraction": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "train": ("a list of image names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
    "val": ("a list of image names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
    "images": ("an object of image records", lambda v: isinstance(v, dict)),
    "options": ("an object", lambda v: isinstance(v, dict)),
    "source": ("a string", lambda v: isinstance(v, str)),
}
_RECORD_FIELDS: dict[str, tuple[str, Any]] = {
    "file": ("a string", lambda v: isinstance(v, str)),
    "source": ("a string", lambda v: isinstance(v, str)),
    "source_sha256": ("a string", lambda v: isinstance(v, str)),
    "original_size": ("[width, height]", _is_pair),
    "size": ("[width, height]", _is_pair),
}


_MASK_CHECKS: dict[str, tuple[str, Any]] = {
    "mask": ("a file name inside masks/", lambda v: isinstance(v, str) and v and "/" not in v and "\\" not in v),
    "mask_source": ("an object with 'kind'", lambda v: isinstance(v, dict) and isinstance(v.get("kind"), str)),
    "mask_coverage": (
        "a number from 0 to 1",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
    ),
}


def _check_shape(data: Any, where: str) -> None:
    """DataError (one line: the file, the field, what it must be) unless `data` has a manifest's shape."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object of dataset fields, got {_kind(data)}; {_FIX}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"{where}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    for key, (want, ok) in _TOP_FIELDS.items():
        if key in data and not ok(data[key]):
            raise DataError(f"{where}: field {key!r} must be {want}, got {_kind(data[key])}; {_FIX}")
    for name, rec in data.get("images", {}).items():
        if not isinstance(rec, dict):
            raise DataError(f"{where}: field 'images.{name}' must be an image record object, got {_kind(rec)}; {_FIX}")
        for key, (want, ok) in _RECORD_FIELDS.items():
            if key not in rec:
                raise DataError(f"{where}: field 'images.{name}.{key}' is missing; {_FIX}")
            if not ok(rec[key]):
                raise DataError(f"{where}: field 'images.{name}.{key}' must be {want}, got {rec[key]!r}; {_FIX}")
        crop = rec.get("crop_top_left")
        if crop is not None and not _is_pair(crop):
            raise DataError(f"{where}: field 'images.{name}.crop_top_left' must be [top, left], got {crop!r}; {_FIX}")
        for key, (want, ok) in _MASK_CHECKS.items():
            if rec.get(key) is not None and not ok(rec[key]):
                raise DataError(f"{where}: field 'images.{name}.{key}' must be {want}, got {rec[key]!r}; {_FIX}")
