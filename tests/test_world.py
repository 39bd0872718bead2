"""The miniature world (sdlora/world/): deterministic scenes, captions that name what is drawn,
masks that cover the object, novel objects the base distribution never contains, and phone
photos that `sdlora prepare` ingests upright."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps
from typer.testing import CliRunner

from sdlora.data.images import register_heif
from sdlora.world import objects, photos, scenes, vocab
from sdlora.world.__main__ import app as world_app

register_heif()
runner = CliRunner()


def nearest(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """The name (index into palette) of the nearest palette colour of each pixel."""
    colours = np.array(list(palette.values()), dtype=np.float32)
    return np.argmin(((pixels[:, None, :].astype(np.float32) - colours[None]) ** 2).sum(-1), axis=1)


def corr(a: Image.Image, b: Image.Image) -> float:
    x, y = (np.asarray(i.convert("L").resize((24, 24), Image.Resampling.BOX), dtype=np.float64) for i in (a, b))
    x, y = (x - x.mean()).ravel(), (y - y.mean()).ravel()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


# ------------------------------------------------------------------------------------- scenes


def test_same_seed_same_bytes():
    for size in (32, (96, 72)):
        a = scenes.sample_scene(np.random.default_rng(5), size)
        b = scenes.sample_scene(np.random.default_rng(5), size)
        assert a.image.tobytes() == b.image.tobytes() and (a.mask == b.mask).all() and a.caption == b.caption
        assert a.image.size == ((size, size) if isinstance(size, int) else size) and a.mask.shape == a.image.size[::-1]
    other = scenes.sample_scene(np.random.default_rng(6), 32)
    assert other.image.tobytes() != a.image.tobytes() or other.caption != a.caption
    first, again = next(scenes.batches(3, 32, 4)), next(scenes.batches(3, 32, 4))
    assert first.images.shape == (4, 32, 32, 3) and first.masks.shape == (4, 32, 32)
    assert (first.images == again.images).all() and first.captions == again.captions


def test_render_is_a_function_of_the_scene():
    scene = scenes.random_scene(np.random.default_rng(1))
    image, mask = scenes.render(scene, 48)
    image2, mask2 = scenes.render(scene, 48)
    assert image.tobytes() == image2.tobytes() and (mask == mask2).all()


def test_captions_name_what_is_drawn():
    # The caption's words come from the scene, and the pixels agree: the object's colour is among
    # the two commonest palette colours under its mask (with the pattern's colour, the top three:
    # features such as wheels and eyes are black and white), and the sky and ground match the
    # background named (up to the light's gain; a sun or the object's edge may fill a row: 1 in 20).
    rng = np.random.default_rng(0)
    names, bg_names = list(vocab.COLOURS), list(vocab.BACKGROUNDS)
    refs = np.array([b.sky + b.ground for b in vocab.BACKGROUNDS.values()], dtype=np.float32)
    wrong_background = 0
    for _ in range(40):
        image, caption, mask, scene = scenes.sample_scene(rng, 64)
        att = scene.attributes()
        assert caption.startswith("a photo of ") and caption.endswith(vocab.BACKGROUNDS[att["background"]].phrase)
        assert f" {att['colour']} {att['class']}" in caption
        if att["pattern"] != "plain":
            assert f"{att['pattern_colour']} {vocab.PATTERNS[att['pattern']]}" in caption
        for feature in att["features"]:
            assert vocab.FEATURES[feature] in caption
        counts = np.bincount(nearest(np.asarray(image)[mask], vocab.COLOURS), minlength=len(names))
        ranked = [names[i] for i in np.argsort(-counts)]
        assert att["colour"] in ranked[:2], (caption, ranked[:3])
        if att["pattern"] != "plain":
            assert att["pattern_colour"] in ranked[:3], (caption, ranked[:3])
        a = np.asarray(image, dtype=np.float32)
        seen = np.concatenate([np.median(a[1], axis=0), np.median(a[-2], axis=0)])
        gain = refs @ seen / (refs * refs).sum(1)
        wrong_background += bg_names[int(np.argmin(((seen - gain[:, None] * refs) ** 2).sum(1)))] != att["background"]
    assert wrong_background <= 2


def test_masks_cover_the_object():
    # Recolouring the object changes exactly the pixels under its mask (same scene, same noise).
    rng = np.random.default_rng(2)
    for _ in range(12):
        scene = scenes.random_scene(rng)
        comp = scene.obj.composition
        other = "green" if comp.colour != "green" else "red"
        recoloured = dataclasses.replace(
            scene, obj=dataclasses.replace(scene.obj, composition=dataclasses.replace(comp, colour=other))
        )
        image, mask = scenes.render(scene, 64)
        image2, _ = scenes.render(recoloured, 64)
        changed = np.abs(np.asarray(image, dtype=int) - np.asarray(image2, dtype=int)).max(-1) > 24
        grown = np.asarray(Image.fromarray(mask).convert("L").filter(ImageFilter.MaxFilter(3))) > 0
        assert changed.sum() > 0.3 * mask.sum() > 0, comp.phrase
        assert (changed & ~grown).sum() == 0, comp.phrase
        assert 0.01 < mask.mean() < 0.6


# ------------------------------------------------------------------------------------- novelty


def test_novel_objects_are_never_in_the_base_distribution():
    everything = set(objects.compositions())
    base, held = set(objects.base_compositions()), set(objects.held_out())
    assert base | held == everything and not base & held and len(everything) == len(objects.compositions())
    assert 0.2 < len(held) / len(everything) < 0.3
    for k in [*range(-3, 300), 10**12]:
        assert objects.novel_object(k).composition in held
    rng = np.random.default_rng(0)
    drawn = [objects.sample_base(rng).composition for _ in range(3000)]
    drawn += [s.obj.composition for b, _ in zip(scenes.batches(1, 16, 50), range(4)) for s in b.scenes]
    assert not set(drawn) & held
    # ...yet every word is seen in base training: only the combination is new.
    assert {c.cls for c in drawn} == set(vocab.CLASSES) and {c.colour for c in drawn} == set(vocab.COLOURS)
    assert {c.pattern for c in drawn} == set(vocab.PATTERNS)
    assert {f for c in drawn for f in c.features} == set(vocab.FEATURES)


def test_novel_object_is_fixed_by_k():
    assert objects.novel_object(7) == objects.novel_object(7)
    assert len({objects.novel_object(k) for k in range(50)}) == 50
    n = len(objects.held_out())
    wrapped = objects.novel_object(3 + n)  # the same combination comes round again with new details
    assert wrapped.composition == objects.novel_object(3).composition and wrapped != objects.novel_object(3)


def test_vocabulary_reads_from_one_place():
    assert vocab.caption("orange toy", "snow") == "a photo of an orange toy in the snow"
    assert vocab.object_phrase("car", "red", "stripes", "blue", ("eyes", "handle")) == (
        "red car with blue stripes, eyes and a handle"
    )
    assert vocab.object_phrase("car", "red", "plain", None, ("wheels",)) == "red car"  # a car's wheels go unsaid
    assert len(vocab.class_labels()) == len(vocab.CLASSES) and len(vocab.colour_labels()) == len(vocab.COLOURS)
    assert vocab.prompts("sksToy toy")[0] == "a photo of sksToy toy on the beach"
    assert len(vocab.background_labels()) == len(vocab.prompts("x")) == len(vocab.BACKGROUNDS)


# ------------------------------------------------------------------------------------- photos


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("world-photos")
    out, masks = root / "photos", root / "masks"
    result = runner.invoke(
        world_app, ["photos", "--object", "3", "--count", "6", "--out", str(out), "--masks", str(masks), "--clutter"]
    )
    assert result.exit_code == 0, result.output
    return out, masks


@pytest.fixture(scope="module")
def rendered():
    return photos.render_photos(3, 6, clutter=True)


def test_photos_are_heic_and_jpeg_of_4_3_some_sideways(photo_folder):
    out, masks = photo_folder
    files = sorted(out.iterdir())
    assert [p.name for p in files] == [f"IMG_{i:04d}{photos.SUFFIX[photos.FORMATS[i - 1]]}" for i in range(1, 7)]
    assert {p.suffix for p in files} == {".HEIC", ".JPG"}
    tags = {}
    for path in files:
        img = Image.open(path)
        assert img.format == ("HEIF" if path.suffix == ".HEIC" else "JPEG")
        # pillow-heif turns a HEIC upright on opening and keeps the tag it had; a JPEG keeps its EXIF tag.
        tags[path.name] = img.info.get("original_orientation") or img.getexif().get(0x0112, 1)
        shown = ImageOps.exif_transpose(img)
        assert shown.size == photos.SIZE and shown.width * 3 == shown.height * 4
        assert Image.open(masks / f"{path.stem}.png").size == photos.SIZE
    assert {tags["IMG_0002.JPG"], tags["IMG_0004.HEIC"], tags["IMG_0006.HEIC"]} == {6, 8, 3}
    assert sum(t == 1 for t in tags.values()) == 3
    assert Image.open(out / "IMG_0002.JPG").size == photos.SIZE[::-1]  # stored sideways


def test_photos_are_what_the_world_renders(photo_folder, rendered, monkeypatch):
    out, _ = photo_folder
    for photo in rendered:
        shown = ImageOps.exif_transpose(Image.open(out / photo.name)).convert("RGB")
        assert corr(shown, photo.image) > 0.98, photo.name
    assert {p.scene.background for p in rendered} == {photos.ROOM}
    assert all(p.scene.obj == objects.novel_object(3) for p in rendered)
    monkeypatch.setattr(photos, "render", lambda scene, size, backdrop=None: (None, None))  # scenes only
    loose = photos.render_photos(3, 8)
    assert len({p.scene.background for p in loose}) == 8  # one of each background


def test_sdlora_prepare_ingests_the_photos(photo_folder, rendered, tmp_path, monkeypatch):
    from sdlora.cli import app
    from sdlora.data.manifest import load_manifest

    monkeypatch.setenv("COLUMNS", "200")
    out, masks = photo_folder
    ds = tmp_path / "ds"
    result = runner.invoke(
        app, ["prepare", str(out), "--out", str(ds), "--resolution", "64", "--workers", "1", "--masks", str(masks)]
    )
    assert result.exit_code == 0, result.output
    manifest = load_manifest(ds)
    records = {r.source: r for r in manifest.images.values()}
    assert sorted(records) == sorted(p.name for p in out.iterdir())
    for photo in rendered:
        rec = records[photo.name]
        assert tuple(rec.original_size) == photos.SIZE
        got = Image.open(ds / "images" / rec.file)
        assert corr(got, ImageOps.fit(photo.image, (64, 64))) > 0.95, photo.name  # upright, decoded
        mask = np.asarray(Image.open(ds / "masks" / rec.mask)) > 127
        want = np.asarray(ImageOps.fit(Image.fromarray(photo.mask), (64, 64))) > 0
        assert (mask & want).sum() > 0.9 * want.sum(), photo.name


def test_photos_bad_input_is_one_line_and_writes_nothing(tmp_path):
    result = runner.invoke(world_app, ["photos", "--object", "1", "--count", "0", "--out", str(tmp_path / "p")])
    assert result.exit_code == 1 and "--count 0" in result.stderr and not (tmp_path / "p").exists()
    inside = tmp_path / "q"
    result = runner.invoke(
        world_app, ["photos", "--object", "1", "--count", "2", "--out", str(inside), "--masks", str(inside / "m")]
    )
    assert result.exit_code == 1 and "--masks" in result.stderr and not inside.exists()
    (tmp_path / "file").write_text("")
    result = runner.invoke(
        world_app, ["photos", "--object", "1", "--count", "1", "--out", str(tmp_path / "file" / "p")]
    )
    assert result.exit_code == 1 and "Not a directory" in result.stderr and "(--out)" in result.stderr


def test_scenes_contact_sheet(tmp_path):
    result = runner.invoke(world_app, ["scenes", "--count", "3", "--size", "16", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 0 and len(result.stdout.strip().splitlines()) == 3
    assert Image.open(tmp_path / "s.png").size == (48, 16)
