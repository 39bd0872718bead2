"""data/manifest.py and data/buckets.py: a damaged manifest.json is one line naming the file and the
field; each image's training geometry is computed once, by prepare, and read back unchanged;
every stage's resolution is checked by one rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import LANDSCAPE, PORTRAIT, SQUARE, one_line_error, write_aspect_dataset, write_tiny_dataset
from sdlora.cli import app
from sdlora.data.buckets import check_resolution, geometry, resolution_problem
from sdlora.data.ingest import prepare_dataset
from sdlora.data.manifest import load_manifest
from sdlora.errors import ConfigError, DataError

# ---------------------------------------------------------------------------- the shape check

GOOD_RECORD = {"file": "a.png", "source": "a.jpg", "source_sha256": "0" * 64, "original_size": [8, 8], "size": [8, 8]}


@pytest.mark.parametrize(
    "data, fragment",
    [
        ([], "expected a JSON object of dataset fields, got a list"),
        (None, "expected a JSON object of dataset fields, got null"),
        ("manifest", "got a string"),
        ({"images": []}, "schema_version None is not supported"),
        ({"train": 5}, "schema_version None is not supported"),
        ({"schema_version": 1, "images": []}, "field 'images' must be an object of image records, got a list"),
        ({"schema_version": 1, "train": 5}, "field 'train' must be a list of image names, got int"),
        ({"schema_version": 1, "val": [1, 2]}, "field 'val' must be a list of image names"),
        ({"schema_version": 1, "resolution": "512"}, "field 'resolution' must be a whole number, got a string"),
        ({"schema_version": 1, "resolution": True}, "field 'resolution' must be a whole number, got bool"),
        ({"schema_version": 1, "options": None}, "field 'options' must be an object, got null"),
        ({"schema_version": 1, "token": 7}, "field 'token' must be a string"),
        ({"schema_version": 1, "images": {"a.png": "a.jpg"}}, "field 'images.a.png' must be an image record"),
        ({"schema_version": 1, "images": {"a.png": {"file": "a.png"}}}, "field 'images.a.png.source' is missing"),
        (
            {"schema_version": 1, "images": {"a.png": {**GOOD_RECORD, "size": [8]}}},
            "field 'images.a.png.size' must be [width, height], got [8]",
        ),
        (
            {"schema_version": 1, "images": {"a.png": {**GOOD_RECORD, "crop_top_left": "0,0"}}},
            "field 'images.a.png.crop_top_left' must be [top, left]",
        ),
        (
            {"schema_version": 1, "images": {"a.png": {**GOOD_RECORD, "mask": "../a.png"}}},
            "field 'images.a.png.mask' must be a file name inside masks/",
        ),
        (
            {"schema_version": 1, "images": {"a.png": {**GOOD_RECORD, "mask": "a.png", "mask_coverage": 1.5}}},
            "field 'images.a.png.mask_coverage' must be a number from 0 to 1",
        ),
        (
            {"schema_version": 1, "images": {"a.png": {**GOOD_RECORD, "mask": "a.png", "mask_source": "alpha"}}},
            "field 'images.a.png.mask_source' must be an object with 'kind'",
        ),
    ],
)
def test_wrong_shapes_are_one_data_error_line(tmp_path, data, fragment):
    ds = write_tiny_dataset(tmp_path / "ds")
    (ds / "manifest.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_manifest(ds)
    message = str(err.value)
    assert message.startswith(f"{ds / 'manifest.json'}: ") and fragment in message and "\n" not in message


def test_caption_check_reports_a_bad_manifest_in_one_line(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds")
    runner = CliRunner()
    for data, field in (([], "JSON object"), ({"schema_version": 1, "images": []}, "'images'")):
        (ds / "manifest.json").write_text(json.dumps(data), encoding="utf-8")
        for args in (["caption", str(ds), "--check"], ["caption", str(ds)]):
            one_line_error(runner.invoke(app, args), "manifest.json", field)


def test_a_good_manifest_round_trips_and_older_ones_still_load(tmp_path):
    ds = write_aspect_dataset(tmp_path / "ds", [LANDSCAPE, PORTRAIT])
    data = json.loads((ds / "manifest.json").read_text())
    for rec in data["images"].values():
        rec.pop("crop_top_left")  # as written before prepare recorded the crop
    (ds / "manifest.json").write_text(json.dumps(data))
    m = load_manifest(ds)
    assert all(rec.crop_top_left is None for rec in m.images.values())
    m.save(ds)
    assert load_manifest(ds) == m


def test_mask_fields_round_trip_and_are_absent_without_a_mask(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=2)
    plain = (ds / "manifest.json").read_text()
    m = load_manifest(ds)
    assert not m.has_masks
    m.save(ds)
    assert (ds / "manifest.json").read_text() == plain  # no mask keys appear for images without masks
    name = next(iter(m.images))
    m.images[name].mask, m.images[name].mask_coverage = name, 0.25
    m.images[name].mask_source = {"kind": "auto", "model": "tiny-clipseg", "revision": "tiny"}
    m.save(ds)
    back = load_manifest(ds)
    assert back == m and back.has_masks
    saved = json.loads((ds / "manifest.json").read_text())["images"]
    assert [("mask" in rec) for rec in saved.values()] == [rec == name for rec in saved]


# ---------------------------------------------------------------------------- geometry


def test_geometry_values_are_unchanged():
    # The numbers SDXL's time ids got before geometry moved into prepare: they must not change.
    assert geometry((4032, 3024), 1024, keep_aspect=True, crop="center") == ((896, 1152), (0, 21))
    assert geometry((3024, 4032), 1024, keep_aspect=True, crop="center") == ((1152, 896), (21, 0))
    assert geometry((4032, 3024), 512, keep_aspect=False, crop="center") == ((512, 512), (0, 85))
    assert geometry((4032, 3024), 512, keep_aspect=False, crop="pad") == ((512, 512), (0, 0))
    assert geometry((0, 0), 64, keep_aspect=False, crop="center") == ((64, 64), (0, 0))


def _photos(folder: Path) -> dict[str, tuple[int, int]]:
    """A 4:3, a 3:4 and a square photo: source name -> (width, height)."""
    sizes = {"landscape.png": (400, 300), "portrait.png": (300, 400), "square.png": (300, 300)}
    folder.mkdir(parents=True)
    for i, (name, size) in enumerate(sizes.items()):
        blocks = np.random.default_rng(i).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST).save(folder / name)
    return sizes


@pytest.mark.parametrize("keep_aspect, crop", [(True, "center"), (False, "center"), (False, "pad")])
def test_prepare_stores_each_images_geometry_and_train_reads_it_back(tmp_path, keep_aspect, crop):
    sizes = _photos(tmp_path / "photos")
    out = tmp_path / "ds"
    prepare_dataset(str(tmp_path / "photos"), out, resolution=256, workers=1, keep_aspect=keep_aspect, crop=crop)
    stored = json.loads((out / "manifest.json").read_text())["images"]
    m = load_manifest(out)
    for name, rec in m.images.items():
        w, h = sizes[rec.source]
        size_hw, top_left = geometry((w, h), 256, keep_aspect=keep_aspect, crop=crop)
        assert stored[name]["crop_top_left"] == list(top_left)
        assert Image.open(out / "images" / name).size == (size_hw[1], size_hw[0]) == rec.size
        assert m.geometry(name) == m.geometry(name, 256) == ((h, w), size_hw, top_left)
        # Another training resolution: the same function, from the photo's original size.
        assert m.geometry(name, 512) == ((h, w), *geometry((w, h), 512, keep_aspect=keep_aspect, crop=crop))
    if keep_aspect:
        assert {m.geometry(n)[1:] for n in m.images} == {
            ((192, 320), (24, 0)),
            ((320, 192), (0, 24)),
            ((256, 256), (0, 0)),
        }
    elif crop == "center":
        assert {m.geometry(n).crop_top_left for n in m.images} == {(0, 42), (42, 0), (0, 0)}
    else:
        assert {m.geometry(n).crop_top_left for n in m.images} == {(0, 0)}


def test_stored_geometry_is_what_train_gets_at_the_datasets_resolution(tmp_path):
    ds = write_aspect_dataset(tmp_path / "ds", [LANDSCAPE, SQUARE], resolution=256)
    data = json.loads((ds / "manifest.json").read_text())
    name = next(iter(data["images"]))
    data["images"][name]["crop_top_left"] = [3, 4]  # not what geometry() gives: proves it is read
    (ds / "manifest.json").write_text(json.dumps(data))
    m = load_manifest(ds)
    assert m.geometry(name).crop_top_left == (3, 4)
    assert m.geometry(name, 512).crop_top_left == geometry(LANDSCAPE, 512, keep_aspect=True, crop="center")[1]
    # No crop recorded (an older manifest) or no record at all: computed the same way.
    other = [n for n in m.images if n != name][0]
    assert m.images[other].crop_top_left is None
    assert m.geometry(other) == ((3000, 3000), *geometry(SQUARE, 256, keep_aspect=True, crop="center"))
    assert m.geometry("not-in-the-manifest.png") == ((256, 256), (256, 256), (0, 0))


# ---------------------------------------------------------------------------- resolution


def test_one_resolution_rule():
    for ok in (8, 64, 512, 1024, 4096):
        assert check_resolution(ok) == ok and resolution_problem(ok) is None
    for bad in (0, -8, 4, 100, 500, 4104):
        with pytest.raises(ConfigError, match=rf"^--height {bad}: must be a positive multiple of 8"):
            check_resolution(bad, "--height")
    for bad in (512.0, "512", True, None):
        assert "whole number" in resolution_problem(bad)  # type: ignore[arg-type]
