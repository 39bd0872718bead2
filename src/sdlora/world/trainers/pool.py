"""The scene pool: base scenes rendered once (two shards, one per process), read by every trainer.

Rendering costs about as much as a training step (14 ms a scene), so the VAE, the CLIP and the
UNet sample their batches from this fixed pool instead of rendering their own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sdlora.world.scenes import sample_scene
from sdlora.world.trainers.common import WORK

SIZE = 32  # the world's image side: 16x16x4 latents through the two-block VAE
COUNT = 12_000  # scenes in the pool, in all
SHARDS = 2
SEED = 1919


class Pool(NamedTuple):
    images: np.ndarray  # uint8 (n, SIZE, SIZE, 3)
    captions: list[str]


def pool_count(scale: float) -> int:
    """Scenes per shard at a --steps-scale (at least 64, so a tiny build still has variety)."""
    return max(64, round(COUNT * scale / SHARDS))


def shard_path(out: Path, shard: int, count: int) -> Path:
    return out / WORK / f"pool-{SIZE}px-{count}-{shard}.npz"


def render_shard(out: Path, shard: int, scale: float) -> Path:
    """Render shard `shard` (skipped when already there) and return its path."""
    from sdlora.fsutil import atomic_path

    count = pool_count(scale)
    path = shard_path(out, shard, count)
    if path.is_file():
        print(f"[pool] shard {shard}: {path.name} already rendered", flush=True)
        return path
    rng = np.random.default_rng([SEED, shard])
    images, captions = [], []
    for i in range(count):
        image, caption, _, _ = sample_scene(rng, SIZE)
        images.append(np.asarray(image))
        captions.append(caption)
        if (i + 1) % 2000 == 0:
            print(f"[pool] shard {shard}: {i + 1}/{count} scenes", flush=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=np.stack(images), captions=np.array(json.dumps(captions)))
    print(f"[pool] shard {shard}: {count} scenes -> {path.name}", flush=True)
    return path


def load_pool(out: Path, scale: float) -> Pool:
    count = pool_count(scale)
    images, captions = [], []
    for shard in range(SHARDS):
        path = shard_path(out, shard, count)
        if not path.is_file():
            render_shard(out, shard, scale)
        with np.load(path, allow_pickle=False) as data:
            images.append(data["images"])
            captions += json.loads(str(data["captions"]))
    return Pool(np.concatenate(images), captions)


def sample_batch(pool: Pool, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, list[str]]:
    idx = rng.integers(len(pool.captions), size=batch)
    return pool.images[idx], [pool.captions[i] for i in idx]


def main(argv: list[str] | None = None) -> None:
    import argparse

    from sdlora.world.trainers.common import one_thread

    parser = argparse.ArgumentParser(prog="python -m sdlora.world.trainers.pool")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps-scale", type=float, default=1.0)
    parser.add_argument("--shard", type=int, required=True, choices=range(SHARDS))
    args = parser.parse_args(argv)
    one_thread()
    render_shard(args.out, args.shard, args.steps_scale)


if __name__ == "__main__":
    main()
