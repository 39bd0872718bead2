"""The output folder of `sdlora prepare`: may it be written, and what of an earlier dataset goes.

A folder is written when it is new or empty, updated when it holds a dataset prepared from the
same source, and replaced only with `--force`; anything else is one DataError naming --out.
After the new manifest is in place, images of the earlier dataset it no longer lists are removed.
"""

from __future__ import annotations

import re
from pathlib import Path

from sdlora.data.manifest import MANIFEST, Manifest, load_manifest
from sdlora.errors import DataError

_OUR_IMAGE = re.compile(r"^[0-9a-f]{16}\.png$")  # how prepare names its images


def dataset_source_id(source: str) -> str:
    """What a manifest's `source` records: a Yandex Disk link as given, else the absolute path."""
    from sdlora.data.yandex import is_yandex_link

    if is_yandex_link(source):
        return source.strip()
    return str(Path(source).expanduser().resolve())


def check_out_dir(out_dir: Path, source_id: str, force: bool) -> tuple[str, Manifest | None]:
    """("new" | "update" | "replace", the earlier manifest when it is ours to update or replace)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: exists and is a file, not a folder; choose another --out")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return "new", None
    if not (out_dir / MANIFEST).is_file():
        if force:
            return "replace", None
        raise DataError(
            f"--out {out_dir}: folder exists and is not an sdlora dataset (no {MANIFEST}); "
            "choose another --out, or --force to write into it"
        )
    try:
        old = load_manifest(out_dir)
    except DataError as exc:
        if force:
            return "replace", None
        raise DataError(f"--out {out_dir}: existing dataset is unreadable ({exc}); --force to replace it") from None
    if old.source == source_id:
        return "update", old
    if force:
        return "replace", old
    raise DataError(
        f"--out {out_dir}: already holds a dataset prepared from {old.source or 'another source'}; "
        "choose another --out, or --force to replace it"
    )


def remove_stale(images_dir: Path, old: Manifest | None, keep: set[str], mode: str) -> int:
    """Delete images of the earlier dataset (and leftovers named like ours) no longer listed."""
    if mode == "new" or not images_dir.is_dir():
        return 0
    listed = set(old.images) if old is not None else set()
    removed = 0
    for path in images_dir.iterdir():
        if path.name in keep or not path.is_file():
            continue
        if path.name in listed or (old is not None and _OUR_IMAGE.match(path.name)):
            path.unlink(missing_ok=True)
            removed += path.name in listed
    return removed
