"""Shared test fixtures. Every test runs offline (HF_HUB_OFFLINE=1) on tiny models."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DREAMBENCH = SHARED_DATA / "dreambench"


# The longest tests (a world-sd or world-flux model trained and sampled: 20-90 s each) are collected first.
# pytest-xdist's `--dist loadgroup` hands out the xdist groups first (most tests first) and then the other
# tests in collection order, so these start early and the two workers end together, rather than one of
# them training alone at the end.
LONGEST_FIRST = ("test_world_learning.py", "test_demo.py", "test_world_flux.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order


def one_line_error(result, *fragments: str) -> None:
    """A CLI result that failed the way users are promised: exit 1 and one `error: ...` line naming the problem."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models are faster on one thread, and far faster when other jobs share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    """sdlora's consoles print 200 columns in tests, so no asserted line wraps at a long tmp path
    (pytest-xdist's worker folders make them longer). The consoles are made at import, so COLUMNS
    set by a test would come too late for them; help screens are not these consoles."""
    from sdlora.cli import _common

    for console in (_common.console, _common.err_console):
        monkeypatch.setattr(console, "_width", 200)


@pytest.fixture
def dreambench() -> Path:
    """The shared real photos (../shared/data/dreambench), or skip with the reason."""
    if not DREAMBENCH.is_dir():
        pytest.skip(f"real test photos not found at {DREAMBENCH} (see ../shared/data/README.md)")
    return DREAMBENCH


def write_tiny_dataset(
    folder: Path,
    n: int = 6,
    resolution: int = 64,
    token: str = "sksToy",
    class_word: str = "toy",
    seed: int = 0,
) -> Path:
    """A prepared dataset that follows the contract (images/, captions.txt, manifest.json).

    Images are coloured shapes on varied backgrounds, deterministic for a seed; the split puts
    the last fifth (at least one) in val.
    """
    from PIL import Image, ImageDraw

    from sdlora.data.captions import write_captions
    from sdlora.data.manifest import ImageRecord, Manifest

    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records, names = {}, []
    for i in range(n):
        bg = tuple(rng.randrange(256) for _ in range(3))
        fg = tuple(rng.randrange(256) for _ in range(3))
        img = Image.new("RGB", (resolution, resolution), bg)
        draw = ImageDraw.Draw(img)
        r = resolution // 4 + rng.randrange(resolution // 8)
        c = resolution // 2 + rng.randrange(-4, 5)
        draw.ellipse([c - r, c - r, c + r, c + r], fill=fg)
        name = f"img_{i:03d}.png"
        img.save(images / name)
        digest = hashlib.sha256((images / name).read_bytes()).hexdigest()
        records[name] = ImageRecord(name, f"photos/{name}", digest, (resolution, resolution), (resolution, resolution))
        names.append(name)
    n_val = max(1, n // 5)
    manifest = Manifest(
        token=token,
        class_word=class_word,
        resolution=resolution,
        seed=seed,
        train=names[:-n_val],
        val=names[-n_val:],
        images=records,
        source="tests",
    )
    manifest.save(folder)
    write_captions(folder / "captions.txt", {name: f"a photo of {token} {class_word}" for name in names})
    return folder


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A 6-image, 64 px prepared dataset in tmp_path/dataset."""
    return write_tiny_dataset(tmp_path / "dataset")


# Phone-camera shapes: 4:3 landscape, 3:4 portrait, square.
LANDSCAPE, PORTRAIT, SQUARE = (4032, 3024), (3024, 4032), (3000, 3000)


def write_aspect_dataset(
    folder: Path,
    originals: list[tuple[int, int]],
    n_val: int = 1,
    resolution: int = 256,
    token: str = "sksToy",
    class_word: str = "toy",
) -> Path:
    """A keep-aspect prepared dataset: each photo of `originals` (width, height) is written at its
    aspect bucket, as `sdlora prepare --keep-aspect` does; the last `n_val` go to val."""
    from PIL import Image, ImageDraw

    from sdlora.data.buckets import bucket_size
    from sdlora.data.captions import write_captions
    from sdlora.data.manifest import ImageRecord, Manifest

    rng = random.Random(len(originals))
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records, names = {}, []
    for i, original in enumerate(originals):
        w, h = bucket_size(*original, resolution)
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        r = min(w, h) // 3
        ImageDraw.Draw(img).ellipse(
            [w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r], fill=tuple(rng.randrange(256) for _ in range(3))
        )
        name = f"img_{i:03d}.png"
        img.save(images / name)
        digest = hashlib.sha256((images / name).read_bytes()).hexdigest()
        records[name] = ImageRecord(name, f"photos/{name}", digest, original, (w, h))
        names.append(name)
    manifest = Manifest(
        token=token,
        class_word=class_word,
        resolution=resolution,
        seed=0,
        train=names[: len(names) - n_val],
        val=names[len(names) - n_val :],
        images=records,
        options={"crop": "center", "keep_aspect": True},
        source="tests",
    )
    manifest.save(folder)
    write_captions(folder / "captions.txt", {name: f"a photo of {token} {class_word}" for name in names})
    return folder
