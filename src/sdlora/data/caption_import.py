"""Importing a user's own captions (`sdlora caption --from FILE_OR_DIR`).

A list file holds `name|caption` or `name.png: caption` lines; a folder holds one `.txt` (or
`.caption`) per image named after it. A name is matched to a prepared image by its file name or
its source photo's stem (`StemIndex`), since prepared images are named by checksum.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from sdlora.data.captions import clean_caption, insert_token, read_utf8, split_lines, too_long
from sdlora.data.manifest import CAPTIONS, Manifest
from sdlora.errors import DataError


def source_name(source: str) -> str:
    """The file name in a manifest `source`: a relative path, a Windows path, or a (Yandex) URL."""
    parts = urlsplit(source)
    if parts.scheme in ("http", "https"):
        path = parse_qs(parts.query).get("path", [parts.path])[0]
        return PurePosixPath(unquote(path)).name
    return PurePosixPath(source.replace("\\", "/")).name


class StemIndex:
    """Finds the prepared image a user's file name means.

    A name matches a prepared file name or its source's file name (both case-insensitive), else
    its stem matches their stems: `IMG_4651.heic`, `img_4651.txt` and `IMG_4651` all find the
    image prepared from `photos/IMG_4651.HEIC`, even when it is stored as `3fa2c1.png`.
    """

    def __init__(self, images: Sequence[str], manifest: Manifest):
        self._names: dict[str, set[str]] = defaultdict(set)
        self._stems: dict[str, set[str]] = defaultdict(set)
        for image in images:
            names = {image}
            record = manifest.images.get(image)
            if record is not None and record.source:
                names.add(source_name(record.source))
            for name in names:
                self._names[name.lower()].add(image)
                self._stems[PurePosixPath(name).stem.lower()].add(image)

    def lookup(self, key: str) -> tuple[str | None, str]:
        """(image, "") or (None, why not)."""
        name = key.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
        for table, probe in ((self._names, name), (self._stems, _stem(name)), (self._stems, name)):
            hits = table.get(probe)
            if hits and len(hits) == 1:
                return next(iter(hits)), ""
            if hits:
                return None, f"ambiguous, matches {', '.join(sorted(hits))}"
        return None, "no prepared image with this file name or source stem"


def _stem(name: str) -> str:
    """PurePosixPath(name).stem without building a path: a lookup runs once per line of a user's file."""
    dot = name.rfind(".")
    return name[:dot] if 0 < dot < len(name) - 1 else name


@dataclass(frozen=True)
class ImportedCaption:
    key: str  # the image name as the user wrote it
    caption: str
    where: str  # "file:line" or the .txt file, for messages


# `IMG_1.png: a caption`: a file name with an extension, then a colon.
_COLON_LINE = re.compile(r"^(?P<file>[^|:]+?\.[A-Za-z0-9]{2,5})\s*:\s*(?P<caption>.*)$")


def _read_list_file(path: Path) -> tuple[list[ImportedCaption], list[tuple[str, str]]]:
    got, bad = [], []
    for no, raw in enumerate(split_lines(read_utf8(path, "--from ")), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        colon = _COLON_LINE.match(line)
        if "|" in line and (colon is None or line.index("|") < colon.end("file")):
            key, caption = line.split("|", 1)
        elif colon:
            key, caption = colon["file"], colon["caption"]
        else:
            bad.append((f"{path.name}:{no}", f"expected 'file|caption' or 'file.png: caption', got {line[:50]!r}"))
            continue
        if why := too_long(caption):
            bad.append((f"{path.name}:{no}", f"{key.strip()[:50]}: {why}"))
            continue
        got.append(ImportedCaption(key.strip(), clean_caption(caption), f"{path.name}:{no}"))
    return got, bad


def read_caption_source(source: str | Path) -> tuple[list[ImportedCaption], list[tuple[str, str]]]:
    """Captions from a user's file or folder, and (where, why) for what could not be read.

    A file holds `name|caption` or `name.png: caption` lines; a folder holds one `.txt` (or
    `.caption`) per image named after it (a `captions.txt` inside is read as a list file).
    """
    source = Path(source)
    if source.is_file():
        return _read_list_file(source)
    if not source.is_dir():
        raise DataError(f"--from {source}: no such file or folder")
    got, bad = [], []
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".caption"))
    for path in files:
        if path.name.startswith("."):
            continue
        where = str(path.relative_to(source))
        if path.name.lower() == CAPTIONS:
            more, worse = _read_list_file(path)
            got += more
            bad += worse
            continue
        text = read_utf8(path, "--from ")
        if why := too_long(text.strip()):
            bad.append((where, why))
            continue
        got.append(ImportedCaption(path.stem, clean_caption(text), where))
    if not got and not bad:
        raise DataError(f"--from {source}: no caption files (.txt / .caption, one per image) in this folder")
    return got, bad


@dataclass
class ImportResult:
    matched: dict[str, str]  # prepared image -> caption (token inserted)
    unmatched: list[tuple[str, str]]  # (where, why) for lines that gave no caption


def import_captions(source: str | Path, images: Sequence[str], manifest: Manifest, *, class_word: str) -> ImportResult:
    entries, unmatched = read_caption_source(source)
    index = StemIndex(images, manifest)
    matched: dict[str, str] = {}
    origin: dict[str, str] = {}
    for entry in entries:
        image, why = index.lookup(entry.key)
        if image is None:
            unmatched.append((entry.where, f"{entry.key}: {why}"))
        elif not entry.caption:
            unmatched.append((entry.where, f"{entry.key}: empty caption"))
        else:
            if image in matched:
                unmatched.append((origin[image], f"{entry.key}: {image} captioned again at {entry.where}, which wins"))
            matched[image] = insert_token(entry.caption, manifest.token, class_word)
            origin[image] = entry.where
    unmatched.sort(key=lambda item: _where_order(item[0]))
    return ImportResult(matched, unmatched)


def _where_order(where: str) -> tuple[str, int]:
    """ "mine.txt:12" -> ("mine.txt", 12), so reports follow the user's file."""
    name, _, line = where.rpartition(":")
    return (name, int(line)) if line.isdigit() else (where, 0)
