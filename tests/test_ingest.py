"""sdlora.data.ingest: real phone photos come out upright, square and split; every bad input is
reported and skipped; re-runs re-use; an existing dataset is never silently overwritten."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from sdlora.data import ingest
from sdlora.data.captions import read_captions, update_captions
from sdlora.data.images import prepare_image, register_heif
from sdlora.data.ingest import NoUsableImages, prepare_dataset, split_train_val
from sdlora.data.manifest import load_manifest
from sdlora.errors import ConfigError, DataError
from sdlora.fsutil import sha256_file

register_heif()


def photo(seed: int, size=(96, 72)) -> Image.Image:
    """A distinct picture per seed: random 6x6 colour blocks (perceptual hashes far apart)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)


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


def small_thumb(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img.convert("L").resize((24, 24), Image.Resampling.BOX), dtype=np.float64)
    return (arr - arr.mean()).ravel()


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def reference(path: Path, oriented: bool = True) -> Image.Image:
    """The source as a viewer shows it (orientation applied), center-cropped to a square."""
    img = Image.open(path)
    img = ImageOps.exif_transpose(img) if oriented else img
    return ImageOps.fit(img.convert("RGB"), (128, 128))


# ---------------------------------------------------------------------------- real photos


def test_rc_car_upright_square_manifest_split(dreambench, tmp_path):
    src = dreambench / "rc_car"
    out = tmp_path / "ds"
    seen = []
    result = prepare_dataset(str(src), out, resolution=128, workers=2, on_progress=lambda *a: seen.append(a))
    assert ("decoding", 5, 5) in seen and ("reading", 5, 5) in seen

    m = load_manifest(out)
    files = sorted(p.name for p in src.iterdir())
    assert sorted(r.source for r in m.images.values()) == files
    assert (m.token, m.class_word, m.resolution, m.seed, m.source) == ("sksToy", "toy", 128, 0, str(src.resolve()))
    assert len(m.val) == 1 and len(m.train) == 4 and set(m.train) | set(m.val) == set(m.images)
    assert not set(m.train) & set(m.val)
    assert read_captions(out / "captions.txt") == {name: "a photo of sksToy toy" for name in m.images}
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(m.images)
    for name, rec in m.images.items():
        assert rec.source_sha256 == sha256_file(src / rec.source)
        assert rec.original_size == (1024, 1024) and rec.size == (128, 128)
        img = Image.open(out / "images" / name)
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (128, 128)
        got = small_thumb(img)
        upright = corr(got, small_thumb(reference(src / rec.source)))
        assert upright > 0.95, (rec.source, upright)
        if rec.source.endswith(".JPG"):  # stored sideways: ignoring EXIF would give a poor match
            sideways = corr(got, small_thumb(reference(src / rec.source, oriented=False)))
            assert sideways < upright - 0.2, (rec.source, sideways, upright)
    assert result.decoded == 5 and result.reused == 0

    # Deterministic: another folder, one worker, same seed -> the same names and split.
    again = prepare_dataset(str(src), tmp_path / "ds2", resolution=128, workers=1)
    assert (again.train, again.val) == (m.train, m.val)


def _irot(data: bytes) -> tuple[int, int]:
    """(offset of the angle byte, angle) of the one HEIF `irot` property in `data`.

    ISO/IEC 23008-12 ImageRotation: a 9-byte box (size 9, type 'irot') whose last byte's low two
    bits are the angle in 90-degree steps, anticlockwise, applied to the decoded image.
    """
    at = data.find(b"\x00\x00\x00\x09irot")
    assert at > 0 and data.find(b"irot", at + 8) < 0, "expected exactly one irot box"
    return at + 8, data[at + 8] & 3


def test_heic_rotation_transform_applied(dreambench, tmp_path):
    # IMG_4651.HEIC is stored sideways: its pixels are coded as the sensor saw them and a HEIF
    # rotation (irot) turns them upright. The reference is independent of that decode: the
    # stored pixels (the same file with the rotation set to 0) rotated by hand by the angle the
    # file declares.
    src = dreambench / "duck_toy"
    data = (src / "IMG_4651.HEIC").read_bytes()
    where, angle = _irot(data)
    assert angle == 3  # 270 degrees anticlockwise = 90 clockwise ...
    assert Image.open(src / "IMG_4651.HEIC").info["original_orientation"] == 6  # ... as its EXIF says
    unrotated = bytearray(data)
    unrotated[where] &= 0xFC
    stored = np.asarray(Image.open(io.BytesIO(bytes(unrotated))).convert("RGB"))

    prepare_dataset(str(src), tmp_path / "ds", resolution=64, workers=1, val_fraction=0)
    m = load_manifest(tmp_path / "ds")
    rec = next(r for r in m.images.values() if r.source == "IMG_4651.HEIC")
    got = np.asarray(Image.open(tmp_path / "ds" / "images" / rec.file), dtype=np.float64)

    def error(turns: int) -> float:
        """Mean absolute pixel error against the stored pixels turned `turns` x 90 degrees anticlockwise."""
        turned = Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=turns)))
        want = np.asarray(ImageOps.fit(turned, (64, 64), Image.Resampling.LANCZOS), dtype=np.float64)
        return float(np.abs(got - want).mean())

    errors = {turns: error(turns) for turns in range(4)}
    assert errors[angle] < 3, errors  # resampling differences only
    assert min(e for t, e in errors.items() if t != angle) > 10 * errors[angle], errors


# ---------------------------------------------------------------------------- decoding rules


def test_exif_orientation_alpha_and_pad(tmp_path):
    src = tmp_path / "photos"
    # Red top, blue bottom as displayed; stored rotated with EXIF orientation 6 (turn 90 deg clockwise).
    upright = Image.new("RGB", (80, 120), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 80, 60))
    exif = Image.Exif()
    exif[0x0112] = 6
    save(upright.rotate(90, expand=True), src / "sideways.jpg", exif=exif.tobytes(), quality=95)
    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    rgba.paste((0, 128, 0, 255), (25, 25, 75, 75))
    save(rgba, src / "alpha.png")
    wide = Image.new("RGB", (200, 100), (200, 30, 30))
    save(wide, src / "wide.webp", lossless=True)
    result = prepare_dataset(str(src), tmp_path / "center", resolution=64, workers=1, keep_duplicates=True)
    by_src = {r.source: Image.open(tmp_path / "center" / "images" / r.file) for r in result.records}
    top, bottom = by_src["sideways.jpg"].getpixel((32, 5)), by_src["sideways.jpg"].getpixel((32, 58))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    assert result.records[[r.source for r in result.records].index("sideways.jpg")].original_size == (80, 120)
    assert by_src["alpha.png"].getpixel((2, 2)) == (255, 255, 255)  # transparent -> white
    assert by_src["alpha.png"].getpixel((32, 32)) == (0, 128, 0)

    padded = prepare_dataset(str(src), tmp_path / "pad", resolution=64, workers=1, crop="pad", keep_duplicates=True)
    rec = next(r for r in padded.records if r.source == "wide.webp")
    img = Image.open(tmp_path / "pad" / "images" / rec.file)
    assert img.getpixel((32, 2)) == (255, 255, 255) and img.getpixel((32, 32)) == (200, 30, 30)
    assert rec.file not in {r.file for r in result.records}  # the crop is part of the content address


def test_bad_files_reported_and_skipped(tmp_path):
    src = tmp_path / "photos"
    for i in range(3):
        save(photo(i), src / f"good{i}.png")
    save(photo(0), src / "sub" / "same_pixels.png", compress_level=1)  # other bytes, same picture
    (src / "z_copy_of_good1.png").write_bytes((src / "good1.png").read_bytes())
    buf = io.BytesIO()
    photo(2, size=(960, 720)).save(buf, "JPEG", quality=90)
    save(Image.open(buf), src / "z_near.jpg", quality=70)  # a re-compressed, resized good2
    (src / "empty.HEIC").write_bytes(b"")
    jpeg = io.BytesIO()
    photo(9, size=(400, 300)).save(jpeg, "JPEG", quality=90)
    (src / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (src / "notes.txt").write_text("hello")
    (src / "IMG_0001.MOV").write_bytes(b"\x00\x00\x00\x14ftypqt  " + b"\x00" * 100)
    (src / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (src / "._good0.png").write_bytes(b"\x00\x05\x16\x07")
    save(photo(7, size=(20, 20)), src / "tiny.png")
    result = prepare_dataset(str(src), tmp_path / "ds", resolution=64, workers=1)
    assert sorted(r.source for r in result.records) == ["good0.png", "good1.png", "good2.png"]
    reasons = {s.name: s.reason for s in result.skipped}
    assert reasons == {
        "sub/same_pixels.png": "duplicate",
        "z_copy_of_good1.png": "duplicate",
        "z_near.jpg": "near duplicate",
        "empty.HEIC": "empty file",
        "truncated.jpg": "corrupt or truncated",
        "notes.txt": "not an image",
        "IMG_0001.MOV": "video",
        ".DS_Store": "system file",
        "._good0.png": "system file",
        "tiny.png": "too small",
    }
    details = {s.name: s.detail for s in result.skipped}
    assert "good0.png" in details["sub/same_pixels.png"] and "good2.png" in details["z_near.jpg"]

    kept = prepare_dataset(str(src), tmp_path / "all", resolution=64, workers=1, keep_duplicates=True, keep_small=True)
    assert {"sub/same_pixels.png", "z_near.jpg", "tiny.png"} <= {r.source for r in kept.records}
    assert any("tiny.png" in w for w in kept.warnings)
    assert "z_copy_of_good1.png" not in {r.source for r in kept.records}  # byte-identical: one image


def test_nothing_usable_writes_nothing(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.txt").write_text("x")
    (src / "b.jpg").write_bytes(b"")
    with pytest.raises(
        NoUsableImages,
        match=r"no usable photos \(1 (empty file|not an image), 1 (empty file|not an image)\); nothing was written",
    ) as exc:
        prepare_dataset(str(src), tmp_path / "ds", workers=1)
    assert len(str(exc.value).splitlines()) == 1 and len(exc.value.result.skipped) == 2
    assert not (tmp_path / "ds").exists()


def test_split_is_deterministic_and_keeps_a_val_image():
    names = [f"{i:02d}.png" for i in range(10)]
    train, val = split_train_val(names, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == names
    assert split_train_val(list(reversed(names)), 0.2, seed=3) == (train, val)
    assert split_train_val(names, 0.2, seed=4) != (train, val)
    assert len(split_train_val(names[:2], 0.2, 0)[1]) == 1
    assert split_train_val(names[:1], 0.2, 0) == (names[:1], [])
    assert split_train_val(names, 0.0, 0) == (names, [])
    # Adding a photo moves at most one image across the split.
    train2, val2 = split_train_val(names + ["10.png"], 0.2, seed=3)
    assert len(set(val) - set(val2)) <= 1


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"resolution": 100}, "--resolution 100"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"token": "sks toy"}, "--token"),
        ({"crop": "zoom"}, "--crop"),
        ({"workers": 0}, "--workers"),
        ({"keep_aspect": True, "crop": "pad"}, "--keep-aspect with --crop pad"),
    ],
)
def test_bad_options(tmp_path, kw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        prepare_dataset(str(tmp_path), tmp_path / "ds", **kw)
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------------------- --keep-aspect


def mixed_photos(folder: Path) -> dict[str, tuple[int, int]]:
    """4:3, 3:4 and 1:1 photos, one a 4:3 JPEG stored sideways with EXIF orientation 6 (shown
    3:4): source name -> its bucket at resolution 256."""
    save(photo(1, (400, 300)), folder / "landscape.png")
    save(photo(2, (300, 400)), folder / "portrait.png")
    save(photo(3, (300, 300)), folder / "square.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to show
    save(photo(4, (1200, 1600)).rotate(90, expand=True), folder / "sideways.jpg", exif=exif.tobytes(), quality=95)
    return {
        "landscape.png": (320, 192),
        "portrait.png": (192, 320),
        "square.png": (256, 256),
        "sideways.jpg": (192, 320),
    }


def shown_fit(path: Path, size: tuple[int, int]) -> Image.Image:
    """The source as a viewer shows it, scaled to cover `size` and center-cropped."""
    return ImageOps.fit(ImageOps.exif_transpose(Image.open(path)).convert("RGB"), size)


def test_keep_aspect_writes_each_photo_at_its_bucket(tmp_path):
    src = tmp_path / "photos"
    buckets = mixed_photos(src)
    out = tmp_path / "ds"
    result = prepare_dataset(str(src), out, resolution=256, workers=1, keep_aspect=True)
    m = load_manifest(out)
    assert m.options.get("keep_aspect", False) is True and m.resolution == 256
    assert {r.source: r.size for r in m.images.values()} == buckets
    assert next(r for r in m.images.values() if r.source == "sideways.jpg").original_size == (1200, 1600)
    for name, rec in m.images.items():
        img = Image.open(out / "images" / name)
        assert img.size == rec.size, rec.source  # the manifest tells the real size
        assert corr(small_thumb(img), small_thumb(shown_fit(src / rec.source, rec.size))) > 0.95, rec.source
    assert result.keep_aspect and result.size_counts() == [((192, 320), 2), ((256, 256), 1), ((320, 192), 1)]

    square = prepare_dataset(str(src), tmp_path / "square", resolution=256, workers=1)
    assert {r.size for r in square.records} == {(256, 256)}
    assert load_manifest(tmp_path / "square").options.get("keep_aspect", False) is False


def test_keep_aspect_jpeg_draft_keeps_enough_pixels(tmp_path, monkeypatch):
    # A 1600x1200 JPEG shown 3:4 is decoded at a quarter of its size (400x300, shown 300x400):
    # still enough to cover 192x320, and cropped where the full-size decode would be.
    from PIL import JpegImagePlugin

    drafted = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = real_draft(self, mode, size)
        drafted.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    src = tmp_path / "photos"
    mixed_photos(src)
    prepared = prepare_image(src / "sideways.jpg", 256, keep_aspect=True)
    assert drafted == [(400, 300)]
    assert prepared.original_size == (1200, 1600) and prepared.image.size == (192, 320)
    # Cover: scale 320/1600 = 0.2, so 960 of the 1200 px width is kept, 120 px off each side.
    full = (
        ImageOps.exif_transpose(Image.open(src / "sideways.jpg"))
        .convert("RGB")
        .resize((192, 320), box=(120, 0, 1080, 1600))
    )
    diff = np.abs(np.asarray(prepared.image, dtype=np.int16) - np.asarray(full, dtype=np.int16))
    assert diff.mean() < 3  # the same crop as from the full-size decode, not shifted or squashed


def test_keep_aspect_reruns_reuse_and_toggling_redecodes(tmp_path):
    src = tmp_path / "photos"
    buckets = mixed_photos(src)
    out = tmp_path / "ds"
    square = prepare_dataset(str(src), out, resolution=256, workers=1)
    name = next(r.file for r in square.records if r.source == "portrait.png")
    update_captions(out / "captions.txt", {name: "my sksToy toy, upright"})

    aspect = prepare_dataset(str(src), out, resolution=256, workers=1, keep_aspect=True)
    assert (aspect.decoded, aspect.reused, aspect.removed) == (4, 0, 4)  # no square image re-used
    assert {r.source: r.size for r in aspect.records} == buckets
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(r.file for r in aspect.records)
    new_name = next(r.file for r in aspect.records if r.source == "portrait.png")
    assert read_captions(out / "captions.txt")[new_name] == "my sksToy toy, upright"

    again = prepare_dataset(str(src), out, resolution=256, workers=1, keep_aspect=True)
    assert (again.decoded, again.reused) == (0, 4)
    assert {r.source: r.size for r in again.records} == buckets  # sizes known without decoding

    back = prepare_dataset(str(src), out, resolution=256, workers=1)
    assert (back.decoded, back.reused) == (4, 0)
    assert {r.size for r in back.records} == {(256, 256)}
    assert {Image.open(out / "images" / r.file).size for r in back.records} == {(256, 256)}


def test_keep_aspect_too_small_and_duplicates(tmp_path):
    src = tmp_path / "photos"
    save(photo(1, (400, 300)), src / "a.png")
    save(photo(1, (400, 300)), src / "a_resaved.png", compress_level=1)  # other bytes, same picture
    save(photo(1, (1200, 900)), src / "a_bigger.png")  # the same shot at another size
    save(photo(2, (300, 400)), src / "b.png")
    save(photo(3, (150, 112)), src / "tiny.png")  # would need 2.1x upscaling to cover 320x192
    result = prepare_dataset(str(src), tmp_path / "ds", resolution=256, workers=1, keep_aspect=True)
    assert sorted(r.source for r in result.records) == ["a.png", "b.png"]
    assert {s.name: s.reason for s in result.skipped} == {
        "a_resaved.png": "duplicate",
        "a_bigger.png": "near duplicate",
        "tiny.png": "too small",
    }
    assert "150x112 < half of 320x192 px" in next(s.detail for s in result.skipped if s.name == "tiny.png")

    kept = prepare_dataset(str(src), tmp_path / "small", resolution=256, workers=1, keep_aspect=True, keep_small=True)
    tiny = next(r for r in kept.records if r.source == "tiny.png")
    assert tiny.size == (320, 192) and Image.open(kept.out_dir / "images" / tiny.file).size == (320, 192)
    assert any("tiny.png: 150x112 is upscaled to 320x192 px" in w for w in kept.warnings)


# ---------------------------------------------------------------------------- archives


def test_zip_source_unsafe_names_never_escape(tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, name in enumerate(["a/one.png", "two.png", "../evil.png", "/abs.png", "__MACOSX/a/._one.png"]):
            buf = io.BytesIO()
            photo(i).save(buf, "PNG")
            zf.writestr(name, buf.getvalue())
    result = prepare_dataset(str(archive), tmp_path / "out" / "ds", resolution=64, workers=1)
    assert sorted(r.source for r in result.records) == ["a/one.png", "two.png"]
    assert {s.name: s.reason for s in result.skipped} == {
        "../evil.png": "unsafe name in archive",
        "/abs.png": "unsafe name in archive",
        "__MACOSX/a/._one.png": "system file",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "photos.zip"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds"]
    rec = result.records[0]
    with zipfile.ZipFile(archive) as zf:
        assert rec.source_sha256 == hashlib.sha256(zf.read(rec.source)).hexdigest()


def test_zip_bomb_and_broken_zip_refused(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("IMG_1.png", b"\x00" * (8 << 20))
    with pytest.raises(DataError, match="expands .*x .*zip bomb"):
        prepare_dataset(str(bomb), tmp_path / "ds", workers=1)
    with pytest.raises(DataError, match="unpacks to"):
        prepare_dataset(str(bomb), tmp_path / "ds", workers=1, max_zip_total=1 << 20)
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match="broken.zip: a broken zip archive"):
        prepare_dataset(str(broken), tmp_path / "ds", workers=1)
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------------------- re-runs and the output folder


def test_rerun_reuses_and_update_keeps_captions(tmp_path):
    src = tmp_path / "photos"
    for i in range(4):
        save(photo(i), src / f"p{i}.png")
    out = tmp_path / "ds"
    first = prepare_dataset(str(src), out, resolution=64, workers=1)
    assert first.decoded == 4
    name0 = next(r.file for r in first.records if r.source == "p0.png")
    update_captions(out / "captions.txt", {name0: "my sksToy toy on a red chair"})
    before = snapshot(out)

    again = prepare_dataset(str(src), out, resolution=64, workers=1)
    assert (again.decoded, again.reused, again.mode) == (0, 4, "update")
    assert snapshot(out)["captions.txt"] == before["captions.txt"]
    assert {k: v for k, v in snapshot(out).items() if k.startswith("images/")} == {
        k: v for k, v in before.items() if k.startswith("images/")
    }

    save(photo(10), src / "p9.png")
    (src / "p3.png").unlink()
    grown = prepare_dataset(str(src), out, resolution=64, workers=1)
    assert (grown.decoded, grown.reused, grown.removed) == (1, 3, 1)
    caps = read_captions(out / "captions.txt")
    assert caps[name0] == "my sksToy toy on a red chair" and len(caps) == 4
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(r.file for r in grown.records)

    # New options re-decode (new names) but the user's caption follows its source photo.
    bigger = prepare_dataset(str(src), out, resolution=128, workers=1)
    assert bigger.decoded == 4
    new0 = next(r.file for r in bigger.records if r.source == "p0.png")
    assert new0 != name0 and read_captions(out / "captions.txt")[new0] == "my sksToy toy on a red chair"
    assert len(list((out / "images").iterdir())) == 4


def test_refuses_other_dataset_and_foreign_folder(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save(photo(1), a / "x.png")
    save(photo(2), b / "y.png")
    out = tmp_path / "ds"
    prepare_dataset(str(a), out, resolution=64, workers=1)
    before = snapshot(out)
    with pytest.raises(DataError, match=r"already holds a dataset prepared from .*a; choose another --out, or --force"):
        prepare_dataset(str(b), out, resolution=64, workers=1)
    assert snapshot(out) == before
    replaced = prepare_dataset(str(b), out, resolution=64, workers=1, force=True)
    assert replaced.mode == "replace" and [r.source for r in replaced.records] == ["y.png"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [replaced.records[0].file]

    foreign = tmp_path / "mine"
    save(photo(3), foreign / "holiday.png")
    with pytest.raises(DataError, match="is not an sdlora dataset"):
        prepare_dataset(str(a), foreign, workers=1)
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.png"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        prepare_dataset(str(a), tmp_path / "file", workers=1)


def test_output_inside_source_is_not_ingested(tmp_path):
    src = tmp_path / "photos"
    for i in range(2):
        save(photo(i), src / f"p{i}.png")
    prepare_dataset(str(src), src / "dataset", resolution=64, workers=1)
    again = prepare_dataset(str(src), src / "dataset", resolution=64, workers=1)
    assert sorted(r.source for r in again.records) == ["p0.png", "p1.png"] and again.reused == 2


def test_cache_entries_record_failures(tmp_path):
    src = tmp_path / "photos"
    save(photo(1), src / "ok.png")
    (src / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    prepare_dataset(str(src), tmp_path / "ds", resolution=64, workers=1)
    cache = json.loads((tmp_path / "ds" / ingest.CACHE_FILE).read_text())["entries"]
    assert sorted(e["error"] or "ok" for e in cache.values()) == ["corrupt or truncated", "ok"]
    again = prepare_dataset(str(src), tmp_path / "ds", resolution=64, workers=1)
    assert again.decoded == 0 and [s.reason for s in again.skipped] == ["corrupt or truncated"]


def test_example_photos_prepare_upright(tmp_path):
    # examples/photos ships with the project: all 12 usable, the 3 stored sideways turned upright.
    from sdlora import example_photos as make_photos

    examples = Path(__file__).resolve().parents[1] / "examples"
    result = prepare_dataset(str(examples / "photos"), tmp_path / "ds", resolution=64, workers=1)
    assert len(result.records) == 12 and not result.skipped
    for index, orientation in make_photos.SIDEWAYS.items():
        stored = Image.open(examples / "photos" / f"toy_{index + 1:02d}.heic")
        assert stored.info.get("original_orientation") == orientation
        rec = next(r for r in result.records if r.source == f"toy_{index + 1:02d}.heic")
        got = Image.open(result.out_dir / "images" / rec.file)
        want = ImageOps.fit(make_photos.render(index), (64, 64))
        assert rec.original_size == make_photos.SIZE
        assert corr(small_thumb(got), small_thumb(want)) > 0.95


def test_example_photos_are_what_the_generator_renders(tmp_path):
    # The committed examples/photos and the ones `sdlora demo` renders are the same pictures:
    # every one as drawn, and the writer's files (one upright, one stored sideways) as shown.
    from sdlora import example_photos as make_photos

    examples = Path(__file__).resolve().parents[1] / "examples" / "photos"
    committed = sorted(examples.glob("toy_*.heic"))
    assert len(committed) == make_photos.COUNT
    for index, path in enumerate(committed):
        assert corr(small_thumb(make_photos.render(index)), small_thumb(Image.open(path))) > 0.99, path.name
    sideways = min(make_photos.SIDEWAYS)
    written = make_photos.write_example_photos(tmp_path, indices=[0, sideways])
    assert [p.name for p in written] == ["toy_01.heic", f"toy_{sideways + 1:02d}.heic"]
    for path in written:
        assert corr(small_thumb(Image.open(path)), small_thumb(Image.open(examples / path.name))) > 0.99
    assert Image.open(written[1]).info.get("original_orientation") == make_photos.SIDEWAYS[sideways]


# ---------------------------------------------------------------------------- unusable inputs get their row


def test_duplicate_row_names_the_other_photo(tmp_path):
    src = tmp_path / "photos"
    save(photo(1), src / "a.png")
    (src / "b_copy.png").write_bytes((src / "a.png").read_bytes())
    save(photo(2), src / "c.png")
    result = prepare_dataset(str(src), tmp_path / "ds", resolution=64, workers=1)
    (dup,) = [s for s in result.skipped if s.name == "b_copy.png"]
    assert dup.reason == "duplicate" and dup.detail == "same bytes as a.png"


def test_unreadable_folders_and_links_each_get_a_row(tmp_path, monkeypatch):
    import os

    src = tmp_path / "photos"
    save(photo(1), src / "a.png")
    save(photo(2), src / "sub" / "b.png")
    save(photo(3), src / "locked" / "c.png")
    save(photo(4), tmp_path / "elsewhere" / "d.png")
    (src / "sub" / "loop").symlink_to(src)  # a link back up the tree
    (src / "linked").symlink_to(tmp_path / "elsewhere")  # a link to a folder outside: followed
    (src / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (src / "self.jpg").symlink_to(src / "self.jpg")
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == src / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # root reads every folder: refuse one
    result = prepare_dataset(str(src), tmp_path / "ds", resolution=64, workers=1)
    assert sorted(r.source for r in result.records) == ["a.png", "linked/d.png", "sub/b.png"]
    rows = {s.name: (s.reason, s.detail) for s in result.skipped}
    assert rows == {
        "locked/": ("cannot read folder", "Permission denied"),
        "sub/loop/": ("link loop", "links to a folder above it"),
        "gone.jpg": ("broken link", f"points to {tmp_path / 'deleted.jpg'}, which does not exist"),
        "self.jpg": ("link loop", "the link points to itself"),
    }


def test_unreadable_source_folder_says_cannot_read(tmp_path, monkeypatch):
    import os

    src = tmp_path / "photos"
    save(photo(1), src / "a.png")
    real_scandir = os.scandir
    monkeypatch.setattr(
        os,
        "scandir",
        lambda path=".": (
            (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(path)))
            if Path(path) == src
            else real_scandir(path)
        ),
    )
    with pytest.raises(DataError, match=r"photos: cannot read this folder \(Permission denied\)"):
        prepare_dataset(str(src), tmp_path / "ds", resolution=64, workers=1)


# ---------------------------------------------------------------------------- small inputs that cost a lot


def test_zip_is_opened_once_not_per_entry(tmp_path, monkeypatch):
    from sdlora.data import sources

    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(12):
            buf = io.BytesIO()
            photo(i).save(buf, "PNG")
            zf.writestr(f"IMG_{i:02d}.png", buf.getvalue())
    opened = []

    class Counting(zipfile.ZipFile):
        def __init__(self, *args, **kwargs):
            opened.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sources.zipfile, "ZipFile", Counting)
    result = prepare_dataset(str(archive), tmp_path / "ds", resolution=64, workers=1)
    assert len(result.records) == 12
    assert len(opened) <= 3, len(opened)  # listing, reading (+ is_zipfile); was 1 + 2 per entry


def test_photo_too_large_for_a_worker_is_a_row_not_a_warning(tmp_path, monkeypatch):
    import warnings

    from sdlora.data import images

    # The 16-bit 16000x16000 PNG case, scaled down: bounds lowered so a 2000x2000 one is over them.
    monkeypatch.setattr(images, "MAX_PIXELS", 6_000_000)  # Pillow warns above half of it
    monkeypatch.setattr(images, "MAX_DECODE_BYTES", 16 << 20, raising=False)
    src = tmp_path / "photos"
    big = np.zeros((2000, 2000), dtype=np.uint16)
    big[::50] = 40000
    save(Image.fromarray(big), src / "scan16.png")
    rgb = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    save(Image.fromarray(rgb).resize((2000, 2000), Image.Resampling.NEAREST), src / "phone.jpg", quality=90)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = prepare_dataset(str(src), tmp_path / "ds", resolution=64, workers=1)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert [r.source for r in result.records] == ["phone.jpg"]  # a JPEG decodes at 1/8 (draft)
    assert [(s.name, s.reason, s.detail) for s in result.skipped] == [("scan16.png", "too large", "2000 x 2000 pixels")]
