"""`sdlora prepare` through the CLI: the summary table, one-line errors with exit 1, and
nothing earlier lost when the input is bad."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.data.images import register_heif
from sdlora.data.manifest import load_manifest

register_heif()

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def invoke(*args: str | Path):
    return runner.invoke(app, ["prepare", *map(str, args)])


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def photos(folder: Path, n: int, first_seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        blocks = np.random.default_rng(first_seed + i).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((90, 90), Image.Resampling.NEAREST).save(folder / f"IMG_{i:04d}.png")
    return folder


def shaped_photos(folder: Path) -> Path:
    """Two 4:3, one 3:4 (a JPEG stored 4:3 with EXIF orientation 6) and one 1:1 photo."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for name, size in [("wide1.png", (400, 300)), ("wide2.png", (800, 600)), ("square.png", (300, 300))]:
        blocks = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST).save(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6
    blocks = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize((400, 300), Image.Resampling.NEAREST).save(folder / "tall.jpg", exif=exif.tobytes())
    return folder


def test_help():
    result = runner.invoke(app, ["prepare", "--help"])
    assert result.exit_code == 0 and "--resolution" in result.stdout and "--keep-duplicates" in result.stdout
    assert "--keep-aspect" in result.stdout


def test_keep_aspect_sizes_in_summary_and_manifest(tmp_path):
    src, out = shaped_photos(tmp_path / "photos"), tmp_path / "ds"
    result = invoke(src, "--out", out, "--resolution", "256", "--keep-aspect", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "sizes: 320x192 x2, 192x320 x1, 256x256 x1" in result.stdout
    assert (
        "wrote " in result.stdout and "4 images in 3 sizes of about 256x256 px area (train 3, val 1)" in result.stdout
    )
    m = load_manifest(out)
    assert m.options.get("keep_aspect", False) is True
    assert {r.source: r.size for r in m.images.values()} == {
        "wide1.png": (320, 192),
        "wide2.png": (320, 192),
        "square.png": (256, 256),
        "tall.jpg": (192, 320),
    }
    assert all(Image.open(out / "images" / name).size == rec.size for name, rec in m.images.items())

    # Toggled off: square again, nothing of the keep-aspect run re-used.
    square = invoke(src, "--out", out, "--resolution", "256", "--workers", "1")
    assert square.exit_code == 0 and "decoded 4, reused 0" in square.stdout and "sizes:" not in square.stdout
    m = load_manifest(out)
    assert m.options.get("keep_aspect", False) is False and {r.size for r in m.images.values()} == {(256, 256)}
    assert {Image.open(p).size for p in (out / "images").iterdir()} == {(256, 256)}


def test_keep_aspect_with_pad_is_one_line(tmp_path):
    result = invoke(shaped_photos(tmp_path / "photos"), "--out", tmp_path / "ds", "--keep-aspect", "--crop", "pad")
    one_line_error(result, "--keep-aspect with --crop pad")
    assert not (tmp_path / "ds").exists()


def test_rc_car_default_out_table_and_rerun(dreambench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(dreambench / "rc_car", "--resolution", "64", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "kept" in result.stdout and "IMG_4650.HEIC" in result.stdout
    assert "wrote dataset: 5 images at 64 px (train 4, val 1); decoded 5, reused 0" in result.stdout
    m = load_manifest(tmp_path / "dataset")
    assert len(m.images) == 5 and m.resolution == 64
    again = invoke(dreambench / "rc_car", "--resolution", "64")
    assert (
        again.exit_code == 0 and "updated dataset: 5 images" in again.stdout and "decoded 0, reused 5" in again.stdout
    )


def test_skips_shown_in_table(tmp_path):
    src = photos(tmp_path / "photos", 2)
    (src / "clip.MOV").write_bytes(b"\x00" * 10)
    heic = io.BytesIO()
    Image.new("RGB", (90, 90), (9, 9, 9)).save(heic, "HEIF")
    (src / "broken.HEIC").write_bytes(heic.getvalue()[:-20])  # cut off mid-picture
    result = invoke(src, "--out", tmp_path / "ds", "--resolution", "64", "--token", "zwx", "--class-word", "plush")
    assert result.exit_code == 0, result.output
    for text in ("kept", "skipped: video", "clip.MOV", "skipped: corrupt or truncated", "broken.HEIC"):
        assert text in result.stdout, result.stdout
    m = load_manifest(tmp_path / "ds")
    assert (m.token, m.class_word) == ("zwx", "plush")
    assert "a photo of zwx plush" in (tmp_path / "ds" / "captions.txt").read_text()


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("no/such/folder", "no/such/folder: no such folder or file"),
        ("https://example.com/photos.zip", "unsupported link"),
        ("https://disk.yandex.ru/x", "not a Yandex Disk public link"),
    ],
)
def test_unknown_or_malformed_source(tmp_path, source, fragment):
    result = invoke(source, "--out", tmp_path / "ds")
    one_line_error(result, fragment)
    assert not (tmp_path / "ds").exists()


def test_nothing_usable_one_line_and_earlier_dataset_kept(tmp_path):
    good = photos(tmp_path / "photos", 3)
    out = tmp_path / "ds"
    assert invoke(good, "--out", out, "--resolution", "64").exit_code == 0
    before = snapshot(out)
    for p in good.iterdir():  # the same source, now all junk: the old dataset must survive
        p.write_bytes(b"")
    result = invoke(good, "--out", out, "--resolution", "64")
    one_line_error(result, "no usable photos (3 empty file)", f"nothing was written to {out}")
    assert "skipped: empty file" in result.stdout
    assert snapshot(out) == before


def test_empty_folder_is_its_error_line_alone(tmp_path):
    (tmp_path / "photos").mkdir()
    result = invoke(tmp_path / "photos", "--out", tmp_path / "ds")
    line = one_line_error(result, "no usable photos (no files in it)", "nothing was written")
    assert result.stderr.strip() == line and result.stdout == ""  # no empty summary table
    assert not (tmp_path / "ds").exists()
    # Only skipped files: the table says what was skipped and why, then the error line.
    (tmp_path / "photos" / "IMG_0001.MOV").write_bytes(b"video")
    result = invoke(tmp_path / "photos", "--out", tmp_path / "ds")
    one_line_error(result, "no usable photos (1 video)")
    assert "skipped: video" in result.stdout and "IMG_0001.MOV" in result.stdout


def test_refuses_to_overwrite_another_dataset(tmp_path):
    out = tmp_path / "ds"
    assert invoke(photos(tmp_path / "a", 2), "--out", out, "--resolution", "64").exit_code == 0
    before = snapshot(out)
    other = photos(tmp_path / "b", 2, first_seed=50)
    one_line_error(invoke(other, "--out", out, "--resolution", "64"), "already holds a dataset", "--force")
    assert snapshot(out) == before
    forced = invoke(other, "--out", out, "--resolution", "64", "--force")
    assert forced.exit_code == 0 and "replaced" in forced.stdout
    assert {r.source for r in load_manifest(out).images.values()} == {"IMG_0000.png", "IMG_0001.png"}
    assert load_manifest(out).source == str(other.resolve())


def test_bad_option_is_one_line(tmp_path):
    one_line_error(
        invoke(photos(tmp_path / "p", 1), "--out", tmp_path / "ds", "--resolution", "500"), "--resolution 500"
    )
    assert not (tmp_path / "ds").exists()


def test_yandex_link_through_loopback_api(tmp_path, monkeypatch):
    # The downloader has its own tests; this checks prepare's side: sources are URLs, a video is
    # reported and never downloaded, a second run downloads and decodes nothing.
    from yandex_stub import FakeYandex

    link = "https://disk.yandex.ru/d/prepareTest"
    pngs = {}
    for i in range(3):
        buf = io.BytesIO()
        blocks = np.random.default_rng(i).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((90, 90), Image.Resampling.NEAREST).save(buf, "PNG")
        pngs[f"IMG_{i}.png"] = buf.getvalue()
    fake = FakeYandex().start()
    try:
        fake.add_folder(link, {**pngs, "IMG_0.MOV": b"\x00" * 64})
        monkeypatch.setenv("SDLORA_YANDEX_API", fake.base)
        monkeypatch.setenv("SDLORA_CACHE", str(tmp_path / "cache"))
        out = tmp_path / "ds"
        result = invoke(link, "--out", out, "--resolution", "64", "--workers", "1")
        assert result.exit_code == 0, result.output
        assert "skipped: video" in result.stdout and fake.count("file", "/IMG_0.MOV") == 0
        m = load_manifest(out)
        assert m.source == link and sorted(r.source.rsplit("/", 1)[-1] for r in m.images.values()) == sorted(pngs)
        assert all(r.source.startswith(link) for r in m.images.values())
        files_before = fake.count("file")
        again = invoke(link, "--out", out, "--resolution", "64", "--workers", "1")
        assert again.exit_code == 0 and "decoded 0, reused 3" in again.stdout
        assert fake.count("file") == files_before
    finally:
        fake.close()


def test_masks_folder_rows_and_bad_mask_is_one_line(tmp_path):
    src = photos(tmp_path / "photos", 3)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i, box in ((0, (20, 20, 70, 70)), (1, (40, 40, 44, 44))):
        mask = Image.new("L", (90, 90), 0)
        mask.paste(255, box)
        mask.save(masks / f"img_{i:04d}.png")
    out = tmp_path / "ds"
    result = invoke(src, "--out", out, "--resolution", "64", "--masks", masks)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "no mask" in line or "mask looks wrong" in line]
    assert len(rows) == 2, result.stdout
    assert "IMG_0002.png (no mask file)" in rows[0] and "IMG_0001.png (covers" in rows[1]
    assert "masks (folder)" in result.stdout and "made 2, reused 0" in result.stdout
    assert load_manifest(out).has_masks and len(list((out / "masks").iterdir())) == 2
    before = snapshot(out)
    (masks / "notes.txt").write_text("which photo is which")
    one_line_error(invoke(src, "--out", out, "--resolution", "64", "--masks", masks), "notes.txt is not an image")
    assert snapshot(out) == before


def frames(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)).resize((96, 96), Image.Resampling.NEAREST)
        for _ in range(n)
    ]


def test_animations_and_multi_page_tiffs_say_only_their_first_frame_is_used(tmp_path):
    src = photos(tmp_path / "photos", 2)  # plain photos: not mentioned
    first, *rest = frames(3, 10)
    first.save(src / "spin.gif", save_all=True, append_images=rest, duration=100, loop=0)
    first, *rest = frames(4, 11)
    first.save(src / "scan.tiff", save_all=True, append_images=rest)
    first, *rest = frames(2, 12)
    first.save(src / "wave.webp", save_all=True, append_images=rest, duration=100, lossless=True)
    frames(1, 13)[0].save(src / "still.gif")  # one frame: nothing to say
    out = tmp_path / "ds"
    for _ in range(2):  # the second run re-uses the decoded results, and still says so
        result = invoke(src, "--out", out, "--resolution", "64", "--workers", "1")
        assert result.exit_code == 0, result.output
        row = next(line for line in result.stdout.splitlines() if "first frame only" in line)
        assert "│     3 │" in row, row
        for shown in ("scan.tiff (multi-page TIFF, 4 pages)", "spin.gif (animated GIF, 3 frames)"):
            assert shown in row, row
        assert "wave.webp (animated WebP, 2 frames)" in result.stdout  # the fourth is folded onto the next line
        assert "still.gif" not in row and "IMG_" not in row
    assert len(load_manifest(out).images) == 6
