"""`sdlora prepare`: photos (folder, .zip, Yandex Disk link) -> a prepared dataset folder.

Steps, each reported through `on_progress(description, done, total)`:
  1. check the output folder (refuse to overwrite a different dataset unless `force`);
  2. list the source files, skipping system files, videos and unsafe archive names by name;
  3. read and checksum every file (sha256 of the bytes, for the manifest and the cache);
  4. decode the files not decoded before, in parallel processes (data/images.py);
  5. drop what is unusable: unreadable, too small, duplicates (data/dedupe.py);
  6. split train/val, merge captions, write images, captions.txt, manifest.json atomically.

Re-use is content-addressed: an output image is named after the checksum of its source bytes
and the options that shape it, and `.prepare-cache.json` keeps what decoding learned (size,
pixel checksum, perceptual hash, or why the file is unusable). A re-run with the same
source and options decodes nothing. Nothing in the old dataset changes until every input has
been read and checked; old images are removed only after the new manifest is in place.

With `keep_aspect` each image keeps its photo's shape at its aspect-ratio bucket
(data/buckets.py) instead of being made square; the manifest records each image's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import zipfile
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

from sdlora.data import images as imaging
from sdlora.data.captions import (
    DEFAULT_TEMPLATE,
    check_class_word,
    read_captions,
    render_template,
    update_captions,
    write_captions,
)
from sdlora.data.dedupe import NEAR_DUPLICATE_BITS, Candidate, find_duplicates
from sdlora.data.manifest import (
    CAPTIONS,
    DEFAULT_CLASS,
    DEFAULT_TOKEN,
    IMAGES,
    MANIFEST,
    ImageRecord,
    Manifest,
    load_manifest,
)
from sdlora.errors import ConfigError, DataError
from sdlora.fsutil import write_bytes, write_json

ProgressFn = Callable[[str, int, int], None]

CACHE_FILE = ".prepare-cache.json"
PIPELINE_VERSION = 1  # bump when decoding/cropping changes what an image looks like
# Zip-bomb guards: a phone export is JPEG/HEIC, which barely compresses.
MAX_ZIP_TOTAL = 16 << 30  # bytes, all entries uncompressed
MAX_ZIP_RATIO = 100  # uncompressed/compressed of one entry (checked for entries over 1 MiB)

# Reason categories for files skipped by name (images.py has the decoding ones).
SYSTEM_FILE = "system file"
VIDEO = "video"
UNSAFE_NAME = "unsafe name in archive"
TOO_SMALL = "too small"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near duplicate"
UNREADABLE = "unreadable"

_SYSTEM_NAMES = {".ds_store", "thumbs.db", "desktop.ini", ".localized", "icon\r"}
_VIDEO_SUFFIXES = {".mov", ".mp4", ".m4v", ".avi", ".3gp", ".mkv", ".webm", ".mts"}
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_OUR_IMAGE = re.compile(r"^[0-9a-f]{16}\.png$")


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


@dataclass
class PrepareResult:
    out_dir: Path
    source: str
    records: list[ImageRecord]  # kept images, in source order
    train: list[str]
    val: list[str]
    skipped: list[Skipped]
    warnings: list[str] = field(default_factory=list)
    decoded: int = 0  # files decoded in this run
    reused: int = 0  # files whose earlier result was re-used (content-addressed)
    removed: int = 0  # images of the earlier dataset that are gone from the source
    captions_kept: int = 0  # existing captions carried over
    captions_new: int = 0  # template captions written for new images
    mode: str = "new"  # "new", "update" (same source) or "replace" (--force)
    keep_aspect: bool = False  # images are at their buckets' sizes, not square

    def size_counts(self) -> list[tuple[tuple[int, int], int]]:
        """((width, height), images) for each prepared size, the most used first."""
        counts: dict[tuple[int, int], int] = {}
        for rec in self.records:
            counts[tuple(rec.size)] = counts.get(tuple(rec.size), 0) + 1
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


class NoUsableImages(DataError):
    """Nothing in the source could become a training image; `.result` says what was skipped."""

    def __init__(self, message: str, result: PrepareResult):
        super().__init__(message)
        self.result = result


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    resolution: int = 512
    crop: str = "center"
    val_fraction: float = 0.2
    seed: int = 0
    token: str = DEFAULT_TOKEN
    class_word: str = DEFAULT_CLASS
    keep_duplicates: bool = False
    keep_small: bool = False
    keep_aspect: bool = False

    def check(self) -> "Options":
        if not 64 <= self.resolution <= 4096 or self.resolution % 8:
            raise ConfigError(
                f"--resolution {self.resolution}: use a multiple of 8 from 64 to 4096 (512 for SD 1.x, 1024 for SDXL)"
            )
        if self.crop not in imaging.CROPS:
            raise ConfigError(f"--crop {self.crop!r}: use one of {', '.join(imaging.CROPS)}")
        if self.keep_aspect and self.crop != "center":
            raise ConfigError(
                f"--keep-aspect with --crop {self.crop}: --keep-aspect keeps the photo's shape "
                "instead of making a square; use one or the other"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction {self.val_fraction}: use a fraction from 0 to below 1, e.g. 0.2")
        if not re.fullmatch(r"[^\s|{}#]+", self.token or ""):
            raise ConfigError(f"--token {self.token!r}: use one word without spaces, '|', '#' or braces, e.g. sksToy")
        return Options(**{**self.__dict__, "class_word": check_class_word(self.class_word)})

    def image_key(self, source_sha256: str) -> str:
        """Content address of an output image: same bytes + same options -> same file name."""
        text = f"sdlora-prepare|v{PIPELINE_VERSION}|{source_sha256}|{self.resolution}|{self.crop}"
        if self.keep_aspect:  # appended only when on, so square datasets keep their names and cache
            text += "|keep-aspect"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def target_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return imaging.target_size(original_size, self.resolution, self.keep_aspect)


# ---------------------------------------------------------------------------- the output folder


def _source_id(source: str) -> str:
    from sdlora.data.yandex import is_yandex_link

    if is_yandex_link(source):
        return source.strip()
    return str(Path(source).expanduser().resolve())


def _check_out_dir(out_dir: Path, source_id: str, force: bool) -> tuple[str, Manifest | None]:
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


# ---------------------------------------------------------------------------- listing the source


def _skip_by_name(name: str) -> str | None:
    """Reason to skip a file by its name alone (no need to read it), else None."""
    parts = PurePosixPath(name).parts
    base = parts[-1] if parts else name
    if base.lower() in _SYSTEM_NAMES or base.startswith("._") or "__MACOSX" in parts:
        return SYSTEM_FILE  # Finder / Explorer metadata, AppleDouble resource forks
    if PurePosixPath(base).suffix.lower() in _VIDEO_SUFFIXES:
        return VIDEO  # e.g. the .MOV half of a live photo
    return None


def _list_folder(root: Path, exclude: Path) -> tuple[list[SourceFile], list[Skipped]]:
    files, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        # Never ingest our own output (`sdlora prepare . --out dataset`) or hidden folders (.git).
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != exclude)
        for fname in filenames:
            path = here / fname
            name = path.relative_to(root).as_posix()
            reason = _skip_by_name(name)
            if reason:
                skipped.append(Skipped(name, reason))
            elif path.is_file():
                files.append(SourceFile(name, path))
    return files, skipped


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

    cache = Path(os.environ.get("SDLORA_CACHE") or Path.home() / ".cache" / "sdlora") / "yandex"
    remote = download_public(link, cache, on_progress=on_progress, include=include)
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
    exclude: Path | None = None,
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
            files, skipped = _list_folder(path, (exclude or path / "\0").resolve())
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


def _read(src: SourceFile) -> bytes:
    if src.member is None:
        return src.path.read_bytes()
    with zipfile.ZipFile(src.path) as zf:
        return zf.read(src.member)  # bounded by the entry's checked size; CRC checked


def _checksum(src: SourceFile) -> str:
    digest = hashlib.sha256()
    if src.member is None:
        with open(src.path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    else:
        with zipfile.ZipFile(src.path) as zf, zf.open(src.member) as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class _Job:
    key: str
    src: SourceFile
    resolution: int
    crop: str
    keep_aspect: bool = False


@dataclass
class _Decoded:
    key: str
    png: bytes | None = None
    pixels: str = ""
    phash: str = ""
    original_size: tuple[int, int] = (0, 0)
    error: str | None = None  # reason category
    detail: str = ""
    size: tuple[int, int] | None = None  # of the prepared image; None from caches that predate it

    def cache_entry(self) -> dict:
        return {
            "pixels": self.pixels,
            "phash": self.phash,
            "original_size": list(self.original_size),
            "size": list(self.size) if self.size else None,
            "error": self.error,
            "detail": self.detail,
        }

    @classmethod
    def from_cache(cls, key: str, entry: dict) -> "_Decoded":
        size = entry.get("size")
        return cls(
            key,
            None,
            entry.get("pixels", ""),
            entry.get("phash", ""),
            tuple(entry.get("original_size", (0, 0))),
            entry.get("error"),
            entry.get("detail", ""),
            tuple(size) if size else None,
        )


def _decode(job: _Job) -> _Decoded:
    """Worker: one file -> PNG bytes and its checksums, or why it is unusable. Never raises."""
    try:
        data = _read(job.src)
    except (OSError, zipfile.BadZipFile, RuntimeError) as exc:
        return _Decoded(job.key, error=UNREADABLE, detail=imaging.short_error(exc))
    try:
        prepared = imaging.prepare_image(data, job.resolution, job.crop, job.keep_aspect)
    except imaging.BadImage as exc:
        return _Decoded(job.key, error=exc.reason, detail=exc.detail)
    img = prepared.image
    return _Decoded(
        job.key,
        imaging.png_bytes(img),
        imaging.pixel_digest(img),
        imaging.perceptual_hash(img),
        prepared.original_size,
        size=img.size,
    )


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    imaging.register_heif(decode_threads=1)


def _warm() -> None:
    """Pay a worker's one-off import costs while the parent is still reading files."""
    imaging.perceptual_hash(imaging.Image.new("RGB", (8, 8)))


class _Decoder:
    """Decodes jobs as they are found: in `workers` processes, or in this process for 1.

    The pool starts with the first job, so its start-up overlaps the parent's checksumming
    of the remaining files, and a re-run with nothing to decode starts no processes at all.
    Every worker uses one libheif thread: the parallelism comes from the processes.
    """

    def __init__(self, workers: int, on_progress: ProgressFn | None, most_jobs: int):
        self.workers = max(1, min(workers, most_jobs))
        self.report = on_progress or (lambda *_: None)
        self.jobs: list[_Job] = []
        self._futures: list[Future] = []
        self._pool: ProcessPoolExecutor | None = None
        self._warmups: list[Future] = []

    def submit(self, job: _Job) -> None:
        self.jobs.append(job)
        if self.workers <= 1:
            return  # decoded in `results`, after reading
        if self._pool is None:
            # forkserver: never fork a parent that runs threads (the CLI's progress bar does).
            method = "forkserver" if "forkserver" in _start_methods() else "spawn"
            context = get_context(method)
            if method == "forkserver":
                # Import once in the server; each worker forks from it ready to decode.
                context.set_forkserver_preload([__name__, "imagehash", "scipy.fftpack"])
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context, initializer=_init_worker)
            self._warmups = [self._pool.submit(_warm) for _ in range(self.workers)]
        self._futures.append(self._pool.submit(_decode, job))

    def results(self) -> list[_Decoded]:
        """All results, in submission order, reporting ("decoding", done, total)."""
        total = len(self.jobs)
        if not total:
            return []
        self.report("decoding", 0, total)
        if self._pool is None:
            imaging.register_heif(decode_threads=1)
            out = []
            for i, job in enumerate(self.jobs, 1):
                out.append(_decode(job))
                self.report("decoding", i, total)
            return out
        # Until the first worker is up (process start and imports take ~0.5 s), the parent
        # decodes queued jobs itself, from the back, so that start-up time is not lost.
        imaging.register_heif(decode_threads=1)
        local: dict[int, _Decoded] = {}
        pending = set(self._futures)
        while pending:
            if not any(f.done() for f in self._warmups):
                stolen = next((i for i in reversed(range(total)) if i not in local and self._futures[i].cancel()), None)
                if stolen is not None:
                    local[stolen] = _decode(self.jobs[stolen])
                    pending.discard(self._futures[stolen])
                    self.report("decoding", total - len(pending), total)
                    continue
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            self.report("decoding", total - len(pending), total)
        return [local[i] if i in local else fut.result() for i, fut in enumerate(self._futures)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _start_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()


# ---------------------------------------------------------------------------- split and captions


def split_train_val(names: Iterable[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic for a seed and a set of names, whatever their order.

    Each name gets a rank from a hash of (seed, name); the lowest ranks are val. Adding photos
    moves at most a few images across the split, unlike a shuffle of the whole list.
    """
    names = sorted(set(names))
    n_val = round(len(names) * val_fraction)
    if val_fraction > 0 and len(names) >= 2:
        n_val = min(max(1, n_val), len(names) - 1)
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    val = set(ranked[:n_val])
    return [n for n in names if n not in val], [n for n in names if n in val]


def _merge_captions(
    out_dir: Path, records: list[ImageRecord], old: Manifest | None, opts: Options
) -> tuple[dict[str, str], int, int, bool]:
    """(captions, kept, new, additions_only): earlier captions carried over (by name, else by
    source checksum when options renamed the image), a template for the rest."""
    path = out_dir / CAPTIONS
    existing = read_captions(path) if old is not None and path.is_file() else {}
    by_sha = {}
    if old is not None:
        for name, rec in old.images.items():
            if name in existing:
                by_sha.setdefault(rec.source_sha256, existing[name])
    template = render_template(DEFAULT_TEMPLATE, opts.token, opts.class_word)
    stale_templates = set()
    if old is not None and (old.token, old.class_word) != (opts.token, opts.class_word):
        stale_templates.add(render_template(DEFAULT_TEMPLATE, old.token, old.class_word))
    captions, kept, new = {}, 0, 0
    for rec in records:
        caption = existing.get(rec.file) or by_sha.get(rec.source_sha256)
        if caption and caption not in stale_templates:
            captions[rec.file] = caption
            kept += 1
        else:
            captions[rec.file] = template
            new += 1
    additions_only = set(existing) <= set(captions) and all(existing[n] == captions[n] for n in existing)
    return captions, kept, new, additions_only and bool(existing)


# ---------------------------------------------------------------------------- the whole step


def _load_cache(out_dir: Path) -> dict[str, dict]:
    try:
        data = json.loads((out_dir / CACHE_FILE).read_text(encoding="utf-8"))
        if data.get("version") == PIPELINE_VERSION and isinstance(data.get("entries"), dict):
            return data["entries"]
    except (OSError, ValueError, AttributeError):
        pass  # no cache or a broken one: decode again
    return {}


def prepare_dataset(
    source: str,
    out_dir: str | Path = "dataset",
    *,
    resolution: int = 512,
    crop: str = "center",
    val_fraction: float = 0.2,
    seed: int = 0,
    token: str = DEFAULT_TOKEN,
    class_word: str = DEFAULT_CLASS,
    keep_duplicates: bool = False,
    keep_small: bool = False,
    keep_aspect: bool = False,
    workers: int | None = None,
    force: bool = False,
    on_progress: ProgressFn | None = None,
    max_zip_total: int = MAX_ZIP_TOTAL,
    max_zip_ratio: float = MAX_ZIP_RATIO,
) -> PrepareResult:
    """Turn the photos in `source` into the dataset folder `out_dir` (see the module docstring).

    Raises ConfigError for bad options, DataError for a source or output folder that cannot be
    used, NoUsableImages when no photo survives. Never leaves a half-written dataset.
    """
    opts = Options(
        resolution, crop, val_fraction, seed, token, class_word, keep_duplicates, keep_small, keep_aspect
    ).check()
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"--workers {workers}: use 1 or more")
    out_dir = Path(out_dir).expanduser()
    source_id = _source_id(source)
    mode, old = _check_out_dir(out_dir, source_id, force)
    report = on_progress or (lambda *_: None)

    files, skipped = list_source(
        source, exclude=out_dir, on_progress=on_progress, max_zip_total=max_zip_total, max_zip_ratio=max_zip_ratio
    )

    # Checksum every file (the manifest records it, the cache is addressed by it) and hand each
    # new one to the decoder at once, so decoding overlaps reading.
    cache = _load_cache(out_dir) if mode == "update" else {}
    images_dir = out_dir / IMAGES
    shas: dict[str, str] = {}
    first_by_sha: dict[str, str] = {}
    unique: list[SourceFile] = []
    results: dict[str, _Decoded] = {}
    decoder = _Decoder(workers, on_progress, most_jobs=len(files))
    try:
        report("reading", 0, len(files))
        for i, src in enumerate(files, 1):
            report("reading", i, len(files))
            try:
                sha = _checksum(src)
            except (OSError, zipfile.BadZipFile, RuntimeError) as exc:
                skipped.append(Skipped(src.name, UNREADABLE, imaging.short_error(exc)))
                continue
            if sha == _EMPTY_SHA256:
                skipped.append(Skipped(src.name, imaging.EMPTY))
                continue
            if sha in first_by_sha:  # byte-identical copies are one image, whatever the options
                skipped.append(Skipped(src.name, DUPLICATE, f"same bytes as {first_by_sha[sha]}"))
                continue
            shas[src.name] = first_by_sha[sha] = sha
            unique.append(src)
            key = opts.image_key(sha)
            entry = cache.get(key)
            if entry is not None and (entry.get("error") or (images_dir / f"{key}.png").is_file()):
                results[src.name] = _Decoded.from_cache(key, entry)
            else:
                decoder.submit(_Job(key, src, opts.resolution, opts.crop, opts.keep_aspect))
        reused = len(results)
        for job, res in zip(decoder.jobs, decoder.results()):
            results[job.src.name] = res
    finally:
        decoder.close()
    jobs = decoder.jobs

    # What survives: decodable, big enough, not a duplicate (in source order, first one wins).
    warnings: list[str] = []
    usable: list[SourceFile] = []
    for src in unique:
        res = results[src.name]
        if res.error:
            skipped.append(Skipped(src.name, res.error, res.detail))
            continue
        res.size = res.size or opts.target_size(res.original_size)
        # Too small: more than 2x upscaling to make the training image (square or bucket alike).
        if imaging.scale_factor(res.original_size, opts.resolution, opts.crop, opts.keep_aspect) > 2:
            w, h = res.original_size
            target = f"{res.size[0]}x{res.size[1]}" if opts.keep_aspect else str(opts.resolution)
            if not opts.keep_small:
                skipped.append(Skipped(src.name, TOO_SMALL, f"{w}x{h} < half of {target} px; --keep-small to keep"))
                continue
            warnings.append(f"{src.name}: {w}x{h} is upscaled to {target} px and will look soft")
        usable.append(src)
    if not opts.keep_duplicates:
        # The size is part of "same pixels": a flat 4:3 and a flat 3:4 photo have equal bytes.
        cands = [
            Candidate(s.name, f"{results[s.name].size}{results[s.name].pixels}", results[s.name].phash) for s in usable
        ]
        dups = {d.name: d for d in find_duplicates(cands, max_bits=NEAR_DUPLICATE_BITS)}
        for name, dup in dups.items():
            if dup.exact:
                skipped.append(Skipped(name, DUPLICATE, f"same pixels as {dup.of}"))
            else:
                skipped.append(Skipped(name, NEAR_DUPLICATE, f"looks like {dup.of} ({dup.distance} bits differ)"))
        usable = [s for s in usable if s.name not in dups]
    skipped.sort(key=lambda s: s.name)

    records = [
        ImageRecord(
            f"{results[s.name].key}.png",
            s.name,
            shas[s.name],
            tuple(results[s.name].original_size),
            tuple(results[s.name].size),
        )
        for s in usable
    ]
    result = PrepareResult(
        out_dir,
        source_id,
        records,
        [],
        [],
        skipped,
        warnings,
        decoded=len(jobs),
        reused=reused,
        mode=mode,
        keep_aspect=opts.keep_aspect,
    )
    if not records:
        why = _reasons(skipped) or "no files"
        raise NoUsableImages(f"{source}: no usable photos ({why}); nothing was written to {out_dir}", result)
    names = [r.file for r in records]
    if len(set(names)) != len(names):  # same options + distinct bytes cannot collide; guard anyway
        raise RuntimeError("two source files map to the same image name")
    result.train, result.val = split_train_val(names, opts.val_fraction, opts.seed)
    captions, result.captions_kept, result.captions_new, additions_only = _merge_captions(
        out_dir, records, old if mode == "update" else None, opts
    )

    # Write: new images, captions, manifest (the switch), cache; then remove what is gone.
    for src, rec in zip(usable, records):
        png = results[src.name].png
        if png is not None:
            write_bytes(images_dir / rec.file, png)
    captions_path = out_dir / CAPTIONS
    if mode == "update" and additions_only:  # keeps the user's comments and line order
        old_caps = read_captions(captions_path)
        added = {n: c for n, c in captions.items() if n not in old_caps}
        if added:
            update_captions(captions_path, added)
    else:
        write_captions(captions_path, captions)
    manifest = Manifest(
        token=opts.token,
        class_word=opts.class_word,
        resolution=opts.resolution,
        seed=opts.seed,
        val_fraction=opts.val_fraction,
        train=result.train,
        val=result.val,
        images={r.file: r for r in records},
        source=source_id,
        options={
            "crop": opts.crop,
            "keep_aspect": opts.keep_aspect,
            "keep_duplicates": opts.keep_duplicates,
            "keep_small": opts.keep_small,
            "near_duplicate_bits": NEAR_DUPLICATE_BITS,
            "pipeline_version": PIPELINE_VERSION,
        },
    )
    manifest.save(out_dir)
    entries = {res.key: res.cache_entry() for res in results.values()}
    write_json(out_dir / CACHE_FILE, {"version": PIPELINE_VERSION, "entries": entries})
    result.removed = _remove_stale(images_dir, old, set(names), mode)
    return result


def _remove_stale(images_dir: Path, old: Manifest | None, keep: set[str], mode: str) -> int:
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


def _reasons(skipped: Sequence[Skipped]) -> str:
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
