"""The prepared dataset contract (see DESIGN.md): images/, captions.txt, manifest.json.

`prepare` writes it, `caption` edits captions.txt, `train` and `score` read it through
`load_dataset_info`. Keep this module free of heavy imports: every stage reads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdlora.errors import DataError
from sdlora.fsutil import write_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CAPTIONS = "captions.txt"
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

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["images"] = {name: asdict(rec) for name, rec in self.images.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = MANIFEST) -> "Manifest":
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(f"{where}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        try:
            images = {
                name: ImageRecord(
                    file=rec["file"],
                    source=rec["source"],
                    source_sha256=rec["source_sha256"],
                    original_size=tuple(rec["original_size"]),
                    size=tuple(rec["size"]),
                )
                for name, rec in data.get("images", {}).items()
            }
            known = {f for f in cls.__dataclass_fields__ if f != "images"}
            return cls(images=images, **{k: v for k, v in data.items() if k in known})
        except (KeyError, TypeError) as exc:
            raise DataError(f"{where}: malformed manifest ({exc})") from exc

    def save(self, dataset_dir: Path) -> None:
        write_json(Path(dataset_dir) / MANIFEST, self.to_json())


def load_manifest(dataset_dir: str | Path) -> Manifest:
    """Read and check `dataset_dir/manifest.json`; one clear error if it is missing or bad."""
    import json

    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST
    if not dataset_dir.is_dir():
        raise DataError(
            f"{dataset_dir}: no such dataset folder (run `sdlora prepare PHOTOS --out {dataset_dir}` first)"
        )
    if not path.is_file():
        raise DataError(f"{path}: missing; {dataset_dir} is not a prepared dataset (run `sdlora prepare` first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    return Manifest.from_json(data, where=str(path))
