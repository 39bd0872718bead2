"""How fast `sdlora prepare` turns photos into a dataset: photos/s, serial vs parallel.

Two photo sets:
  shared   every HEIC in ../shared/data/dreambench (phone-style, longest side 1024 px)
  12mp     synthetic 12-MP (4032x3024) HEICs made like a phone's: 512x512 grid tiles,
           ~2-3 MB each; rendered once and cached in $SDLORA_CACHE/bench-12mp (or ~/.cache/sdlora);
           BENCH_GRAIN=2 renders heavier ~3.7 MB files

For each set: a cold `prepare_dataset` with --workers 1 and with --workers N (fresh output
folders, nothing re-used), then a warm re-run (everything re-used). Run from the repository root:

    python benchmarks/prepare.py                 # both sets, workers 1 vs 2
    python benchmarks/prepare.py --set 12mp --count 24 --workers 2 --resolution 1024

Targets (issue 2): parallel >= 1.8x serial on 2 cores; >= 5 photos/s for 12-MP HEICs on 2 cores.
The figures depend on what else runs on the machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO.parent / "shared" / "data" / "dreambench"
TWELVE_MP = (4032, 3024)
# Pixel noise amplitude of the synthetic photos. It sets the file size, and HEVC decoding time
# grows with it: 1 gives ~2.5 MB per photo (a typical 12-MP phone HEIC), 2 gives ~3.7 MB.
GRAIN = int(os.environ.get("BENCH_GRAIN", "1"))


def shared_set(folder: Path) -> Path:
    if not DREAMBENCH.is_dir():
        raise SystemExit(f"{DREAMBENCH}: shared photos not found")
    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted(DREAMBENCH.glob("*/*.HEIC")):
        dst = folder / f"{src.parent.name}_{src.name}"
        if not dst.exists():
            os.symlink(src, dst)
    return folder


def _render_12mp(args: tuple[int, Path]) -> Path:
    """One phone-like 12-MP HEIC: a dreambench photo upscaled, a shifted crop, light grain."""
    import pillow_heif
    from PIL import Image

    index, path = args
    pillow_heif.register_heif_opener()
    pillow_heif.options.GRID_TILE_SIZE = 512  # phones store 12-MP HEICs as a grid of 512x512 tiles
    sources = sorted(DREAMBENCH.glob("*/*.HEIC"))
    base = Image.open(sources[index % len(sources)]).convert("RGB")
    rng = np.random.default_rng(index)
    w, h = TWELVE_MP
    zoom = base.resize((int(w * 1.1), int(w * 1.1)), Image.Resampling.BICUBIC)
    left, top = int(rng.integers(0, zoom.width - w)), int(rng.integers(0, zoom.height - h))
    arr = np.asarray(zoom.crop((left, top, left + w, top + h)), dtype=np.int16)
    arr = arr + rng.integers(-GRAIN, GRAIN + 1, size=arr.shape, dtype=np.int16)  # sensor grain
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    tmp = path.with_suffix(".tmp.heic")
    img.save(tmp, quality=80, enc_params={"preset": "ultrafast"})
    tmp.replace(path)
    return path


def twelve_mp_set(count: int) -> Path:
    cache = Path(os.environ.get("SDLORA_CACHE") or Path.home() / ".cache" / "sdlora") / f"bench-12mp-grain{GRAIN}"
    cache.mkdir(parents=True, exist_ok=True)
    todo = [(i, cache / f"IMG_{9000 + i}.HEIC") for i in range(count) if not (cache / f"IMG_{9000 + i}.HEIC").exists()]
    if todo:
        print(f"rendering {len(todo)} synthetic 12-MP HEICs into {cache} (once) ...", flush=True)
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            list(pool.map(_render_12mp, todo))
    folder = Path(tempfile.mkdtemp(prefix="bench-12mp-"))
    for i in range(count):
        os.symlink(cache / f"IMG_{9000 + i}.HEIC", folder / f"IMG_{9000 + i}.HEIC")
    return folder


def run(source: Path, out: Path, workers: int, resolution: int) -> tuple[float, int, int]:
    from sdlora.data.ingest import prepare_dataset

    start = time.perf_counter()
    result = prepare_dataset(str(source), out, resolution=resolution, workers=workers, keep_duplicates=True)
    return time.perf_counter() - start, len(result.records), result.decoded


def cpu_per_photo(files: list[Path], resolution: int) -> float:
    """CPU seconds one decode worker spends per photo (process time, so other load barely matters)."""
    from sdlora.data import images, ingest

    images.register_heif(decode_threads=1)
    ingest._warm()
    start = time.process_time()
    for path in files:
        ingest._decode(ingest._Job("bench", ingest.SourceFile(path.name, path), resolution, "center"))
    return (time.process_time() - start) / len(files)


def bench(name: str, source: Path, workers: int, resolution: int) -> None:
    files = sorted(p for p in source.iterdir())
    mb = sum(p.stat().st_size for p in files) / len(files) / 1e6
    from PIL import Image

    from sdlora.data.images import register_heif

    register_heif()
    size = Image.open(files[0]).size
    print(f"\n{name}: {len(files)} HEICs, {size[0]}x{size[1]}, {mb:.1f} MB each, -> {resolution} px")
    with tempfile.TemporaryDirectory() as tmp:
        serial, n, _ = run(source, Path(tmp) / "serial", 1, resolution)
        parallel, _, _ = run(source, Path(tmp) / "parallel", workers, resolution)
        rerun, _, decoded = run(source, Path(tmp) / "parallel", workers, resolution)
    cpu = cpu_per_photo(files, resolution)
    print(f"  CPU per photo    {cpu:6.3f} s  (decode+orient+resize+PNG+hashes, one thread; load-independent)")
    print(f"  ceiling on {workers} idle cores: {workers / cpu:6.2f} photos/s")
    print(f"  workers=1        {serial:6.2f} s  {n / serial:6.2f} photos/s")
    print(f"  workers={workers:<8d}{parallel:6.2f} s  {n / parallel:6.2f} photos/s  speed-up {serial / parallel:.2f}x")
    print(f"  re-run (re-use)  {rerun:6.2f} s  {n / rerun:6.1f} photos/s  (decoded {decoded})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=["shared", "12mp", "both"], default="both")
    parser.add_argument("--count", type=int, default=20, help="synthetic 12-MP photos")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPU cores; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min)")
    if args.set in ("shared", "both"):
        folder = Path(tempfile.mkdtemp(prefix="bench-shared-"))
        try:
            bench("shared dreambench", shared_set(folder), args.workers, args.resolution)
        finally:
            shutil.rmtree(folder)
    if args.set in ("12mp", "both"):
        folder = twelve_mp_set(args.count)
        try:
            bench("synthetic 12-MP", folder, args.workers, args.resolution)
        finally:
            shutil.rmtree(folder)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
