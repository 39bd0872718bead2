"""captions.txt: one `<file name>|<caption>` line per image, `#` comments, UTF-8.

This is the training text. Every caption must carry the dataset's token. This module reads,
writes and checks the file, imports captions from a user's own files (matched to the prepared
images by their source stems), and fills in missing captions for `sdlora caption`: from a
template, an import, or an image-to-text model passed in as a plain callable.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from sdlora.data.manifest import CAPTIONS, IMAGES, MANIFEST, Manifest, load_manifest
from sdlora.errors import ConfigError, DataError
from sdlora.fsutil import write_json, write_text

HEADER = "# sdlora captions: <file name>|<caption>, one image per line; every caption carries the token\n"
DEFAULT_TEMPLATE = "a photo of {token} {class}"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

ProgressFn = Callable[[str, int, int], None]
# An image-to-text model: image paths (+ progress callback) -> one raw caption per image.
Captioner = Callable[[Sequence[Path], Optional[ProgressFn]], list[str]]


# ---------------------------------------------------------------------------- the file format


@dataclass(frozen=True)
class CaptionLine:
    file: str
    caption: str
    line_no: int


@dataclass(frozen=True)
class Malformed:
    """A line that is neither a comment nor a caption line."""

    line_no: int
    text: str
    reason: str


def _read_utf8(path: Path, what: str = "") -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what}{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def scan_captions(path: str | Path) -> tuple[list[CaptionLine], list[Malformed]]:
    """Caption lines in file order (duplicates kept) and the malformed lines, for `--check`."""
    path = Path(path)
    try:
        text = _read_utf8(path)
    except FileNotFoundError:
        raise DataError(f"{path}: missing (run `sdlora caption` to write template captions)") from None
    lines, bad = [], []
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "|" not in line:
            bad.append(Malformed(no, line, "expected '<file name>|<caption>'"))
            continue
        file, caption = line.split("|", 1)
        if not file.strip():
            bad.append(Malformed(no, line, "no file name before '|'"))
            continue
        lines.append(CaptionLine(file.strip(), caption.strip(), no))
    return lines, bad


def parse_captions(path: str | Path) -> list[CaptionLine]:
    """All caption lines in file order (duplicates kept, so `--check` can report them)."""
    lines, bad = scan_captions(path)
    if bad:
        raise DataError(f"{path}:{bad[0].line_no}: {bad[0].reason}, got {bad[0].text[:60]!r}")
    return lines


def read_captions(path: str | Path) -> dict[str, str]:
    """file name -> caption (the last line wins for a file named twice)."""
    return {line.file: line.caption for line in parse_captions(path)}


def write_captions(path: str | Path, captions: dict[str, str]) -> None:
    """Write captions.txt atomically, sorted by file name."""
    body = "".join(f"{name}|{captions[name]}\n" for name in sorted(captions))
    write_text(path, HEADER + body)


def update_captions(path: str | Path, updates: dict[str, str]) -> None:
    """Change or add captions, keeping the user's comments, line order and other lines; atomic."""
    path = Path(path)
    if not path.exists():
        write_captions(path, updates)
        return
    out, done = [], set()
    for raw in _read_utf8(path).splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "|" in line:
            name = line.split("|", 1)[0].strip()
            if name in updates:
                out.append(f"{name}|{updates[name]}")
                done.add(name)
                continue
        out.append(raw)
    if not any(line.strip() for line in out):
        out = [HEADER.rstrip("\n")]
    out += [f"{name}|{updates[name]}" for name in sorted(updates) if name not in done]
    write_text(path, "\n".join(out) + "\n")


# ---------------------------------------------------------------------------- token and template


def _word(text: str) -> re.Pattern[str]:
    """`text` as a whole word (so the class word `car` does not match `cartoon`)."""
    return re.compile(rf"(?<!\w){re.escape(text)}(?!\w)", re.IGNORECASE)


def has_token(caption: str, token: str) -> bool:
    # Case-insensitive: the CLIP tokenizers of SD 1.x and SDXL lower-case the prompt anyway.
    return bool(_word(token).search(caption))


def clean_caption(caption: str) -> str:
    """One line, single spaces (a caption may come from a multi-line .txt or a model)."""
    return " ".join(caption.split())


def insert_token(caption: str, token: str, class_word: str) -> str:
    """Put the token before the class word ("a red toy car" -> "a red sksToy toy car"), else in front."""
    caption = clean_caption(caption)
    if has_token(caption, token):
        return caption
    found = _word(class_word).search(caption) if class_word else None
    if found:
        return f"{caption[: found.start()]}{token} {caption[found.start() :]}"
    return f"{token} {caption}".strip()


def render_template(template: str, token: str, class_word: str) -> str:
    """`a photo of {token} {class}` -> `a photo of sksToy toy`; ConfigError for a bad template."""
    try:
        text = template.format_map({"token": token, "class": class_word, "class_word": class_word})
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"--template {template!r}: bad field ({exc}); use {{token}} and {{class}}, e.g. {DEFAULT_TEMPLATE!r}"
        ) from None
    text = clean_caption(text)
    if not has_token(text, token):
        raise ConfigError(f"--template {template!r} has no {{token}}; every caption must carry the token")
    return text


def check_class_word(word: str) -> str:
    word = clean_caption(word)
    if not word or "|" in word or "{" in word or "}" in word:
        raise ConfigError(f"--class-word {word!r}: give a plain word such as 'toy' or 'rc car'")
    return word


# ---------------------------------------------------------------------------- the dataset's images


def dataset_images(dataset_dir: str | Path, manifest: Manifest) -> list[str]:
    """Image names in manifest order (train, val, then any other record), else the images/ folder."""
    names = list(dict.fromkeys([*manifest.train, *manifest.val, *manifest.images]))
    if names:
        return names
    folder = Path(dataset_dir) / IMAGES
    if not folder.is_dir():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


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
        name = PurePosixPath(key.strip().replace("\\", "/")).name.lower()
        for table, probe in ((self._names, name), (self._stems, PurePosixPath(name).stem), (self._stems, name)):
            hits = table.get(probe)
            if hits and len(hits) == 1:
                return next(iter(hits)), ""
            if hits:
                return None, f"ambiguous, matches {', '.join(sorted(hits))}"
        return None, "no prepared image with this file name or source stem"


# ---------------------------------------------------------------------------- importing captions


@dataclass(frozen=True)
class ImportedCaption:
    key: str  # the image name as the user wrote it
    caption: str
    where: str  # "file:line" or the .txt file, for messages


# `IMG_1.png: a caption`: a file name with an extension, then a colon.
_COLON_LINE = re.compile(r"^(?P<file>[^|:]+?\.[A-Za-z0-9]{2,5})\s*:\s*(?P<caption>.*)$")


def _read_list_file(path: Path) -> tuple[list[ImportedCaption], list[tuple[str, str]]]:
    got, bad = [], []
    for no, raw in enumerate(_read_utf8(path, "--from ").splitlines(), start=1):
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
        got.append(ImportedCaption(path.stem, clean_caption(_read_utf8(path, "--from ")), where))
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


# ---------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class Problem:
    kind: str  # one of PROBLEM_KINDS
    file: str
    line_no: int | None
    detail: str


PROBLEM_KINDS = ("malformed line", "duplicate", "missing image", "empty caption", "no token", "no caption")


@dataclass
class CheckResult:
    captions_path: Path
    problems: list[Problem]
    n_captions: int
    n_images: int

    @property
    def ok(self) -> bool:
        return not self.problems


def check_captions(dataset_dir: str | Path) -> CheckResult:
    """Every problem in captions.txt, in a stable order (kind, then line); never writes."""
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    images = dataset_images(dataset_dir, manifest)
    on_disk = {name for name in images if (dataset_dir / IMAGES / name).is_file()}
    path = dataset_dir / CAPTIONS
    lines, bad = scan_captions(path)
    problems = [Problem("malformed line", "", m.line_no, f"{m.reason}, got {m.text[:60]!r}") for m in bad]
    first: dict[str, int] = {}
    for line in lines:
        if line.file in first:
            problems.append(Problem("duplicate", line.file, line.line_no, f"also on line {first[line.file]}"))
        else:
            first[line.file] = line.line_no
        if line.file not in images:
            problems.append(Problem("missing image", line.file, line.line_no, f"not an image of {MANIFEST}"))
        elif line.file not in on_disk:
            problems.append(Problem("missing image", line.file, line.line_no, f"{IMAGES}/{line.file} does not exist"))
        if not line.caption:
            problems.append(Problem("empty caption", line.file, line.line_no, "nothing after '|'"))
        elif not has_token(line.caption, manifest.token):
            problems.append(
                Problem("no token", line.file, line.line_no, f"{manifest.token!r} not in {line.caption[:60]!r}")
            )
    for name in images:
        if name in on_disk and name not in first:
            problems.append(Problem("no caption", name, None, "run `sdlora caption` to add one"))
    problems.sort(key=lambda p: (PROBLEM_KINDS.index(p.kind), p.line_no or 0, p.file))
    return CheckResult(path, problems, len(lines), len(images))


# ---------------------------------------------------------------------------- captioning a dataset


@dataclass
class CaptionResult:
    captions_path: Path
    token: str
    class_word: str
    written: dict[str, str] = field(default_factory=dict)  # image -> "template" / "imported" / "auto" / "token added"
    texts: dict[str, str] = field(default_factory=dict)  # image -> the caption written
    kept: list[str] = field(default_factory=list)  # user captions left as they were
    unchanged: list[str] = field(default_factory=list)  # template captions already up to date
    unmatched: list[tuple[str, str]] = field(default_factory=list)  # import lines that gave no caption
    stray: list[str] = field(default_factory=list)  # caption lines for images not in the dataset (left alone)
    class_word_changed_from: str | None = None  # manifest.json's class word before --class-word


def _set_manifest_class_word(dataset_dir: Path, class_word: str) -> None:
    """Rewrite only `class_word` in manifest.json, so keys this version does not know survive."""
    path = dataset_dir / MANIFEST
    data = json.loads(path.read_text(encoding="utf-8"))
    data["class_word"] = class_word
    write_json(path, data)


def caption_dataset(
    dataset_dir: str | Path,
    *,
    class_word: str | None = None,
    template: str | None = None,
    source: str | Path | None = None,
    captioner: Captioner | None = None,
    overwrite: bool = False,
    on_progress: ProgressFn | None = None,
) -> CaptionResult:
    """Give every image of the dataset a caption carrying the token; write captions.txt atomically.

    Images without a caption (or with a template caption, as `prepare` writes them) get one from
    `source` (an import), `captioner` (a model), or else the template. Captions a user wrote are
    kept (the token is inserted where missing) unless `overwrite`. Everything is read and
    checked before anything is written, so bad input leaves the dataset as it was.
    """
    dataset_dir = Path(dataset_dir)
    manifest = load_manifest(dataset_dir)
    images = dataset_images(dataset_dir, manifest)
    if not images:
        raise DataError(
            f"{dataset_dir / IMAGES}: no images to caption (run `sdlora prepare PHOTOS --out {dataset_dir}`)"
        )
    token = manifest.token
    word = check_class_word(class_word) if class_word is not None else manifest.class_word
    fill = render_template(template or DEFAULT_TEMPLATE, token, word)
    path = dataset_dir / CAPTIONS
    existing = read_captions(path) if path.exists() else {}
    # Template captions (from `prepare`, or an earlier run with another class word) are not
    # the user's words: replacing them loses nothing.
    placeholders = {
        render_template(DEFAULT_TEMPLATE, token, manifest.class_word).lower(),
        render_template(DEFAULT_TEMPLATE, token, word).lower(),
        fill.lower(),
    }
    result = CaptionResult(path, token, word, stray=sorted(set(existing) - set(images)))
    own = {  # captions the user wrote (not empty, not a template)
        name: existing[name]
        for name in images
        if clean_caption(existing.get(name, "")) and clean_caption(existing[name]).lower() not in placeholders
    }

    def replaceable(name: str) -> bool:
        return overwrite or name not in own

    new: dict[str, tuple[str, str]] = {}
    if source is not None:
        imported = import_captions(source, images, manifest, class_word=word)
        result.unmatched = imported.unmatched
        new.update({name: (text, "imported") for name, text in imported.matched.items() if replaceable(name)})
    if captioner is not None:
        names = [n for n in images if n not in new and replaceable(n)]
        _auto_caption(dataset_dir, names, captioner, token, word, fill, new, on_progress)
    # The template fills what is still missing; with --overwrite and nothing else given, it
    # replaces everything (with --from, images the import does not cover keep their captions).
    template_too = overwrite and source is None and captioner is None
    for name in images:
        if name not in new and (name not in own or template_too):
            new[name] = (fill, "template")
    for name in images:
        if name in own and name not in new:
            if has_token(own[name], token):
                result.kept.append(name)
            else:
                new[name] = (insert_token(own[name], token, word), "token added")

    updates = {}
    for name, (caption, how) in new.items():
        if clean_caption(existing.get(name, "")) == caption:
            result.unchanged.append(name)
        else:
            updates[name] = result.texts[name] = caption
            result.written[name] = how
    if class_word is not None and word != manifest.class_word:
        result.class_word_changed_from = manifest.class_word
    if updates:
        update_captions(path, updates)
    if result.class_word_changed_from is not None:
        _set_manifest_class_word(dataset_dir, word)
    return result


def _auto_caption(
    dataset_dir: Path,
    names: list[str],
    captioner: Captioner,
    token: str,
    class_word: str,
    fill: str,
    new: dict[str, tuple[str, str]],
    on_progress: ProgressFn | None,
) -> None:
    if not names:
        return
    paths = [dataset_dir / IMAGES / name for name in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]}: image listed in {MANIFEST} is missing ({len(missing)} missing); re-run `sdlora prepare`"
        )
    raw = captioner(paths, on_progress)
    if len(raw) != len(paths):
        raise RuntimeError(f"captioner returned {len(raw)} captions for {len(paths)} images")
    for name, text in zip(names, raw):
        text = clean_caption(text)
        # A model can return nothing for an odd image; the template is better than a bare token.
        new[name] = (insert_token(text, token, class_word), "auto") if text else (fill, "template")
