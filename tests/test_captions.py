"""data/captions.py, caption_import.py, captioning.py and autocaption.py: the captions.txt format,
token insertion, imports matched by source stem, checks, and filling a dataset's captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captions_helpers import TINY_WORDS, write_phone_dataset, write_tiny_blip
from conftest import write_tiny_dataset
from sdlora.data.caption_import import StemIndex, import_captions, read_caption_source, source_name
from sdlora.data.captioning import caption_dataset
from sdlora.data.captions import (
    DEFAULT_TEMPLATE,
    check_captions,
    has_token,
    insert_token,
    parse_captions,
    read_captions,
    read_unique_captions,
    render_template,
    scan_captions,
    update_captions,
    write_captions,
)
from sdlora.data.manifest import load_manifest
from sdlora.errors import ConfigError, DataError, ModelError

# ---------------------------------------------------------------------------- format


def test_parse_read_write_round_trip_with_comments_bom_and_duplicates(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes(
        "\ufeff# mine\n\na.png|a photo of sksToy toy\n  b.png | sksToy on a table | outside \na.png|second\n".encode()
    )
    lines = parse_captions(path)
    assert [(line.file, line.caption, line.line_no) for line in lines] == [
        ("a.png", "a photo of sksToy toy", 3),
        ("b.png", "sksToy on a table | outside", 4),
        ("a.png", "second", 5),
    ]
    assert read_captions(path) == {"a.png": "second", "b.png": "sksToy on a table | outside"}
    write_captions(path, {"b.png": "y", "a.png": "x"})
    assert path.read_text(encoding="utf-8").splitlines()[1:] == ["a.png|x", "b.png|y"]


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("# c\na.png|ok sksToy\njust text\n|no name\n", encoding="utf-8")
    lines, bad = scan_captions(path)
    assert [line.file for line in lines] == ["a.png"]
    assert [(m.line_no, m.text) for m in bad] == [(3, "just text"), (4, "|no name")]
    with pytest.raises(DataError, match=r"captions.txt:3: expected '<file name>\|<caption>', got 'just text'"):
        parse_captions(path)


def test_not_utf8_and_missing_are_one_line_errors(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes("a.png|caf\xe9 sksToy\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as exc:
        parse_captions(path)
    assert "\n" not in str(exc.value)
    with pytest.raises(DataError, match="missing"):
        parse_captions(tmp_path / "nope.txt")


def test_update_keeps_comments_order_and_other_lines(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("# my notes\nb.png|mine sksToy\n# about a\na.png|old\n", encoding="utf-8")
    update_captions(path, {"a.png": "new sksToy", "c.png": "added sksToy"})
    assert path.read_text(encoding="utf-8") == (
        "# my notes\nb.png|mine sksToy\n# about a\na.png|new sksToy\nc.png|added sksToy\n"
    )


@pytest.mark.parametrize("mark", ["\u2028", "\u2029", "\x85", "\x1c", "\x0b", "\x0c"])
def test_lines_split_at_newline_only_not_at_unicode_line_breaks(tmp_path, mark):
    # str.splitlines splits at these; an editor shows one line, and the format says one line per \n.
    path = tmp_path / "captions.txt"
    path.write_text(f"# c\r\na.png|sksToy on a{mark}table\r\nb.png|sksToy\n", encoding="utf-8", newline="")
    lines, bad = scan_captions(path)
    assert bad == [] and [(line.file, line.caption, line.line_no) for line in lines] == [
        ("a.png", f"sksToy on a{mark}table", 2),
        ("b.png", "sksToy", 3),
    ]
    update_captions(path, {"b.png": "sksToy again"})  # the other lines are kept as they were
    assert path.read_text(encoding="utf-8") == f"# c\na.png|sksToy on a{mark}table\nb.png|sksToy again\n"


def test_a_caption_over_2000_characters_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text(f"a.png|sksToy {'x' * 1993}\nb.png|sksToy {'x' * 5_000_000}\n", encoding="utf-8")
    lines, bad = scan_captions(path)
    assert [line.file for line in lines] == ["a.png"]  # 2,000 characters: the most a caption may have
    assert [(m.line_no, m.text) for m in bad] == [(2, "b.png|sksToy " + "x" * 47)]
    with pytest.raises(DataError, match=r"captions.txt:2: the caption is 5,000,007 characters; at most 2,000 "):
        parse_captions(path)


def test_check_never_hands_a_huge_caption_to_the_tokenizer(tmp_path):
    # Tokenizing a 50 MB caption took 54 s and 6.3 GB; the length is checked first.
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the tokenizer was used ({name})")

        def __call__(self, *args, **kwargs):
            raise AssertionError("the tokenizer was called")

    ds = write_tiny_dataset(tmp_path / "ds", n=2)
    (ds / "captions.txt").write_text(f"img_001.png|sksToy {'red ' * 1_250_000}\n", encoding="utf-8")
    result = check_captions(ds, tokenizer=Untouchable())
    assert [(p.kind, p.line_no) for p in result.problems] == [
        ("malformed line", 1),
        ("no caption", None),
        ("no caption", None),
    ]


def test_training_refuses_a_file_captioned_twice_naming_both_lines(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("# c\na.png|sksToy one\nb.png|sksToy\na.png|sksToy two\n", encoding="utf-8")
    assert read_captions(path)["a.png"] == "sksToy two"  # prepare and caption keep the last (and warn)
    with pytest.raises(DataError, match=r"captions.txt:4: a.png is captioned again \(first on line 2\)"):
        read_unique_captions(path)


# ---------------------------------------------------------------------------- token and template


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a red toy car on a table", "a red sksToy toy car on a table"),
        ("A Toy on the floor", "A sksToy Toy on the floor"),
        ("a sksToy toy already", "a sksToy toy already"),
        ("a SKSTOY toy, lower-cased by CLIP anyway", "a SKSTOY toy, lower-cased by CLIP anyway"),
        ("a Toyota on a shelf", "sksToy a Toyota on a shelf"),  # `toy` is no word of its own here,
        ("toys on a shelf", "sksToy toys on a shelf"),  # nor in `toys`: prepend instead
        ("  a   dog\n sitting ", "sksToy a dog sitting"),
    ],
)
def test_insert_token(caption, expected):
    assert insert_token(caption, "sksToy", "toy") == expected


def test_insert_token_before_a_two_word_class():
    assert insert_token("a red rc car on sand", "sksCar", "rc car") == "a red sksCar rc car on sand"
    assert insert_token("a blue cartoon", "sksCar", "car") == "sksCar a blue cartoon"


def test_render_template():
    assert render_template(DEFAULT_TEMPLATE, "sksToy", "toy") == "a photo of sksToy toy"
    assert render_template("{token} {class}, studio light", "sksToy", "car") == "sksToy car, studio light"
    with pytest.raises(ConfigError, match="has no {token}"):
        render_template("a photo of a {class}", "sksToy", "toy")
    for bad in ("a photo of {tok}", "{token} {class_word}", "{token} {class", "{token} }", "{token} {}"):
        with pytest.raises(ConfigError, match="bad field") as err:
            render_template(bad, "sksToy", "toy")
        assert "\n" not in str(err.value) and repr(bad) in str(err.value)


def test_templates_and_prompts_fill_the_same_way():
    # A caption template and a validation prompt with the same text give the same words.
    from sdlora.prompts import DEFAULT_PROMPT, fill_prompt

    for template in (DEFAULT_PROMPT, "{token} {class}, studio light", "a {class} called {token}"):
        assert render_template(template, "sksToy", "rc car") == fill_prompt(template, "sksToy", "rc car")


# ---------------------------------------------------------------------------- stem matching


@pytest.mark.parametrize(
    "source, name",
    [
        ("photos/IMG_4651.HEIC", "IMG_4651.HEIC"),
        ("IMG_4651.HEIC", "IMG_4651.HEIC"),
        ("C:\\Users\\me\\DCIM\\IMG_1.JPG", "IMG_1.JPG"),
        ("https://disk.yandex.ru/d/AbC/sub%20dir/IMG_2.HEIC", "IMG_2.HEIC"),
        ("https://disk.yandex.ru/d/AbC?path=%2Fa%2FIMG_3.heic", "IMG_3.heic"),
    ],
)
def test_source_name(source, name):
    assert source_name(source) == name


def test_stem_index_finds_hash_named_images_by_source_stem(tmp_path):
    stems = write_phone_dataset(tmp_path / "ds")
    manifest = load_manifest(tmp_path / "ds")
    index = StemIndex(list(manifest.images), manifest)
    for key, stem in [
        ("IMG_4651.HEIC", "IMG_4651"),
        ("img_4651.png", "IMG_4651"),
        ("IMG_4652", "IMG_4652"),
        ("DCIM/img_4653.jpg", "IMG_4653"),
        ("IMG_4654.txt", "IMG_4654"),
        ("МОЯ ИГРУШКА.heic", "моя игрушка"),
        ("dsc_0001.JPEG", "DSC_0001"),
    ]:
        assert index.lookup(key) == (stems[stem], ""), key
    hashed = stems["IMG_4651"]
    assert index.lookup(hashed) == (hashed, "")  # the prepared name itself works too
    assert index.lookup("IMG_9999.HEIC")[0] is None


def test_same_stem_twice_is_ambiguous_but_full_names_still_match(tmp_path):
    stems = write_phone_dataset(tmp_path / "ds", ["photos/IMG_1.HEIC", "photos/IMG_1.JPG", "photos/IMG_2.HEIC"])
    manifest = load_manifest(tmp_path / "ds")
    index = StemIndex(list(manifest.images), manifest)
    image, why = index.lookup("IMG_1")
    assert image is None and why.startswith("ambiguous")
    heic, jpg = index.lookup("img_1.heic")[0], index.lookup("IMG_1.jpg")[0]
    assert {heic, jpg} == {n for n in manifest.images if n != stems["IMG_2"]} and heic != jpg


# ---------------------------------------------------------------------------- the three --from layouts


def test_read_list_file_with_pipe_and_colon_lines(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text(
        "# exported\nIMG_4651.HEIC|a red toy: shiny\nIMG_4652.png: a toy | on grass\nIMG_4653: no extension\n\n"
        "what is this\n",
        encoding="utf-8",
    )
    entries, bad = read_caption_source(path)
    assert [(e.key, e.caption, e.where) for e in entries] == [
        ("IMG_4651.HEIC", "a red toy: shiny", "mine.txt:2"),
        ("IMG_4652.png", "a toy | on grass", "mine.txt:3"),
    ]
    assert [where for where, _ in bad] == ["mine.txt:4", "mine.txt:6"]


def test_read_folder_of_txt_files(tmp_path):
    folder = tmp_path / "caps"
    (folder / "sub").mkdir(parents=True)
    (folder / "IMG_4651.txt").write_text("a red toy\non a table\n", encoding="utf-8")
    (folder / "sub" / "IMG_4652.caption").write_text("a toy", encoding="utf-8")
    (folder / "IMG_4651.HEIC").write_bytes(b"not read")
    (folder / "captions.txt").write_text("IMG_4653.HEIC|from the list\n", encoding="utf-8")
    entries, bad = read_caption_source(folder)
    assert sorted((e.key, e.caption) for e in entries) == [
        ("IMG_4651", "a red toy on a table"),
        ("IMG_4652", "a toy"),
        ("IMG_4653.HEIC", "from the list"),
    ]
    assert bad == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no caption files"):
        read_caption_source(tmp_path / "empty")
    with pytest.raises(DataError, match="--from .*nope.txt: no such file or folder"):
        read_caption_source(tmp_path / "nope.txt")


def test_import_matches_stems_inserts_token_and_reports_the_rest(tmp_path):
    stems = write_phone_dataset(tmp_path / "ds")
    manifest = load_manifest(tmp_path / "ds")
    src = tmp_path / "mine.txt"
    src.write_text(
        "IMG_4651.HEIC|a red toy car\nimg_4652.heic: a green dragon\nIMG_0000.HEIC|nobody\n"
        "IMG_4653.JPG|\nIMG_4654.png|a sksToy toy on sand\nIMG_4651|a blue toy\n",
        encoding="utf-8",
    )
    result = import_captions(src, list(manifest.images), manifest, class_word="toy")
    assert result.matched == {
        stems["IMG_4651"]: "a blue sksToy toy",  # the later line wins
        stems["IMG_4652"]: "sksToy a green dragon",
        stems["IMG_4654"]: "a sksToy toy on sand",
    }
    reasons = dict(result.unmatched)
    assert "no prepared image" in reasons["mine.txt:3"]
    assert "empty caption" in reasons["mine.txt:4"]
    assert "captioned again at mine.txt:6" in reasons["mine.txt:1"]


# ---------------------------------------------------------------------------- caption_dataset


def _lines(dataset: Path) -> dict[str, str]:
    return read_captions(dataset / "captions.txt")


def test_default_writes_templates_only_where_missing_and_keeps_user_captions(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds")
    names = sorted(_lines(ds))
    (ds / "captions.txt").write_text(
        f"# my comment\n{names[0]}|my sksToy on the sofa\n{names[1]}|a photo of sksToy toy\n{names[2]}|\n",
        encoding="utf-8",
    )
    result = caption_dataset(ds)
    captions = _lines(ds)
    assert captions[names[0]] == "my sksToy on the sofa"
    assert all(captions[n] == "a photo of sksToy toy" for n in names[1:])
    assert result.kept == [names[0]] and result.unchanged == [names[1]]
    assert result.written == {n: "template" for n in names[2:]}
    assert (ds / "captions.txt").read_text(encoding="utf-8").startswith("# my comment\n")
    # A second run changes nothing.
    before = (ds / "captions.txt").read_bytes()
    again = caption_dataset(ds)
    assert again.written == {} and (ds / "captions.txt").read_bytes() == before


def test_missing_captions_file_is_written_from_the_images_folder_when_manifest_lists_none(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=3)
    data = json.loads((ds / "manifest.json").read_text())
    data.update(train=[], val=[], images={})
    (ds / "manifest.json").write_text(json.dumps(data))
    (ds / "captions.txt").unlink()
    result = caption_dataset(ds, template="{token} {class}, studio photo")
    assert _lines(ds) == {f"img_{i:03d}.png": "sksToy toy, studio photo" for i in range(3)}
    assert len(result.written) == 3


def test_class_word_replaces_templates_not_user_words_and_updates_the_manifest(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=3)
    data = json.loads((ds / "manifest.json").read_text())
    data["future_key"] = {"kept": True}
    (ds / "manifest.json").write_text(json.dumps(data))
    update_captions(ds / "captions.txt", {"img_000.png": "my toy on a car", "img_001.png": "sksToy in the snow"})
    result = caption_dataset(ds, class_word="car")
    assert _lines(ds) == {
        "img_000.png": "my toy on a sksToy car",
        "img_001.png": "sksToy in the snow",
        "img_002.png": "a photo of sksToy car",
    }
    assert result.written == {"img_000.png": "token added", "img_002.png": "template"}
    assert result.kept == ["img_001.png"] and result.class_word_changed_from == "toy"
    saved = json.loads((ds / "manifest.json").read_text())
    assert saved["class_word"] == "car" and saved["future_key"] == {"kept": True}
    assert load_manifest(ds).class_word == "car"


def test_from_fills_templates_keeps_user_captions_unless_overwrite(tmp_path):
    ds = tmp_path / "ds"
    stems = write_phone_dataset(ds)
    update_captions(ds / "captions.txt", {stems["IMG_4652"]: "my own sksToy words", stems["IMG_4653"]: "mine, sksToy"})
    folder = tmp_path / "caps"
    folder.mkdir()
    for stem, text in [("IMG_4651", "a red toy"), ("IMG_4652", "a blue toy"), ("IMG_7777", "stray")]:
        (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
    result = caption_dataset(ds, source=folder)
    captions = _lines(ds)
    assert captions[stems["IMG_4651"]] == "a red sksToy toy"
    assert captions[stems["IMG_4652"]] == "my own sksToy words"
    assert captions[stems["DSC_0001"]] == "a photo of sksToy toy"
    assert result.written == {stems["IMG_4651"]: "imported"}
    assert sorted(result.kept) == sorted([stems["IMG_4652"], stems["IMG_4653"]])
    assert [where for where, _ in result.unmatched] == ["IMG_7777.txt"]
    caption_dataset(ds, source=folder, overwrite=True)
    assert _lines(ds)[stems["IMG_4652"]] == "a blue sksToy toy"
    assert _lines(ds)[stems["IMG_4653"]] == "mine, sksToy"  # not in the import: --overwrite leaves it


def test_overwrite_alone_resets_every_caption_to_the_template(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=3)
    update_captions(ds / "captions.txt", {"img_000.png": "mine, sksToy"})
    assert caption_dataset(ds).kept == ["img_000.png"]
    result = caption_dataset(ds, overwrite=True, template="{token} {class}")
    assert set(_lines(ds).values()) == {"sksToy toy"} and len(result.written) == 3


def test_captioner_output_gets_the_token_before_the_class_word(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds", n=4)
    update_captions(ds / "captions.txt", {"img_001.png": "mine, sksToy"})
    seen, progress = [], []

    def fake_model(paths, on_progress):
        seen.extend(p.name for p in paths)
        on_progress("captioning", len(paths), len(paths))
        return ["a yellow toy duck", "", "a duck in a bath"][: len(paths)]

    result = caption_dataset(ds, captioner=fake_model, on_progress=lambda *a: progress.append(a))
    assert seen == ["img_000.png", "img_002.png", "img_003.png"]  # the user's caption is not re-done
    assert _lines(ds) == {
        "img_000.png": "a yellow sksToy toy duck",
        "img_001.png": "mine, sksToy",
        "img_002.png": "a photo of sksToy toy",
        "img_003.png": "sksToy a duck in a bath",
    }
    assert result.written == {"img_000.png": "auto", "img_003.png": "auto"}
    assert progress == [("captioning", 3, 3)]


def test_bad_input_leaves_captions_untouched(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds")
    (ds / "captions.txt").write_bytes(b"img_000.png|caf\xe9\n")
    before = (ds / "captions.txt").read_bytes()
    with pytest.raises(DataError, match="not UTF-8"):
        caption_dataset(ds)
    assert (ds / "captions.txt").read_bytes() == before
    (ds / "captions.txt").write_text("img_000.png|x\n", encoding="utf-8")
    with pytest.raises(DataError, match="no such file or folder"):
        caption_dataset(ds, source=tmp_path / "missing.txt")
    with pytest.raises(ConfigError):
        caption_dataset(ds, template="no token here")
    assert (ds / "captions.txt").read_text(encoding="utf-8") == "img_000.png|x\n"
    assert sorted(p.name for p in ds.iterdir()) == ["captions.txt", "images", "manifest.json"]
    with pytest.raises(DataError, match="no such dataset folder"):
        caption_dataset(tmp_path / "nowhere")


# ---------------------------------------------------------------------------- --check


def test_check_ok(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds")
    result = check_captions(ds)
    assert result.ok and result.n_captions == 6 and result.n_images == 6


def test_check_finds_every_kind_of_problem(tmp_path):
    ds = write_tiny_dataset(tmp_path / "ds")
    (ds / "images" / "img_005.png").unlink()
    (ds / "captions.txt").write_text(
        "# header\n"
        "img_000.png|a photo of sksToy toy\n"  # 2
        "img_001.png|a photo of a toy\n"  # 3: no token
        "img_002.png|\n"  # 4: empty
        "img_000.png|again sksToy\n"  # 5: duplicate
        "ghost.png|sksToy ghost\n"  # 6: not in the dataset
        "img_005.png|sksToy gone\n"  # 7: file deleted
        "broken line\n",  # 8: malformed
        encoding="utf-8",
    )
    problems = [(p.kind, p.line_no, p.file) for p in check_captions(ds).problems]
    assert problems == [
        ("malformed line", 8, ""),
        ("duplicate", 5, "img_000.png"),
        ("missing image", 6, "ghost.png"),
        ("missing image", 7, "img_005.png"),
        ("empty caption", 4, "img_002.png"),
        ("no token", 3, "img_001.png"),
        ("no caption", None, "img_003.png"),
        ("no caption", None, "img_004.png"),
    ]


# ---------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    return write_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip")


def test_tiny_blip_captions_in_batches_with_progress(tmp_path, tiny_blip):
    from sdlora.data.autocaption import load_captioner

    ds = write_tiny_dataset(tmp_path / "ds", n=5)
    paths = sorted((ds / "images").iterdir())
    progress = []
    captions = load_captioner(str(tiny_blip), batch_size=2, max_new_tokens=6)(paths, lambda *a: progress.append(a))
    assert len(captions) == 5
    assert all(set(c.split()) <= set(TINY_WORDS) for c in captions)
    assert progress == [("captioning", 0, 5), ("captioning", 2, 5), ("captioning", 4, 5), ("captioning", 5, 5)]


def test_unloadable_models_are_one_line_model_errors(tmp_path, monkeypatch):
    from sdlora.data.autocaption import load_captioner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelError,
        match="sdlora-tests/no-such-captioner: not in the local cache and downloads are off .HF_HUB_OFFLINE=1.",
    ) as exc:
        load_captioner("sdlora-tests/no-such-captioner")
    assert "\n" not in str(exc.value)
    with pytest.raises(ModelError, match="no such model folder"):
        load_captioner(str(tmp_path / "missing-model"))
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelError, match="cannot load"):
        load_captioner(str(tmp_path / "not-a-model"))


def test_the_shipped_example_is_valid_and_imports_by_photo_name(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "captions.txt"
    lines = parse_captions(example)
    assert len(lines) >= 3 and all(has_token(line.caption, "sksToy") for line in lines)
    stems = write_phone_dataset(tmp_path / "ds", [f"duck_toy/{line.file}" for line in lines])
    caption_dataset(tmp_path / "ds", source=example)
    captions = _lines(tmp_path / "ds")
    assert [captions[stems[Path(line.file).stem]] for line in lines] == [line.caption for line in lines]
