"""`sdlora prepare --masks`: masks follow their photo's transform pixel for pixel, come from the
alpha channel, the user's folder (by stem) or a tiny CLIPSeg, are checked, and are reused; bad mask
input is one line and writes nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora.data import automask
from sdlora.data.images import register_heif
from sdlora.data.ingest import prepare_dataset
from sdlora.data.manifest import load_manifest
from sdlora.data.masks import MASKS, finish, load_mask, mask_problem, mask_stats
from sdlora.errors import ConfigError, DataError, ModelError

register_heif()

RED = (230, 20, 20)
GREY = (90, 110, 100)
# The marker patch in the photo as displayed (160 wide, 240 tall): left edge, upper middle, so it
# survives a center crop, a pad and the 2:3 bucket alike.
SHOWN = (160, 240)
PATCH = (12, 68, 60, 116)


def save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def marker_photo(folder: Path, name: str = "IMG_1.jpg") -> Path:
    """A 2:3 photo stored sideways (EXIF orientation 6) with a red patch at PATCH as displayed."""
    shown = Image.new("RGB", SHOWN, GREY)
    shown.paste(RED, PATCH)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 deg clockwise to display: stored is the displayed image turned back
    return save(shown.rotate(90, expand=True), folder / name, exif=exif.tobytes(), quality=98)


def marker_mask(size=SHOWN) -> Image.Image:
    mask = Image.new("L", SHOWN, 0)
    mask.paste(255, PATCH)
    return mask.resize(size, Image.Resampling.NEAREST) if size != SHOWN else mask


def overlap(image: Image.Image, mask: Image.Image) -> float:
    """Intersection over union of the image's red pixels and the mask's white ones."""
    arr = np.asarray(image.convert("RGB"), dtype=np.int32)
    red = (arr[..., 0] > 150) & (arr[..., 1] < 90)
    on = np.asarray(mask) >= 128
    return float((red & on).sum() / max(1, (red | on).sum()))


def record_of(result, source: str):
    return next(r for r in result.records if r.source == source)


@pytest.mark.parametrize(
    "kw",
    [dict(crop="center", resolution=64), dict(crop="pad", resolution=64), dict(keep_aspect=True, resolution=256)],
    ids=["center", "pad", "keep-aspect"],
)
def test_user_mask_follows_orientation_crop_pad_and_bucket(tmp_path, kw):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    marker_photo(photos)
    save(marker_mask(), masks / "img_1.png")  # stem match, any case
    out = tmp_path / "ds"
    result = prepare_dataset(str(photos), out, workers=1, masks=str(masks), mask_dilate=0, **kw)
    rec = record_of(result, "IMG_1.jpg")
    assert tuple(rec.size) == ((192, 320) if kw.get("keep_aspect") else (64, 64))
    image = Image.open(out / "images" / rec.file)
    mask = Image.open(out / MASKS / rec.mask)
    assert mask.mode == "L" and mask.size == image.size == tuple(rec.size)
    assert overlap(image, mask) > 0.85
    # Not the photo's stored (unrotated) pixels: the same patch turned back would not line up.
    assert overlap(image, mask.transpose(Image.Transpose.ROTATE_90).resize(mask.size)) < 0.3
    manifest = load_manifest(out)
    assert manifest.has_masks
    assert manifest.images[rec.file].mask_source == {"kind": "file", "path": str((masks / "img_1.png").resolve())}
    arr = load_mask(out, manifest.images[rec.file])
    assert arr.dtype == np.float32 and arr.shape == (rec.size[1], rec.size[0]) and 0 <= arr.min() <= arr.max() <= 1
    assert abs(float((arr >= 0.5).mean()) - manifest.images[rec.file].mask_coverage) < 0.02


def test_alpha_masks_from_png_and_heic(tmp_path):
    photos = tmp_path / "photos"
    cut = Image.new("RGBA", SHOWN, (0, 0, 0, 0))
    cut.paste((*RED, 255), PATCH)
    save(cut, photos / "lifted.png")
    save(cut, photos / "lifted_heic.heic", quality=-1)  # pillow-heif: lossless, keeps alpha
    plain = Image.new("RGB", SHOWN, GREY)
    plain.paste((20, 20, 230), (10, 10, 40, 40))
    save(plain, photos / "plain.jpg")
    out = tmp_path / "ds"
    result = prepare_dataset(
        str(photos), out, resolution=64, workers=1, masks="alpha", mask_dilate=0, crop="pad", keep_duplicates=True
    )
    for name in ("lifted.png", "lifted_heic.heic"):
        rec = record_of(result, name)
        image, mask = Image.open(out / "images" / rec.file), Image.open(out / MASKS / rec.mask)
        assert image.getpixel((2, 2)) == (255, 255, 255)  # the image is still the composite over white
        assert overlap(image, mask) > 0.85, name
        assert rec.mask_source == {"kind": "alpha"}
    assert result.unmasked == [("plain.jpg", "no alpha channel")]  # kept, trained on the whole frame
    assert record_of(result, "plain.jpg").mask is None


def test_folder_masks_by_stem_missing_and_unused_ones_reused_and_dropped(tmp_path):
    photos, masks = tmp_path / "photos", tmp_path / "photos" / "masks"  # masks inside photos: not ingested
    for i in range(3):
        marker_photo(photos, f"IMG_{i}.jpg") if i == 0 else save(
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((90, 90)),
            photos / f"sub/IMG_{i}.png",
        )
    save(marker_mask(), masks / "IMG_0.png")
    tiny = Image.new("L", (90, 90), 0)
    tiny.paste(255, (40, 40, 44, 44))
    save(tiny, masks / "IMG_1.jpeg")
    save(tiny, masks / "IMG_9.png")  # no such photo
    out = tmp_path / "ds"
    result = prepare_dataset(str(photos), out, resolution=64, workers=1, masks=str(masks))
    assert sorted(r.source for r in result.records) == ["IMG_0.jpg", "sub/IMG_1.png", "sub/IMG_2.png"]
    assert result.unmasked == [("sub/IMG_2.png", "no mask file")]
    assert [name for name, _ in result.mask_problems] == ["sub/IMG_1.png"]  # ~2% of the frame
    assert any("IMG_9.png (no photo with this stem)" in w for w in result.warnings)
    assert result.masks_made == 2 and sorted(p.name for p in (out / MASKS).iterdir()) == sorted(
        r.mask for r in result.records if r.mask
    )
    before = snapshot(out / MASKS)

    again = prepare_dataset(str(photos), out, resolution=64, workers=1, masks=str(masks))
    assert (again.masks_made, again.masks_reused, again.decoded) == (0, 2, 0)
    assert snapshot(out / MASKS) == before

    wider = prepare_dataset(str(photos), out, resolution=64, workers=1, masks=str(masks), mask_dilate=16)
    assert wider.masks_made == 2  # the dilation is part of the mask's address
    grown = record_of(wider, "IMG_0.jpg").mask_coverage
    assert grown > record_of(result, "IMG_0.jpg").mask_coverage

    plain = prepare_dataset(str(photos), out, resolution=64, workers=1)
    assert not (out / MASKS).exists() and not load_manifest(out).has_masks
    data = json.loads((out / "manifest.json").read_text())
    assert "masks" not in data["options"] and all("mask" not in rec for rec in data["images"].values())
    assert plain.masks is None


def test_mask_of_another_shape_is_refused_and_a_scaled_one_is_used(tmp_path):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    marker_photo(photos)
    # 16-bit (near-black background 1000 of 65535), half size, same shape: scaled with the photo.
    half = np.maximum(np.asarray(marker_mask((80, 120)), dtype=np.uint16) * 257, 1000).astype(np.uint16)
    save(Image.fromarray(half), masks / "IMG_1.png")
    out = tmp_path / "ds"
    result = prepare_dataset(str(photos), out, resolution=64, workers=1, masks=str(masks), mask_dilate=0)
    rec = record_of(result, "IMG_1.jpg")
    assert overlap(Image.open(out / "images" / rec.file), Image.open(out / MASKS / rec.mask)) > 0.8
    before = snapshot(out)

    save(Image.new("L", (240, 160), 255), masks / "IMG_1.png")  # the stored (sideways) shape
    with pytest.raises(DataError, match=r"IMG_1\.png is 240x160 but its photo is 160x240 as displayed") as err:
        prepare_dataset(str(photos), out, resolution=64, workers=1, masks=str(masks))
    assert "\n" not in str(err.value)
    assert snapshot(out) == before  # nothing half-written
    with pytest.raises(DataError, match="is 240x160"):
        prepare_dataset(str(photos), tmp_path / "new", resolution=64, workers=1, masks=str(masks))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "setup, kw, error, fragment",
    [
        (lambda m: save(Image.new("L", (8, 8)), m / "other.png"), {}, DataError, "none of its 1 mask files matches"),
        (lambda m: (m / "notes.txt").write_text("hi") and None, {}, DataError, "notes.txt is not an image"),
        (lambda m: None, {}, DataError, "no mask images in this folder"),
        (lambda m: None, {"masks": "no/such/folder"}, ConfigError, "--masks no/such/folder: no such folder"),
        (lambda m: None, {"masks": "auto", "mask_threshold": 1.5}, ConfigError, "--mask-threshold 1.5"),
        (lambda m: None, {"masks": "alpha"}, DataError, "none of the 1 photos has an alpha channel"),
        (lambda m: None, {"mask_model": "x/y"}, ConfigError, "--mask-model x/y: only with --masks auto"),
    ],
    ids=["no-match", "non-image", "empty", "no-folder", "threshold", "no-alpha", "model-without-auto"],
)
def test_bad_mask_input_is_one_line_and_writes_nothing(tmp_path, setup, kw, error, fragment):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    marker_photo(photos)
    masks.mkdir()
    setup(masks)
    out = tmp_path / "ds"
    with pytest.raises(error) as exc:
        prepare_dataset(str(photos), out, resolution=64, workers=1, **{"masks": str(masks), **kw})
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    assert not out.exists()


def test_auto_masks_with_tiny_clipseg_and_rerun_loads_nothing(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    marker_photo(photos, "tall.jpg")
    save(Image.new("RGB", (360, 270), GREY), photos / "wide.png")
    out = tmp_path / "ds"
    seen = []
    result = prepare_dataset(
        str(photos),
        out,
        resolution=256,
        workers=1,
        keep_aspect=True,
        masks="auto",
        mask_model="tiny-clipseg",
        on_progress=lambda what, done, total: seen.append((what, done, total)),
    )
    assert ("masking", 2, 2) in seen
    manifest = load_manifest(out)
    for rec in result.records:
        mask = Image.open(out / MASKS / rec.mask)
        assert mask.mode == "L" and mask.size == tuple(rec.size)
        stored = manifest.images[rec.file]
        assert stored.mask_source == {"kind": "auto", "model": "tiny-clipseg", "revision": "tiny"}
        assert 0 <= stored.mask_coverage <= 1
    assert manifest.options["masks"]["threshold"] == pytest.approx(0.4)
    assert {tuple(r.size) for r in result.records} == {(192, 320), (320, 192)}  # buckets, not squares

    def no_model(*args, **kwargs):
        raise AssertionError("a re-run loaded the mask model")

    monkeypatch.setattr(automask.AutoMasker, "__init__", no_model)
    again = prepare_dataset(str(photos), out, resolution=256, workers=1, keep_aspect=True, masks="auto",
                            mask_model="tiny-clipseg")  # fmt: skip
    assert (again.masks_made, again.masks_reused) == (0, 2)


def test_uncached_mask_model_is_one_line(tmp_path):
    marker_photo(tmp_path / "photos")
    with pytest.raises(ModelError, match="--mask-model nobody/no-such-clipseg: not in the local cache") as err:
        prepare_dataset(
            str(tmp_path / "photos"), tmp_path / "ds", resolution=64, workers=1, masks="auto",
            mask_model="nobody/no-such-clipseg",
        )  # fmt: skip
    assert "\n" not in str(err.value) and not (tmp_path / "ds").exists()


def test_checks_flag_small_large_and_scattered_masks():
    assert mask_problem(*mask_stats(np.zeros((64, 64), np.uint8))).startswith("covers 0%")
    assert "over 97%" in mask_problem(*mask_stats(np.full((64, 64), 255, np.uint8)))
    dots = np.zeros((64, 64), np.uint8)
    for y in range(4, 64, 12):
        for x in range(4, 64, 12):
            dots[y : y + 5, x : x + 5] = 255  # 25 separate 5x5 pieces, ~15% of the frame
    assert "25 separate pieces" in mask_problem(*mask_stats(dots))
    one = np.zeros((64, 64), np.uint8)
    one[16:48, 16:48] = 255
    assert mask_problem(*mask_stats(one)) is None
    grown = finish(one, 2)
    assert grown.coverage == pytest.approx(36 * 36 / 64**2, abs=1e-3)  # 2 px on every side


def test_masks_match_photos_by_stem_also_for_links_and_subfolders(tmp_path):
    from sdlora.data.masks import match_masks

    folder = tmp_path / "masks"
    files = [save(Image.new("L", (4, 4)), folder / name) for name in ("IMG_1.png", "sub/img_2.PNG", "IMG_3.png")]
    photos = ["https://disk.yandex.ru/d/AbC/IMG_1.HEIC", "trip/IMG_2.jpg", "IMG_3.jpg", "IMG_3.heic"]
    matched, unused = match_masks(files, photos, folder)
    assert matched == {photos[0]: files[0], photos[1]: files[1]}
    assert len(unused) == 1 and unused[0].startswith("IMG_3.png (ambiguous")


LONG_CLASS = " ".join(["red plush"] * 45)  # 90 words: past CLIP's 77 positions


def test_a_class_word_past_the_clip_window_is_one_line_before_decoding(tmp_path):
    from typer.testing import CliRunner

    from sdlora.cli import app

    marker_photo(tmp_path / "photos")
    out = tmp_path / "ds"
    args = ["prepare", str(tmp_path / "photos"), "--out", str(out), "--resolution", "64", "--workers", "1"]
    result = CliRunner().invoke(
        app, [*args, "--masks", "auto", "--mask-model", "tiny-clipseg", "--class-word", LONG_CLASS]
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--class-word 'red plush red plush" in errors[0], result.stderr
    assert "CLIP tokens in the --masks auto prompt" in errors[0] and "reads 77" in errors[0]
    assert not out.exists()


def test_the_mask_model_refuses_a_prompt_longer_than_it_reads_in_one_line():
    masker = automask.AutoMasker("tiny-clipseg", threshold=0.4, device="cpu")
    image = Image.new("RGB", (64, 64), GREY)
    with pytest.raises(ConfigError, match=r"--class-word 'red plush.*\.\.\.': 96 CLIP tokens") as err:
        masker([image], LONG_CLASS)
    assert "\n" not in str(err.value)
    assert len(masker([image], "toy")) == 1
