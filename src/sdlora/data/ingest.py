"""`sdlora prepare`: photos (folder, .zip, Yandex Disk link) -> a prepared dataset folder.

Steps, each reported through `on_progress(description, done, total)`:
  1. check the output folder (refuse to overwrite a different dataset unless `force`: data/outdir.py),
     that it can be written, take its lock (sdlora.locks) and clear temp files of killed writes;
  2. list the source files, skipping system files, videos and unsafe archive names by name
     (data/sources.py);
  3. read and checksum every file (sha256 of the bytes, for the manifest and the cache);
  4. decode the files not decoded before, in parallel processes (data/decode.py, data/images.py);
  5. drop what is unusable: unreadable, too small, duplicates (data/dedupe.py);
  6. split train/val, merge captions, write images, captions.txt, manifest.json atomically.
With `masks` (`--masks auto|alpha|FOLDER`) data/maskstep.py adds a subject mask per image
(masks/, data/masks.py) at steps 2-6; without it the dataset is byte for byte what it was before.

At ~480 lines this module stays one piece: it is the pipeline, read top to bottom; each concern it
calls (sources, decode, dedupe, outdir, captions, masks) has its own module.

Re-use is content-addressed: an output image is named after the checksum of its source bytes
and the options that shape it, and `.prepare-cache.json` keeps what decoding learned (size,
pixel checksum, perceptual hash, or why the file is unusable). A re-run with the same
source and options decodes nothing. Nothing in the old dataset changes until every input has
been read and checked; old images are removed only after the new manifest is in place. The
marker `.sdlora-incomplete` (data/outdir.py) is written before the first write and removed after
the last, so a prepare stopped half-way (full disk, kill -9, Ctrl-C) is finished by the same command.

With `keep_aspect` each image keeps its photo's shape at its aspect-ratio bucket
(data/buckets.py) instead of being made square. The manifest records each image's training
geometry (size and crop, data/buckets.py `geometry`) so `train` need not compute it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from sdlora.data import images as imaging
from sdlora.data.buckets import check_resolution, geometry
from sdlora.data.captions import (
    DEFAULT_TEMPLATE,
    check_class_word,
    read_captions,
    render_template,
    update_captions,
    write_captions,
)
from sdlora.data.decode import Decoded, Decoder, Job, decode, warm
from sdlora.data.dedupe import NEAR_DUPLICATE_BITS, Candidate, find_duplicates
from sdlora.data.manifest import CAPTIONS, DEFAULT_CLASS, DEFAULT_TOKEN, IMAGES, ImageRecord, Manifest
from sdlora.data.masks import DEFAULT_DILATE, DEFAULT_MASK_MODEL, DEFAULT_THRESHOLD, MaskOptions
from sdlora.data.maskstep import MaskStep
from sdlora.data.outdir import check_out_dir, dataset_source_id, mark_complete, mark_incomplete, remove_stale
from sdlora.data.sources import (
    MAX_ZIP_RATIO,
    MAX_ZIP_TOTAL,
    UNREADABLE,
    Skipped,
    SourceFile,
    checksum,
    close_archives,
    list_source,
)
from sdlora.errors import ConfigError, DataError
from sdlora.events import ProgressFn, no_progress
from sdlora.fsutil import check_writable, remove_stale_tmp, write_bytes, write_json
from sdlora.locks import folder_lock

__all__ = ["NoUsableImages", "Options", "PrepareResult", "SourceFile", "Skipped", "list_source", "prepare_dataset"]

# benchmarks/prepare.py times one worker's decode through these names.
_Job, _decode, _warm = Job, decode, warm

CACHE_FILE = ".prepare-cache.json"
PIPELINE_VERSION = 1  # bump when decoding/cropping changes what an image looks like

# Reason categories for files dropped after reading (sources.py and images.py have the others).
TOO_SMALL = "too small"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near duplicate"

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass
class PrepareResult:
    out_dir: Path
    source: str
    records: list[ImageRecord]  # kept images, in source order
    train: list[str]
    val: list[str]
    skipped: list[Skipped]
    warnings: list[str] = field(default_factory=list)
    masks: str | None = None  # --masks kind: "auto", "alpha", "folder", or None
    masks_made: int = 0  # masks made in this run
    masks_reused: int = 0  # masks reused from an earlier run
    unmasked: list[tuple[str, str]] = field(default_factory=list)  # (photo, why it has no mask)
    mask_problems: list[tuple[str, str]] = field(default_factory=list)  # (photo, why its mask looks wrong)
    decoded: int = 0  # files decoded in this run
    reused: int = 0  # files whose earlier result was re-used (content-addressed)
    removed: int = 0  # images of the earlier dataset that are gone from the source
    captions_kept: int = 0  # existing captions carried over
    captions_new: int = 0  # template captions written for new images
    mode: str = "new"  # "new", "update" (same source) or "replace" (--force)
    keep_aspect: bool = False  # images are at their buckets' sizes, not square
    first_frame: list[tuple[str, str]] = field(default_factory=list)  # (photo, "animated GIF, 12 frames")

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
    masks: MaskOptions = MaskOptions()

    def check(self) -> "Options":
        check_resolution(self.resolution, "--resolution")
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
        if self.masks.kind != "auto" and self.masks.model != DEFAULT_MASK_MODEL:
            raise ConfigError(f"--mask-model {self.masks.model}: only with --masks auto")
        class_word = check_class_word(self.class_word)
        if self.masks.kind == "auto":  # before minutes of decoding: the mask model reads 77 CLIP tokens
            from sdlora.data.automask import check_mask_prompt

            check_mask_prompt(class_word)
        return Options(**{**self.__dict__, "class_word": class_word, "masks": self.masks.check()})

    def image_key(self, source_sha256: str) -> str:
        """Content address of an output image: same bytes + same options -> same file name."""
        text = f"sdlora-prepare|v{PIPELINE_VERSION}|{source_sha256}|{self.resolution}|{self.crop}"
        if self.keep_aspect:  # appended only when on, so square datasets keep their names and cache
            text += "|keep-aspect"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def target_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return imaging.target_size(original_size, self.resolution, self.keep_aspect)


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


def _load_cache(out_dir: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(image entries, mask entries) of `.prepare-cache.json`; empty when there is none or it is broken."""
    try:
        data = json.loads((out_dir / CACHE_FILE).read_text(encoding="utf-8"))
        if data.get("version") == PIPELINE_VERSION and isinstance(data.get("entries"), dict):
            masks = data.get("masks")
            return data["entries"], masks if isinstance(masks, dict) else {}
    except (OSError, ValueError, AttributeError):
        pass  # no cache or a broken one: decode again
    return {}, {}


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
    masks: str | None = None,
    mask_model: str = DEFAULT_MASK_MODEL,
    mask_threshold: float = DEFAULT_THRESHOLD,
    mask_dilate: int = DEFAULT_DILATE,
    workers: int | None = None,
    force: bool = False,
    on_progress: ProgressFn | None = None,
    max_zip_total: int = MAX_ZIP_TOTAL,
    max_zip_ratio: float = MAX_ZIP_RATIO,
) -> PrepareResult:
    """Turn the photos in `source` into the dataset folder `out_dir` (see the module docstring).

    `masks` ("auto", "alpha" or a folder of the user's masks; data/masks.py) also writes a subject
    mask per image under masks/.

    Raises ConfigError for bad options, DataError for a source or output folder that cannot be
    used (or a bad mask), NoUsableImages when no photo survives. Never leaves a half-written dataset.
    """
    mask_opts = MaskOptions(masks, mask_model, mask_threshold, mask_dilate)
    opts = Options(
        resolution, crop, val_fraction, seed, token, class_word, keep_duplicates, keep_small, keep_aspect, mask_opts
    ).check()
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"--workers {workers}: use 1 or more")
    out_dir = Path(out_dir).expanduser()
    source_id = dataset_source_id(source)
    check_out_dir(out_dir, source_id, force)  # refuse a folder that is not ours before creating anything
    created = not out_dir.exists()
    check_writable(out_dir)  # a read-only or full --out fails now, not after decoding
    try:
        with folder_lock(out_dir, "prepare"):
            remove_stale_tmp(out_dir)  # temp files of writes a kill cut short
            mode, old = check_out_dir(out_dir, source_id, force)
            return _prepare(
                source, source_id, out_dir, mode, old, opts, workers, on_progress, max_zip_total, max_zip_ratio
            )
    finally:
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only when empty: nothing was written


def _prepare(
    source: str,
    source_id: str,
    out_dir: Path,
    mode: str,
    old: Manifest | None,
    opts: Options,
    workers: int,
    on_progress: ProgressFn | None,
    max_zip_total: int,
    max_zip_ratio: float,
) -> PrepareResult:
    report = on_progress or no_progress
    cache, mask_cache = _load_cache(out_dir) if mode in ("update", "resume") else ({}, {})
    masking = MaskStep(opts.masks, opts.resolution, out_dir, mask_cache)
    files, skipped = list_source(
        source,
        exclude=[out_dir, *masking.exclude()],
        on_progress=on_progress,
        max_zip_total=max_zip_total,
        max_zip_ratio=max_zip_ratio,
    )
    warnings: list[str] = masking.match(files, out_dir)

    # Checksum every file (the manifest records it, the cache is addressed by it) and hand each
    # new one to the decoder at once, so decoding overlaps reading.
    images_dir = out_dir / IMAGES
    shas: dict[str, str] = {}
    first_by_sha: dict[str, str] = {}
    unique: list[SourceFile] = []
    results: dict[str, Decoded] = {}
    decoder = Decoder(workers, on_progress, most_jobs=len(files))
    try:
        if files:  # an empty source shows no progress bar, only its error
            report("reading", 0, len(files))
        for i, src in enumerate(files, 1):
            report("reading", i, len(files))
            try:
                sha = checksum(src)
            except (OSError, zipfile.BadZipFile, RuntimeError) as exc:
                skipped.append(Skipped(src.name, UNREADABLE, imaging.short_error(exc)))
                continue
            if sha == _EMPTY_SHA256:
                skipped.append(Skipped(src.name, imaging.EMPTY))
                continue
            if sha in first_by_sha:  # byte-identical copies are one image, whatever the options
                skipped.append(Skipped(src.name, DUPLICATE, f"same bytes as {first_by_sha[sha]}"))
                continue
            shas[src.name], first_by_sha[sha] = sha, src.name
            unique.append(src)
            key = opts.image_key(sha)
            entry = cache.get(key)
            mask_needed = masking.plan(src, key)
            cached = entry is not None and (entry.get("error") or (images_dir / f"{key}.png").is_file())
            if cached and (entry.get("error") or not mask_needed):  # a cached failure needs no mask
                results[src.name] = Decoded.from_cache(key, entry)
            else:
                job_masks = masking.job_fields(src) if mask_needed else {}
                decoder.submit(Job(key, src, opts.resolution, opts.crop, opts.keep_aspect, **job_masks))
        reused = len(results)
        for job, res in zip(decoder.jobs, decoder.results()):
            results[job.src.name] = res
    finally:
        decoder.close()
        close_archives()
    jobs = decoder.jobs
    masking.check_errors(unique, results)  # a bad user mask: one line, nothing written

    # What survives: decodable, big enough, not a duplicate (in source order, first one wins).
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

    records = [_record(results[s.name], s.name, shas[s.name], opts) for s in usable]
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
        masks=opts.masks.kind,
        first_frame=[(s.name, results[s.name].first_frame) for s in usable if results[s.name].first_frame],
    )
    if not records:
        why = _reasons(skipped) or "no files in it"
        raise NoUsableImages(f"{source}: no usable photos ({why}); nothing was written to {out_dir}", result)
    names = [r.file for r in records]
    if len(set(names)) != len(names):  # same options + distinct bytes cannot collide; guard anyway
        raise RuntimeError("two source files map to the same image name")
    result.train, result.val = split_train_val(names, opts.val_fraction, opts.seed)
    result.unmasked, result.mask_problems = masking.make(
        list(zip(usable, records)), results, images_dir, opts.class_word, on_progress
    )
    result.masks_made, result.masks_reused = masking.made, masking.reused
    captions, result.captions_kept, result.captions_new, additions_only = _merge_captions(
        out_dir, records, old if mode == "update" else None, opts
    )

    # Write: the marker, new images, captions, manifest (the switch), cache; then remove what is
    # gone, and the marker. A kill anywhere before the end leaves the marker: readers refuse the
    # folder and the same command finishes it.
    mark_incomplete(out_dir, source_id)
    for src, rec in zip(usable, records):
        png = results[src.name].png
        if png is not None:
            write_bytes(images_dir / rec.file, png)
    masking.write(records)
    captions_path = out_dir / CAPTIONS
    if mode == "update" and additions_only:  # keeps the user's comments and line order
        old_caps = read_captions(captions_path)
        added = {n: c for n, c in captions.items() if n not in old_caps}
        if added:
            update_captions(captions_path, added)
    else:
        write_captions(captions_path, captions)
    options = {
        "crop": opts.crop,
        "keep_aspect": opts.keep_aspect,
        "keep_duplicates": opts.keep_duplicates,
        "keep_small": opts.keep_small,
        "near_duplicate_bits": NEAR_DUPLICATE_BITS,
        "pipeline_version": PIPELINE_VERSION,
    }
    if opts.masks.kind is not None:  # absent without --masks: such a manifest is as it was before masks
        options["masks"] = opts.masks.settings()
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
        options=options,
    )
    manifest.save(out_dir)
    entries = {res.key: res.cache_entry() for res in results.values()}
    cache_data = {"version": PIPELINE_VERSION, "entries": entries}
    if opts.masks.kind is not None:
        cache_data["masks"] = masking.cache_json(records)
    write_json(out_dir / CACHE_FILE, cache_data)
    result.removed = remove_stale(images_dir, old, set(names), mode)
    masking.remove_stale(records)
    mark_complete(out_dir)
    return result


def _record(res: Decoded, source: str, sha: str, opts: Options) -> ImageRecord:
    """The manifest's record of a kept image, with its training geometry at the dataset's resolution
    (`Manifest.geometry` reads it back for `train`)."""
    original = tuple(res.original_size)
    _size_hw, crop_top_left = geometry(original, opts.resolution, keep_aspect=opts.keep_aspect, crop=opts.crop)
    return ImageRecord(f"{res.key}.png", source, sha, original, tuple(res.size), crop_top_left)


def _reasons(skipped: Sequence[Skipped]) -> str:
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))
