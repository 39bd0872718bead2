"""The `--masks` part of `sdlora prepare` (data/ingest.py calls it at each of its steps).

1. before listing: the mask folder is read (a non-image is refused) and kept out of the photos;
2. after listing: user masks are matched to photos by stem; each photo gets its mask's content
   address (`masks.mask_key`: image key, source identity, dilation) and the decoder is asked for the
   alpha or user mask unless `.prepare-cache.json` ("masks") has that mask already;
3. after decoding: a bad user mask (not an image, another shape) refuses the whole run, before
   anything is written; auto masks are made for the kept images not cached;
4. writing: masks/<image name>, the records' mask fields, the cache, and masks no longer listed.

Without `--masks` none of it runs and the dataset is exactly what it was before masks existed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from sdlora.data.decode import Decoded
from sdlora.data.manifest import ImageRecord
from sdlora.data.masks import (
    ALPHA,
    AUTO,
    DEFAULT_MASK_PROMPT,
    FOLDER,
    MASKS,
    NO_MASK_FILE,
    MaskOptions,
    MaskResult,
    finish,
    mask_key,
    mask_problem,
    match_masks,
    read_mask_folder,
)
from sdlora.data.sources import SourceFile
from sdlora.errors import DataError
from sdlora.events import ProgressFn, no_progress
from sdlora.fsutil import write_bytes

_OUR_MASK = re.compile(r"^[0-9a-f]{16}\.png$")
_AUTO_CHUNK = 64  # prepared images held in memory at once while auto-masking


class MaskStep:
    def __init__(self, opts: MaskOptions, resolution: int, out_dir: Path, cache: dict[str, Any]):
        self.opts = opts
        self.kind = opts.kind
        self.dilate_px = opts.dilate_px(resolution)
        self.dir = out_dir / MASKS
        self.cache = cache  # image file -> {"key", "coverage", "pieces", "none", "source"}
        self.files: dict[str, Path] = {}  # photo name -> the user's mask file
        self.keys: dict[str, str] = {}  # image file -> mask key
        self.results: dict[str, MaskResult] = {}  # image file -> mask made in this run or cached
        self.sources: dict[str, dict] = {}  # image file -> manifest mask_source
        self.made = 0
        self.reused = 0
        self._identity = ""
        if self.kind == ALPHA:
            self._identity = "alpha"
        elif self.kind == AUTO:
            from sdlora.data.automask import model_revision

            self._identity = f"auto|{opts.model}@{model_revision(opts.model)}|{DEFAULT_MASK_PROMPT}|{opts.threshold}"

    # ------------------------------------------------------------------ 1-2: listing and planning

    def exclude(self) -> list[Path]:
        return [self.opts.folder] if self.kind == FOLDER else []

    def match(self, photos: Sequence[SourceFile], out_dir: Path) -> list[str]:
        """Match user masks to photos; warning lines for mask files that match none."""
        if self.kind != FOLDER:
            return []
        listed = read_mask_folder(self.opts.folder, exclude=out_dir)
        self.files, unmatched = match_masks(listed, [p.name for p in photos], self.opts.folder)
        if not unmatched:
            return []
        more = f"; +{len(unmatched) - 3} more" if len(unmatched) > 3 else ""
        return [f"--masks {self.opts.folder}: {len(unmatched)} mask files unused: {'; '.join(unmatched[:3])}{more}"]

    def plan(self, src: SourceFile, image_key: str) -> bool:
        """Give `src` its mask key; True when the decoder must make its mask (not cached)."""
        if self.kind is None:
            return False
        identity = self._identity
        if self.kind == FOLDER:
            path = self.files.get(src.name)
            if path is None:
                return False  # no mask file: the image trains on the whole frame
            try:
                identity = "file|" + hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                raise DataError(f"--masks {self.opts.folder}: cannot read {path.name} ({exc.strerror})") from None
        image_file = f"{image_key}.png"
        key = self.keys[image_file] = mask_key(image_key, identity, self.dilate_px)
        cached = self._cached(image_file, key)
        return self.kind != AUTO and cached is None

    def job_fields(self, src: SourceFile) -> dict[str, Any]:
        """What `decode.Job` needs to make `src`'s mask in the worker."""
        mask = self.files.get(src.name)
        return {
            "alpha": self.kind == ALPHA,
            "mask": str(mask) if mask is not None else None,
            "dilate": self.dilate_px,
        }

    def _cached(self, image_file: str, key: str) -> MaskResult | None:
        entry = self.cache.get(image_file)
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        if entry.get("none") is None and not (self.dir / image_file).is_file():
            return None
        return MaskResult(None, entry.get("coverage", 0.0), entry.get("pieces", 0), entry.get("none"))

    # ------------------------------------------------------------------ 3: after decoding

    def check_errors(self, photos: Sequence[SourceFile], results: dict[str, Decoded]) -> None:
        """A user mask that cannot be used refuses the run (one line), before anything is written."""
        bad = [
            f"{self.files[s.name].relative_to(self.opts.folder).as_posix()} {results[s.name].mask.error}"
            for s in photos
            if results[s.name].mask is not None and results[s.name].mask.error
        ]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DataError(f"--masks {self.opts.folder}: {bad[0]}{more}; nothing was written")

    def make(
        self,
        kept: Sequence[tuple[SourceFile, ImageRecord]],
        results: dict[str, Decoded],
        images_dir: Path,
        class_word: str,
        on_progress: ProgressFn | None,
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Masks for the kept images (decoded, cached, or auto now); fills the records' mask fields.

        Returns (photos without a mask, why) and (photos whose mask looks wrong, why)."""
        if self.kind is None:
            return [], []
        todo = []
        for src, rec in kept:
            key = self.keys.get(rec.file)
            made = results[src.name].mask
            if made is not None:
                self.results[rec.file] = made
                self.made += made.none is None
            elif key is not None and (cached := self._cached(rec.file, key)) is not None:
                self.results[rec.file] = cached
                self.reused += cached.none is None
                self.sources[rec.file] = self.cache[rec.file].get("source") or {}
            elif self.kind == FOLDER and src.name not in self.files:
                self.results[rec.file] = MaskResult(none=NO_MASK_FILE)
            elif self.kind == AUTO:
                todo.append((src, rec))
            else:  # cannot happen: the decoder was asked for it
                raise RuntimeError(f"no mask made for {src.name}")
        if todo:
            self._auto(todo, results, images_dir, class_word, on_progress)
        unmasked, problems = [], []
        for src, rec in kept:
            res = self.results[rec.file]
            if res.none is not None:
                unmasked.append((src.name, res.none))
                continue
            rec.mask = rec.file
            rec.mask_coverage = res.coverage
            rec.mask_source = self.sources.get(rec.file) or self._source(src)
            why = mask_problem(res.coverage, res.pieces)
            if why:
                problems.append((src.name, why))
        if len(unmasked) == len(kept) and self.kind == ALPHA:
            raise DataError(
                f"--masks alpha: none of the {len(kept)} photos has an alpha channel (transparency); "
                "use cut-outs (PNG/HEIC with transparency), --masks auto, or a folder of masks; nothing was written"
            )
        return unmasked, problems

    def _source(self, src: SourceFile) -> dict[str, Any]:
        if self.kind == ALPHA:
            return {"kind": "alpha"}
        return {"kind": "file", "path": str(self.files[src.name].resolve())}

    def _auto(self, todo, results: dict[str, Decoded], images_dir: Path, class_word: str, on_progress) -> None:
        from sdlora.data.automask import AutoMasker

        report = on_progress or no_progress
        masker = AutoMasker(self.opts.model, threshold=self.opts.threshold)
        total = len(todo)
        report("masking", 0, total)
        for start in range(0, total, _AUTO_CHUNK):
            chunk = todo[start : start + _AUTO_CHUNK]
            images = []
            for src, rec in chunk:
                png = results[src.name].png
                with Image.open(io.BytesIO(png) if png is not None else images_dir / rec.file) as img:
                    images.append(img.convert("RGB"))
            for (_src, rec), arr in zip(chunk, masker(images, class_word)):
                self.results[rec.file] = finish(arr, self.dilate_px)
                self.sources[rec.file] = masker.source()
                self.made += 1
            report("masking", min(start + _AUTO_CHUNK, total), total)

    # ------------------------------------------------------------------ 4: writing

    def write(self, records: Sequence[ImageRecord]) -> None:
        for rec in records:
            res = self.results.get(rec.file)
            if res is not None and res.png is not None:
                write_bytes(self.dir / rec.file, res.png)

    def cache_json(self, records: Sequence[ImageRecord]) -> dict[str, Any]:
        out = {}
        for rec in records:
            res = self.results.get(rec.file)
            if res is None:
                continue
            out[rec.file] = {**res.cache_entry(), "key": self.keys.get(rec.file), "source": rec.mask_source}
        return out

    def remove_stale(self, records: Sequence[ImageRecord]) -> None:
        """Delete mask files no image lists any more (all of them when this run has no --masks)."""
        if not self.dir.is_dir():
            return
        keep = {rec.mask for rec in records if rec.mask}
        for path in self.dir.iterdir():
            if path.is_file() and path.name not in keep and _OUR_MASK.match(path.name):
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # only when empty
