"""`sdlora caption` end to end through the CLI: defaults, --from, --auto on a tiny BLIP, --check,
and one-line errors that leave captions.txt as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from captions_helpers import write_phone_dataset, write_tiny_blip
from conftest import one_line_error, write_tiny_dataset
from sdlora.cli import app
from sdlora.data.captions import has_token, read_captions, update_captions

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    # rich folds table cells at 80 columns; a wide terminal keeps each cell on one line.
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    return write_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip")


def invoke(*args: str | Path):
    return runner.invoke(app, ["caption", *map(str, args)])


def test_default_dataset_folder_and_summary(tmp_path, monkeypatch):
    ds = write_tiny_dataset(tmp_path / "dataset")
    (ds / "captions.txt").unlink()
    monkeypatch.chdir(tmp_path)
    result = invoke()
    assert result.exit_code == 0, result.output
    assert "written: template" in result.stdout and "6 images captioned with 'sksToy'; 6 written" in result.stdout
    assert set(read_captions(ds / "captions.txt").values()) == {"a photo of sksToy toy"}
    check = invoke("--check")
    assert check.exit_code == 0 and "6 captions OK" in check.stdout


def test_class_word_and_template_keep_user_captions(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=3)
    update_captions(ds / "captions.txt", {"img_001.png": "my sksToy on the sofa"})
    result = invoke(ds, "--class-word", "plush", "--template", "a photo of {token} {class}, studio light")
    assert result.exit_code == 0, result.output
    assert "kept: yours" in result.stdout and "class word: toy -> plush" in result.stdout
    assert read_captions(ds / "captions.txt") == {
        "img_000.png": "a photo of sksToy plush, studio light",
        "img_001.png": "my sksToy on the sofa",
        "img_002.png": "a photo of sksToy plush, studio light",
    }


@pytest.mark.parametrize("layout", ["pipe", "colon", "folder"])
def test_from_each_layout_matches_original_photo_names(tmp_path, layout):
    ds = tmp_path / "ds"
    stems = write_phone_dataset(ds)
    wanted = {"IMG_4651": "a red toy on a table", "IMG_4653": "a toy in the grass", "DSC_0001": "a toy at night"}
    if layout == "folder":
        source = tmp_path / "caps"
        source.mkdir()
        for stem, text in wanted.items():
            (source / f"{stem.lower()}.txt").write_text(text + "\n", encoding="utf-8")
        (source / "IMG_0042.txt").write_text("a lost toy\n", encoding="utf-8")
    else:
        sep = "|" if layout == "pipe" else ": "
        names = {"IMG_4651": "IMG_4651.HEIC", "IMG_4653": "img_4653.jpg", "DSC_0001": "DSC_0001.jpeg"}
        source = tmp_path / "mine.txt"
        source.write_text(
            "# from my phone\n"
            + "".join(f"{names[s]}{sep}{t}\n" for s, t in wanted.items())
            + f"IMG_0042.HEIC{sep}a lost toy\n",
            encoding="utf-8",
        )
    result = invoke(ds, "--from", source)
    assert result.exit_code == 0, result.output
    captions = read_captions(ds / "captions.txt")
    for stem, text in wanted.items():
        assert captions[stems[stem]] == text.replace("toy", "sksToy toy", 1)
    assert captions[stems["IMG_4652"]] == "a photo of sksToy toy"
    assert "written: imported (--from)" in result.stdout
    assert "1 imported lines not used" in result.stdout and "IMG_0042" in result.stdout
    assert invoke(ds, "--check").exit_code == 0


def test_auto_with_tiny_blip_end_to_end(tmp_path, tiny_blip):
    ds = write_tiny_dataset(tmp_path / "ds", n=5)
    update_captions(ds / "captions.txt", {"img_002.png": "my sksToy, do not touch"})
    result = invoke(ds, "--auto", tiny_blip, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    captions = read_captions(ds / "captions.txt")
    assert captions["img_002.png"] == "my sksToy, do not touch"
    others = [captions[f"img_{i:03d}.png"] for i in (0, 1, 3, 4)]
    assert all(has_token(c, "sksToy") for c in others)
    assert all(c != "a photo of sksToy toy" for c in others)  # the model wrote them, not the template
    assert "written: by the model (--auto)" in result.stdout and "kept: yours" in result.stdout
    again = invoke(ds, "--auto", tiny_blip, "--overwrite")
    assert again.exit_code == 0, again.output
    captions = read_captions(ds / "captions.txt")
    assert len(captions) == 5 and all(has_token(c, "sksToy") for c in captions.values())
    assert captions["img_002.png"] != "my sksToy, do not touch"
    check = invoke(ds, "--check")
    assert check.exit_code == 0 and "5 captions OK" in check.stdout


def test_check_prints_a_table_and_exits_1(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=4)
    (ds / "captions.txt").write_text(
        "img_000.png|a photo of a toy\nimg_001.png|\nimg_001.png|sksToy twice\nghost.png|sksToy\nhello\n",
        encoding="utf-8",
    )
    before = (ds / "captions.txt").read_bytes()
    result = invoke(ds, "--check")
    one_line_error(result, "7 problems")
    for kind in ("malformed line", "duplicate", "missing image", "empty caption", "no token", "no caption"):
        assert kind in result.stdout
    assert "img_003.png" in result.stdout and "ghost.png" in result.stdout
    assert (ds / "captions.txt").read_bytes() == before


def test_bad_input_is_one_line_and_changes_nothing(tmp_path, tiny_blip):
    one_line_error(invoke(tmp_path / "nowhere"), "no such dataset folder")
    (tmp_path / "empty").mkdir()
    one_line_error(invoke(tmp_path / "empty"), "manifest.json: missing")
    one_line_error(invoke(tmp_path / "empty", "--check"), "manifest.json: missing")

    ds = write_tiny_dataset(tmp_path / "ds")
    (ds / "captions.txt").write_bytes(b"img_000.png|caf\xe9 sksToy\n")
    before = (ds / "captions.txt").read_bytes()
    one_line_error(invoke(ds), "not UTF-8")
    one_line_error(invoke(ds, "--check"), "not UTF-8")
    one_line_error(invoke(ds, "--auto", tiny_blip), "not UTF-8")
    assert (ds / "captions.txt").read_bytes() == before

    (ds / "captions.txt").write_text("img_000.png|mine sksToy\n", encoding="utf-8")
    before = (ds / "captions.txt").read_bytes()
    one_line_error(invoke(ds, "--from", tmp_path / "missing.txt"), "--from", "no such file or folder")
    one_line_error(invoke(ds, "--auto", "sdlora-tests/no-such-captioner"), "not in the local cache")
    one_line_error(invoke(ds, "--from", ds / "captions.txt", "--auto", tiny_blip), "choose one")
    one_line_error(invoke(ds, "--check", "--overwrite"), "--check only validates")
    one_line_error(invoke(ds, "--template", "a photo"), "no {token}")
    assert (ds / "captions.txt").read_bytes() == before
    assert sorted(p.name for p in ds.iterdir()) == ["captions.txt", "images", "manifest.json"]


def test_check_measures_captions_with_the_models_tokenizer(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=3)
    filler = " ".join(["red"] * 80)  # 80 CLIP tokens
    update_captions(
        ds / "captions.txt",
        {
            "img_000.png": f"a photo of sksToy toy, {filler}",  # over the window: the end is lost
            "img_001.png": f"a photo of a toy, {filler}, sksToy",  # the token itself is past the window
        },
    )
    result = invoke(ds, "--check", "--model", "tiny-sd")
    assert result.exit_code == 1, result.output
    assert "token cut off" in result.stdout and "img_001.png" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "img_000.png" in warnings[0] and "too long" in warnings[0], result.stderr
    assert "the text encoder reads 75" in warnings[0]

    update_captions(ds / "captions.txt", {"img_001.png": "a photo of sksToy toy"})
    result = invoke(ds, "--check", "--model", "tiny-sd")
    assert result.exit_code == 0 and "3 captions OK" in result.stdout, result.output
    assert "too long" in result.stderr


def test_check_without_a_loadable_tokenizer_warns_that_lengths_were_not_checked(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=2)
    result = invoke(ds, "--check", "--model", str(tmp_path / "no-such-model"))
    assert result.exit_code == 0, result.output
    assert "lengths not checked" in result.stdout
    assert "warning: caption lengths not checked" in result.stderr


def test_caption_warns_when_captions_txt_lists_a_file_twice(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=2)
    with open(ds / "captions.txt", "a", encoding="utf-8") as f:
        f.write("img_000.png|a photo of sksToy toy on a shelf\n")
    result = invoke(ds)
    assert result.exit_code == 0, result.output
    assert "lists img_000.png 2 times" in result.stderr and "the last one is used" in result.stderr


def test_check_reads_a_unicode_line_break_inside_a_caption_as_part_of_it(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=2)
    (ds / "captions.txt").write_text(
        "img_000.png|sksToy on a\u2028table\nimg_001.png|sksToy by a\x85window\n", encoding="utf-8"
    )
    result = invoke(ds, "--check", "--model", "tiny-sd")
    assert result.exit_code == 0 and "2 captions OK" in result.stdout, result.output


def test_check_and_train_refuse_a_huge_caption_by_its_line(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=2)
    (ds / "captions.txt").write_text(f"img_000.png|sksToy\nimg_001.png|sksToy {'red ' * 1_250_000}\n")
    result = invoke(ds, "--check", "--model", "tiny-sd")
    one_line_error(result, "2 problems")  # the line, and so img_001.png has no caption
    assert "the caption is 5,000,006 characters; at most 2,000" in result.stdout, result.stdout
    train = runner.invoke(app, ["train", "--dataset", str(ds), "--model", "tiny-sd", "--runs-dir", str(tmp_path)])
    one_line_error(train, f"{ds / 'captions.txt'}:2: the caption is 5,000,006 characters")


def test_a_file_captioned_twice_is_refused_by_train_naming_both_lines(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=2)
    with open(ds / "captions.txt", "a", encoding="utf-8") as f:
        f.write("img_000.png|a photo of sksToy toy on a shelf\n")
    result = runner.invoke(app, ["train", "--dataset", str(ds), "--model", "tiny-sd", "--runs-dir", str(tmp_path)])
    one_line_error(result, f"{ds / 'captions.txt'}:4: img_000.png is captioned again (first on line 2)")
    assert not (tmp_path / "latest").exists()


def test_tables_of_problems_show_the_first_rows_and_count_the_rest(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=2)
    unknown = "".join(f"ghost_{i:05d}.png|sksToy\n" for i in range(5000))
    with open(ds / "captions.txt", "a", encoding="utf-8") as f:
        f.write(unknown)
    check = invoke(ds, "--check")
    one_line_error(check, "5,000 problems")
    assert check.stdout.count("ghost_") == 20 and "ghost_00019.png" in check.stdout
    assert "... and 4,980 more problems: 4,980 missing image (the first 20 shown)" in check.stdout

    (tmp_path / "mine.txt").write_text(unknown, encoding="utf-8")
    imported = invoke(ds, "--from", tmp_path / "mine.txt")
    assert imported.exit_code == 0, imported.output
    assert "5,000 imported lines not used" in imported.stdout and imported.stdout.count("ghost_") == 20
    assert "... and 4,980 more imported lines not used (the first 20 shown)" in imported.stdout


def test_the_users_text_in_a_table_is_not_read_as_markup(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=2)
    with open(ds / "captions.txt", "a", encoding="utf-8") as f:
        f.write("x[/]y.png|sksToy [bold]\n")
    check = invoke(ds, "--check")
    one_line_error(check, "1 problems")
    assert "x[/]y.png" in check.stdout
    (tmp_path / "mine.txt").write_text("a[/]b.png|[/] sksToy\n", encoding="utf-8")
    imported = invoke(ds, "--from", tmp_path / "mine.txt")
    assert imported.exit_code == 0 and "a[/]b.png" in imported.stdout, imported.output


def test_check_measures_flux_captions_with_t5s_window(tmp_path):
    """FLUX.1 reads captions through T5 (512 tokens): a token past CLIP's 75 is no problem there, as train
    takes it (train/data.py check_caption_lengths asks the same family window)."""
    ds = write_tiny_dataset(tmp_path / "ds", n=2)
    update_captions(ds / "captions.txt", {"img_001.png": f"a photo of a toy, {' '.join(['red'] * 80)}, sksToy"})
    result = invoke(ds, "--check", "--model", "tiny-flux")
    assert result.exit_code == 0 and "2 captions OK" in result.stdout, result.output
    assert "too long" not in result.stderr and "token cut off" not in result.stdout
