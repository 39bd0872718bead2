"""The output folder of `sdlora prepare`: may it be written, and what of an earlier dataset goes.

A folder is written when it is new or empty, updated when it holds a dataset prepared from the
same source, and replaced only with `--force`; anything else is one DataError naming --out.
After the new manifest is in place, images of the earlier dataset it no longer lists are removed.

Before its first write, prepare puts the marker `.sdlora-incomplete` (manifest.INCOMPLETE,
holding the source) in the folder, and removes it after the manifest and cache are in place.
A folder with the marker is one sdlora began and never finished (a full disk, kill -9, Ctrl-C):
the same command resumes it (its images are re-used where they are complete), and readers
(`load_manifest`) refuse it with the command that finishes it. The lock file and leftover temp
files do not make a folder "not empty".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sdlora.data.manifest import INCOMPLETE, MANIFEST, Manifest, load_manifest
from sdlora.errors import DataError
from sdlora.fsutil import write_json
from sdlora.locks import is_lock_file

_OUR_IMAGE = re.compile(r"^[0-9a-f]{16}\.png$")  # how prepare names its images


def dataset_source_id(source: str) -> str:
    """What a manifest's `source` records: a Yandex Disk link as given, else the absolute path."""
    from sdlora.data.yandex import is_yandex_link

    if is_yandex_link(source):
        return source.strip()
    return str(Path(source).expanduser().resolve())


def _ignored(path: Path) -> bool:
    """Entries that do not make a folder hold something: our locks, temp files of killed writes."""
    return is_lock_file(path.name) or (path.name.startswith(".") and path.name.endswith(".tmp"))


def incomplete_source(out_dir: Path) -> str | None:
    """The source of the unfinished prepare that left its marker in `out_dir`, else None ("" if unknown)."""
    path = Path(out_dir) / INCOMPLETE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return str(data.get("source", "")) if isinstance(data, dict) else ""


def mark_incomplete(out_dir: Path, source_id: str) -> None:
    """Say "sdlora began this dataset and has not finished it" before the first write."""
    write_json(Path(out_dir) / INCOMPLETE, {"source": source_id})


def mark_complete(out_dir: Path) -> None:
    (Path(out_dir) / INCOMPLETE).unlink(missing_ok=True)


def check_out_dir(out_dir: Path, source_id: str, force: bool) -> tuple[str, Manifest | None]:
    """("new" | "update" | "replace" | "resume", the earlier manifest when it is ours to update or
    replace). "resume": a dataset an earlier prepare from the same source began and never finished."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir}: exists and is a file, not a folder; choose another --out")
    if not out_dir.exists() or not any(not _ignored(p) for p in out_dir.iterdir()):
        return "new", None
    unfinished = incomplete_source(out_dir)
    if unfinished is not None:
        try:
            old = load_manifest(out_dir, allow_incomplete=True) if (out_dir / MANIFEST).is_file() else None
        except DataError:
            old = None
        if old is not None and old.source == source_id:
            return "update", old  # an update that stopped half-way: the old manifest still holds
        if unfinished in ("", source_id) or force:
            return "resume", old
        raise DataError(
            f"--out {out_dir}: holds an unfinished dataset from {unfinished}; run that prepare again "
            "to finish it, choose another --out, or --force to replace it"
        )
    if not (out_dir / MANIFEST).is_file():
        if force:
            return "replace", None
        raise DataError(
            f"--out {out_dir}: folder exists and is not an sdlora dataset (no {MANIFEST}); "
            "choose another --out, or --force to write into it"
        )
    try:
        old = load_manifest(out_dir, allow_incomplete=True)
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
    ours = old is not None or mode == "resume"  # an unfinished dataset's images are ours too
    removed = 0
    for path in images_dir.iterdir():
        if path.name in keep or not path.is_file():
            continue
        if path.name in listed or (ours and _OUR_IMAGE.match(path.name)):
            path.unlink(missing_ok=True)
            removed += path.name in listed
    return removed
