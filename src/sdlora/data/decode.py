"""Decoding photos into training images (and their alpha or user masks), in parallel processes
(data/images.py does one).

A `Job` is one source file to decode with the options that shape its image; a `Decoded` is
what came out (PNG bytes and checksums, or why the file is unusable), and the entry that
`.prepare-cache.json` keeps of it. `Decoder` runs the jobs as they are found.
"""

from __future__ import annotations

import signal
import zipfile
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from sdlora.data import images as imaging
from sdlora.data.masks import NO_ALPHA, MaskResult, finish
from sdlora.data.sources import UNREADABLE, SourceFile, read_bytes
from sdlora.events import ProgressFn, no_progress


@dataclass(frozen=True)
class Job:
    key: str
    src: SourceFile
    resolution: int
    crop: str
    keep_aspect: bool = False
    alpha: bool = False  # also make the mask from the photo's alpha channel (--masks alpha)
    mask: str | None = None  # a user's mask file to put through the photo's transform (--masks FOLDER)
    dilate: int = 0  # mask dilation, pixels of the prepared image


@dataclass
class Decoded:
    key: str
    png: bytes | None = None
    pixels: str = ""
    phash: str = ""
    original_size: tuple[int, int] = (0, 0)
    error: str | None = None  # reason category
    detail: str = ""
    size: tuple[int, int] | None = None  # of the prepared image; None from caches that predate it
    # The mask, when the job asked for one: PNG and checks, why there is none, or why the user's is unusable.
    mask: MaskResult | None = None
    first_frame: str = ""  # "animated GIF, 12 frames": a file of several images, of which the first is used

    def cache_entry(self) -> dict:
        entry = {
            "pixels": self.pixels,
            "phash": self.phash,
            "original_size": list(self.original_size),
            "size": list(self.size) if self.size else None,
            "error": self.error,
            "detail": self.detail,
        }
        if self.first_frame:  # only then, so the caches of single-frame files keep their bytes
            entry["first_frame"] = self.first_frame
        return entry

    @classmethod
    def from_cache(cls, key: str, entry: dict) -> "Decoded":
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
            first_frame=str(entry.get("first_frame", "")),
        )


def decode(job: Job) -> Decoded:
    """Worker: one file -> PNG bytes and its checksums, or why it is unusable. Never raises."""
    try:
        data = read_bytes(job.src)
    except (OSError, zipfile.BadZipFile, RuntimeError) as exc:
        return Decoded(job.key, error=UNREADABLE, detail=imaging.short_error(exc))
    mask_bytes = None
    if job.mask is not None:
        try:
            mask_bytes = Path(job.mask).read_bytes()
        except OSError as exc:
            return Decoded(job.key, mask=MaskResult(error=f"cannot be read ({imaging.short_error(exc)})"))
    try:
        prepared = imaging.prepare_image(
            data, job.resolution, job.crop, job.keep_aspect, alpha=job.alpha, mask=mask_bytes
        )
    except imaging.BadImage as exc:
        return Decoded(job.key, error=exc.reason, detail=exc.detail)
    except imaging.BadMask as exc:  # the photo is fine, its mask is not: the parent refuses the run
        return Decoded(job.key, mask=MaskResult(error=str(exc)))
    img = prepared.image
    mask = None
    if job.alpha or job.mask is not None:
        mask = finish(prepared.mask, job.dilate) if prepared.mask is not None else NO_ALPHA
    return Decoded(
        job.key,
        imaging.png_bytes(img),
        imaging.pixel_digest(img),
        imaging.perceptual_hash(img),
        prepared.original_size,
        size=img.size,
        mask=mask,
        first_frame=imaging.first_frame_note(prepared.format, prepared.frames) or "",
    )


def init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    imaging.register_heif(decode_threads=1)


def warm() -> None:
    """Pay a worker's one-off import costs while the parent is still reading files."""
    imaging.perceptual_hash(imaging.Image.new("RGB", (8, 8)))


class Decoder:
    """Decodes jobs as they are found: in `workers` processes, or in this process for 1.

    The pool starts with the first job, so its start-up overlaps the parent's checksumming
    of the remaining files, and a re-run with nothing to decode starts no processes at all.
    Every worker uses one libheif thread: the parallelism comes from the processes.
    """

    def __init__(self, workers: int, on_progress: ProgressFn | None, most_jobs: int):
        self.workers = max(1, min(workers, most_jobs))
        self.report = on_progress or no_progress
        self.jobs: list[Job] = []
        self._futures: list[Future] = []
        self._pool: ProcessPoolExecutor | None = None
        self._warmups: list[Future] = []

    def submit(self, job: Job) -> None:
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
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context, initializer=init_worker)
            self._warmups = [self._pool.submit(warm) for _ in range(self.workers)]
        self._futures.append(self._pool.submit(decode, job))

    def results(self) -> list[Decoded]:
        """All results, in submission order, reporting ("decoding", done, total)."""
        total = len(self.jobs)
        if not total:
            return []
        self.report("decoding", 0, total)
        if self._pool is None:
            imaging.register_heif(decode_threads=1)
            out = []
            for i, job in enumerate(self.jobs, 1):
                out.append(decode(job))
                self.report("decoding", i, total)
            return out
        # Until the first worker is up (process start and imports take ~0.5 s), the parent
        # decodes queued jobs itself, from the back, so that start-up time is not lost.
        imaging.register_heif(decode_threads=1)
        local: dict[int, Decoded] = {}
        pending = set(self._futures)
        while pending:
            if not any(f.done() for f in self._warmups):
                stolen = next((i for i in reversed(range(total)) if i not in local and self._futures[i].cancel()), None)
                if stolen is not None:
                    local[stolen] = decode(self.jobs[stolen])
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
