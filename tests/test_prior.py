"""Prior-preservation class images: generated once on tiny-sd, cached, deterministic per index."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdlora.errors import ConfigError
from sdlora.models import load_pipeline
from sdlora.train.prior import ensure_class_images

STEPS = 2  # inference steps: enough to exercise the pipeline, cheap on tiny-sd


@pytest.fixture(scope="module")
def tiny_sd():
    return load_pipeline("tiny-sd")


def _ensure(pipe_arch, folder, **overrides):
    pipe, arch = pipe_arch
    kwargs = dict(
        class_prompt="a photo of a toy",
        num_images=2,
        folder=folder,
        resolution=64,
        seed=11,
        device="cpu",
        model_id="tiny-sd",
        num_inference_steps=STEPS,
    )
    kwargs.update(overrides)
    return ensure_class_images(pipe, arch, **kwargs)


def _pixels(path):
    return np.asarray(Image.open(path))


def test_generates_missing_images_then_reuses_them(tiny_sd, tmp_path):
    events = []
    paths = _ensure(tiny_sd, tmp_path / "class", on_progress=lambda *e: events.append(e))
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    assert events[0] == ("class images", 0, 2) and events[-1] == ("class images", 2, 2)
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
            assert image.text["sdlora:class_prompt"] == "a photo of a toy"
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == sorted(p.name for p in paths)  # no temp files

    # A second call generates nothing: no progress, files untouched.
    mtimes = [p.stat().st_mtime_ns for p in paths]
    again_events = []
    again = _ensure(tiny_sd, tmp_path / "class", on_progress=lambda *e: again_events.append(e))
    assert again == paths and again_events == []
    assert [p.stat().st_mtime_ns for p in paths] == mtimes


def test_each_image_is_deterministic_per_seed_and_index(tiny_sd, tmp_path):
    first = _ensure(tiny_sd, tmp_path / "a", batch_size=2)
    # Image 1 made alone, after deleting it, equals image 1 made in a batch with image 0.
    before = _pixels(first[1])
    first[1].unlink()
    events = []
    _ensure(tiny_sd, tmp_path / "a", batch_size=1, on_progress=lambda *e: events.append(e))
    assert events[-1] == ("class images", 1, 1)  # only the missing one
    assert np.abs(_pixels(first[1]).astype(int) - before.astype(int)).max() <= 1
    assert not np.array_equal(_pixels(first[0]), _pixels(first[1]))  # different indices, different images


def test_other_prompt_or_seed_does_not_reuse_images(tiny_sd, tmp_path):
    folder = tmp_path / "class"
    base = _ensure(tiny_sd, folder)
    other_seed = _ensure(tiny_sd, folder, seed=12)
    other_prompt = _ensure(tiny_sd, folder, class_prompt="a photo of a dog")
    assert not set(base) & set(other_seed) and not set(base) & set(other_prompt)
    assert not np.array_equal(_pixels(base[0]), _pixels(other_seed[0]))


def test_user_images_in_the_folder_count_first(tiny_sd, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (64, 64), "red").save(folder / "my_toy.jpg")
    paths = _ensure(tiny_sd, folder, num_images=2)
    assert paths[0] == folder / "my_toy.jpg"
    assert len(paths) == 2 and paths[1].name.startswith("class-")


def test_processes_generate_their_share(tiny_sd, tmp_path):
    folder = tmp_path / "class"
    _ensure(tiny_sd, folder, num_images=3, process_index=1, num_processes=2)
    assert len(list(folder.glob("class-*.png"))) == 1  # index 1 only
    events = []
    paths = _ensure(tiny_sd, folder, num_images=3, on_progress=lambda *e: events.append(e))
    assert events[-1] == ("class images", 2, 2) and all(p.is_file() for p in paths)


def test_zero_images_and_empty_prompt(tiny_sd, tmp_path):
    assert _ensure(tiny_sd, tmp_path / "none", num_images=0) == []
    with pytest.raises(ConfigError, match="--class-prompt"):
        _ensure(tiny_sd, tmp_path / "x", class_prompt="  ")


def test_steps_and_guidance_are_the_models_own_as_sample_draws(tiny_sd, tmp_path, monkeypatch):
    """Left unset, the class images take the loaded model's sampling steps and guidance (a step-distilled
    model's 4 steps, not a fixed 30), as `sdlora sample` would draw them."""
    pipe, arch = tiny_sd
    monkeypatch.setattr(type(arch), "sample_steps", lambda self, pipe: 3)
    monkeypatch.setattr(type(arch), "guidance_for", lambda self, pipe: 2.5)
    calls = []
    draw = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__", lambda self, **kw: calls.append(kw) or draw(self, **kw))
    _ensure(tiny_sd, tmp_path / "class", num_inference_steps=None)
    assert [(c["num_inference_steps"], c["guidance_scale"]) for c in calls] == [(3, 2.5)]
