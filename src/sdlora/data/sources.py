"""Listing a source (folder, .zip, Yandex Disk link) and reading its files' bytes.

Files are judged by name first (system files, videos and unsafe archive names are skipped
without being read), and archives are checked against zip bombs before anything is read.
Nothing is ever extracted: a zip entry is read from the archive when it is decoded (the archive
is opened once per process). In a folder, links to folders are followed once; a folder that
cannot be read, a link loop and a dangling link each get a row, and an unreadable source is a
DataError that says so.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

from sdlora.errors import DataError
from sdlora.events import ProgressFn
from sdlora.fsutil import cache_dir

# Zip-bomb guards: a phone export is JPEG/HEIC, which barely compresses.
MAX_ZIP_TOTAL = 16 << 30  # bytes, all entries uncompressed
MAX_ZIP_RATIO = 100  # uncompressed/compressed of one entry (checked for entries over 1 MiB)

# Reason categories for files skipped by name or unreadable (images.py has the decoding ones).
SYSTEM_FILE = "system file"
VIDEO = "video"
UNSAFE_NAME = "unsafe name in archive"
UNREADABLE = "unreadable"
UNREADABLE_FOLDER = "cannot read folder"
LINK_LOOP = "link loop"
BROKEN_LINK = "broken link"

_SYSTEM_NAMES = {".ds_store", "thumbs.db", "desktop.ini", ".localized", "icon\r"}
_VIDEO_SUFFIXES = {".mov", ".mp4", ".m4v", ".avi", ".3gp", ".mkv", ".webm", ".mts"}


@dataclass(frozen=True)
class SourceFile:
    name: str  # manifest `source`: path relative to the source root, zip entry, or URL
    path: Path  # the local file (the archive itself for a zip entry)
    member: str | None = None  # entry name inside the zip


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str  # category for the summary table
    detail: str = ""


def _skip_by_name(name: str) -> str | None:
    """Reason to skip a file by its name alone (no need to read it), else None."""
    parts = PurePosixPath(name).parts
    base = parts[-1] if parts else name
    if base.lower() in _SYSTEM_NAMES or base.startswith("._") or "__MACOSX" in parts:
        return SYSTEM_FILE  # Finder / Explorer metadata, AppleDouble resource forks
    if PurePosixPath(base).suffix.lower() in _VIDEO_SUFFIXES:
        return VIDEO  # e.g. the .MOV half of a live photo
    return None


def _list_folder(root: Path, exclude: set[Path]) -> tuple[list[SourceFile], list[Skipped]]:
    """Every file under `root`, following links to folders once; what cannot be listed or is a
    broken link gets its row (a folder it may not read, a link loop, a dangling link)."""
    files, skipped = [], []
    try:
        with os.scandir(root) as entries:  # the source itself must be readable
            next(entries, None)
    except OSError as exc:
        raise DataError(
            f"{root}: cannot read this folder ({os.strerror(exc.errno or 0)}); check its permissions"
        ) from None

    def name_of(path: Path) -> str:
        return path.relative_to(root).as_posix()

    def unreadable(exc: OSError) -> None:
        path = Path(exc.filename or "")
        if path != root:
            skipped.append(Skipped(name_of(path) + "/", UNREADABLE_FOLDER, os.strerror(exc.errno or 0)))

    visited = {root.resolve()}
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        here = Path(dirpath)
        # Never ingest our own output (`sdlora prepare . --out dataset`) or hidden folders (.git).
        keep = []
        for d in sorted(dirnames):
            path = here / d
            if d.startswith("."):
                continue
            real = path.resolve()
            if real in exclude:  # the output folder, the --masks folder
                continue
            if real in visited:  # a link back up the tree, or to a folder already listed
                why = "links to a folder above it" if Path(dirpath).resolve().is_relative_to(real) else ""
                skipped.append(Skipped(name_of(path) + "/", LINK_LOOP, why or f"same folder as {_shown(root, real)}"))
                continue
            visited.add(real)
            keep.append(d)
        dirnames[:] = keep
        for fname in filenames:
            path = here / fname
            name = name_of(path)
            reason = _skip_by_name(name)
            if reason:
                skipped.append(Skipped(name, reason))
            elif path.is_file():
                files.append(SourceFile(name, path))
            elif path.is_symlink():
                try:
                    path.stat()
                    detail = "not a file"
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        skipped.append(Skipped(name, LINK_LOOP, "the link points to itself"))
                        continue
                    detail = f"points to {os.readlink(path)}, which does not exist"
                skipped.append(Skipped(name, BROKEN_LINK, detail))
            else:
                skipped.append(Skipped(name, UNREADABLE, "not a regular file"))
    return files, skipped


def _shown(root: Path, real: Path) -> str:
    try:
        return real.relative_to(root.resolve()).as_posix() + "/"
    except ValueError:
        return str(real)


def _unsafe_member(name: str) -> bool:
    """An entry that would escape a folder it was extracted to (we never extract, but say so)."""
    posix = name.replace("\\", "/")
    return posix.startswith("/") or bool(re.match(r"^[A-Za-z]:", posix)) or ".." in posix.split("/") or "\x00" in posix


def _list_zip(path: Path, max_total: int, max_ratio: float) -> tuple[list[SourceFile], list[Skipped]]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable zip archive ({exc})") from None
    total = sum(info.file_size for info in infos)
    if total > max_total:
        raise DataError(
            f"{path}: refusing archive that unpacks to {total / 2**30:.1f} GiB (limit {max_total / 2**30:.1f} GiB); "
            "unpack it yourself and pass the folder"
        )
    for info in infos:
        if info.file_size > (1 << 20) and info.file_size > max_ratio * max(info.compress_size, 1):
            raise DataError(
                f"{path}: refusing archive entry {info.filename!r} that expands {info.file_size / max(info.compress_size, 1):.0f}x "
                "(a zip bomb?); unpack it yourself and pass the folder"
            )
    files, skipped = [], []
    for info in infos:
        if info.is_dir():
            continue
        name = info.filename
        if _unsafe_member(name):
            skipped.append(Skipped(name, UNSAFE_NAME, "absolute path or '..'; not used"))
            continue
        reason = _skip_by_name(name.replace("\\", "/"))
        if reason:
            skipped.append(Skipped(name, reason))
        elif info.flag_bits & 0x1:
            skipped.append(Skipped(name, UNREADABLE, "encrypted entry"))
        else:
            files.append(SourceFile(name, path, member=name))
    return files, skipped


def _list_link(link: str, on_progress: ProgressFn | None) -> tuple[list[SourceFile], list[Skipped]]:
    from sdlora.data.yandex import download_public

    skipped: list[Skipped] = []

    def include(name: str) -> bool:
        reason = _skip_by_name(name)
        if reason:
            skipped.append(Skipped(name, reason))
        return reason is None

    remote = download_public(link, cache_dir() / "yandex", on_progress=on_progress, include=include)
    files = []
    for rf in remote:
        reason = _skip_by_name(PurePosixPath(rf.remote_path or rf.local_path.name).name)
        if reason:
            skipped.append(Skipped(rf.url, reason))
        else:
            files.append(SourceFile(rf.url, rf.local_path))
    return files, skipped


def list_source(
    source: str,
    *,
    exclude: Path | Sequence[Path] | None = None,
    on_progress: ProgressFn | None = None,
    max_zip_total: int = MAX_ZIP_TOTAL,
    max_zip_ratio: float = MAX_ZIP_RATIO,
) -> tuple[list[SourceFile], list[Skipped]]:
    """The candidate files of a folder (recursive), zip archive or Yandex Disk link, by name."""
    from sdlora.data.yandex import is_yandex_link

    if is_yandex_link(source):
        files, skipped = _list_link(source, on_progress)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            if exclude is None or isinstance(exclude, (str, Path)):
                exclude = [exclude or path / "\0"]
            files, skipped = _list_folder(path, {Path(e).expanduser().resolve() for e in exclude})
        elif path.is_file():
            if not zipfile.is_zipfile(path):
                kind = "a broken zip archive" if path.suffix.lower() == ".zip" else "not a folder or a .zip archive"
                raise DataError(
                    f"{source}: {kind}; pass a folder of photos, a .zip of them, or a Yandex Disk public link"
                )
            files, skipped = _list_zip(path, max_zip_total, max_zip_ratio)
        elif re.match(r"^[a-z][a-z0-9+.-]*://", source, re.IGNORECASE):
            raise DataError(
                f"{source}: unsupported link; pass a folder, a .zip, or a Yandex Disk public link "
                "(https://disk.yandex.ru/d/...)"
            )
        else:
            raise DataError(
                f"{source}: no such folder or file; pass a folder of photos, a .zip of them, "
                "or a Yandex Disk public link"
            )
    files.sort(key=lambda f: f.name)
    skipped.sort(key=lambda s: s.name)
    return files, skipped


# The archive open in this process (the parent, or one decode worker): opening a zip reads its
# whole central directory, so opening it per entry made a 3000-entry zip quadratic.
_open_archive: dict[Path, zipfile.ZipFile] = {}


def _archive(path: Path) -> zipfile.ZipFile:
    zf = _open_archive.get(path)
    if zf is None:
        close_archives()  # one archive at a time
        zf = _open_archive[path] = zipfile.ZipFile(path)
    return zf


def close_archives() -> None:
    """Close the archive `read_bytes`/`checksum` keep open in this process."""
    for zf in _open_archive.values():
        zf.close()
    _open_archive.clear()


def read_bytes(src: SourceFile) -> bytes:
    if src.member is None:
        return src.path.read_bytes()
    return _archive(src.path).read(src.member)  # bounded by the entry's checked size; CRC checked


def checksum(src: SourceFile) -> str:
    digest = hashlib.sha256()
    if src.member is None:
        with open(src.path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    else:
        with _archive(src.path).open(src.member) as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
