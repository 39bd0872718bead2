"""Scorer arithmetic on tiny random DINO/CLIP models: identical images, hand-computed pairwise
means, the stated preprocessing, projected text embeddings, token removal, the incremental
embedding cache, the dreambench prompt set, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from score_helpers import add_samples, random_png, write_run
from sdlora.errors import ConfigError, DataError, ModelError, RunError
from sdlora.evaluate.cache import EmbeddingCache
from sdlora.evaluate.clip import load_clip
from sdlora.evaluate.dino import IMAGENET_MEAN, IMAGENET_STD, load_dino
from sdlora.evaluate.paper_prompts import OBJECT_PROMPTS, object_prompts
from sdlora.evaluate.score import (
    Sample,
    dino_similarity_to_val,
    missing_prompts,
    pairwise_mean,
    plan_scoring,
    remove_token,
    score_run,
    score_samples,
    val_photos,
)
from sdlora.run import load_run

TINY = {"dino_model": "tiny-dino", "clip_model": "tiny-clip", "device": "cpu"}


@pytest.fixture(scope="module")
def dino():
    return load_dino("tiny-dino", "cpu")


@pytest.fixture(scope="module")
def clip():
    return load_clip("tiny-clip", None, "cpu")


def _samples(paths: list[Path], prompt: str, variant: str = "lora") -> list[Sample]:
    return [Sample(p, prompt, variant) for p in paths]


def _cos_matrix(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a = a.numpy().astype(np.float64)
    b = b.numpy().astype(np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


# ---- arithmetic ---------------------------------------------------------------------------------


def test_identical_images_score_one(tmp_path, dino, clip):
    real = random_png(tmp_path / "real.png", seed=1, size=80)
    copies = [shutil.copy(real, tmp_path / f"gen{i}.png") for i in range(3)]
    result = score_samples(
        _samples([Path(c) for c in copies], "a sksToy toy"),
        [real],
        token="sksToy",
        dino=dino,
        clip=clip,
        cache_dir=None,
    )
    lora = result["overall"]["lora"]
    assert lora["dino"] == pytest.approx(1.0, abs=1e-6)
    assert lora["clip_i"] == pytest.approx(1.0, abs=1e-6)
    assert (lora["images"], lora["real_images"]) == (3, 1)
    assert result["overall"]["baseline"] is None
    # identical files are embedded once per scorer (the cache is keyed by content)
    assert result["embedded"] == {"dino": 1, "clip": 1}


def test_pairwise_mean_equals_hand_computed_3x2(tmp_path, dino, clip):
    gen = [random_png(tmp_path / f"g{i}.png", seed=10 + i, size=96) for i in range(3)]
    real = [random_png(tmp_path / f"r{i}.png", seed=20 + i, size=128) for i in range(2)]
    result = score_samples(_samples(gen, "a sksToy toy"), real, token="sksToy", dino=dino, clip=clip, cache_dir=None)
    lora = result["overall"]["lora"]
    for scorer, key in ((dino, "dino"), (clip, "clip_i")):
        # one image at a time, so batching in the scorer is checked too
        g = torch.cat([scorer.embed([Image.open(p)]) for p in gen])
        r = torch.cat([scorer.embed([Image.open(p)]) for p in real])
        cos = _cos_matrix(g, r)
        assert cos.shape == (3, 2)
        assert lora[key] == pytest.approx(float(np.mean(cos)), abs=1e-6)
        # pairwise mean, not the cosine of mean embeddings
        centroid = float(_cos_matrix(g.mean(0, keepdim=True), r.mean(0, keepdim=True))[0, 0])
        assert abs(float(np.mean(cos)) - centroid) > 1e-7
    assert pairwise_mean(np.eye(2), np.eye(2)) == pytest.approx(0.5)


def test_batched_embedding_equals_one_at_a_time(tmp_path, dino, clip):
    images = [Image.open(random_png(tmp_path / f"i{i}.png", seed=i, size=70 + 10 * i)) for i in range(4)]
    for scorer in (dino, clip):
        batched = scorer.embed(images)
        single = torch.cat([scorer.embed([im]) for im in images])
        assert torch.allclose(batched, single, atol=1e-5)
        assert torch.allclose(batched.norm(dim=1), torch.ones(4), atol=1e-5)


def _manual_dino_pixels(image: Image.Image) -> torch.Tensor:
    """The stated recipe by hand: PIL bicubic resize of the shorter side to 256, center crop 224, ImageNet norm."""
    w, h = image.size
    size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    resized = image.convert("RGB").resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - 224) / 2)), int(round((size[1] - 224) / 2))
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    normed = (crop - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(normed).permute(2, 0, 1)


@pytest.mark.parametrize("size", [(300, 400), (512, 384), (64, 64)])
def test_dino_preprocessing_matches_stated_recipe(tmp_path, dino, size):
    image = Image.open(random_png(tmp_path / "x.png", seed=3, size=8)).resize(size)
    manual = _manual_dino_pixels(image)
    assert manual.shape == (3, 224, 224)
    assert torch.allclose(dino.transform(image), manual, atol=1e-6)
    # the embedding is the CLS token of the final-layernormed last layer, no pooler head
    assert dino.model.pooler is None
    with torch.no_grad():
        out = dino.model(pixel_values=manual[None], output_hidden_states=True)
        by_hand = dino.model.layernorm(out.hidden_states[-1])[:, 0]  # last layer's output, final layernorm, CLS
    assert torch.allclose(out.last_hidden_state[:, 0], by_hand, atol=1e-5)
    expected = torch.nn.functional.normalize(by_hand, dim=-1)
    assert torch.allclose(dino.embed([image]), expected, atol=1e-5)


def test_clip_uses_open_clips_own_preprocess(tmp_path, clip):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    image = Image.open(random_png(tmp_path / "x.png", seed=4, size=8)).resize((333, 250))
    reference = image_transform_v2(PreprocessCfg(size=224), is_train=False)(image)
    assert torch.allclose(clip.preprocess(image), reference)
    assert "bicubic" in clip.info()["preprocess"] and "0.48145466" in clip.info()["preprocess"]


def test_clip_t_uses_projected_normalised_text_embedding(tmp_path, dino, clip):
    gen = [random_png(tmp_path / f"g{i}.png", seed=30 + i) for i in range(2)]
    real = [random_png(tmp_path / "r.png", seed=40)]
    prompt = "a photo of sksToy toy on a beach"
    result = score_samples(_samples(gen, prompt), real, token="sksToy", dino=dino, clip=clip, cache_dir=None)
    model = clip.model
    with torch.inference_mode():
        pixels = torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in gen])
        image = model.encode_image(pixels)
        image = image / image.norm(dim=-1, keepdim=True)

        @torch.inference_mode()
        def text_cos(text: str) -> float:
            tokens = open_clip.tokenize([text])  # the SimpleTokenizer, 77 positions
            features = model.encode_text(tokens)  # includes text_projection
            features = features / features.norm(dim=-1, keepdim=True)
            return float((image @ features.T).mean())

    entry = result["prompts"][0]
    assert entry["prompt_without_token"] == "a photo of toy on a beach"
    assert entry["lora"]["clip_t"] == pytest.approx(text_cos("a photo of toy on a beach"), abs=1e-5)
    assert entry["lora"]["clip_t_with_token"] == pytest.approx(text_cos(prompt), abs=1e-5)
    assert entry["lora"]["clip_t"] != pytest.approx(entry["lora"]["clip_t_with_token"], abs=1e-6)
    # the projection matters: the unprojected pooled text features have another width
    assert model.text_projection.shape[0] != model.text_projection.shape[1]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a photo of sksToy toy on a beach", "a photo of toy on a beach"),
        ("sksToy toy in the snow", "toy in the snow"),
        ("a red sksToy toy", "a red toy"),
        ("a  sksToy,  on   a beach ", "a, on a beach"),
        ("sksToy", ""),
        ("a sksToyish toy", "a sksToyish toy"),  # only the whole token
    ],
)
def test_remove_token(prompt, expected):
    assert remove_token(prompt, "sksToy") == expected


# ---- the run-level score: scores.json, cache, prompt sets --------------------------------------


def test_score_run_writes_scores_json(tmp_path):
    run = write_run(tmp_path)
    add_samples(run / "samples", ["sksToy on a beach", "a red sksToy toy"], per_variant=2)
    scores = score_run(load_run(run), **TINY)
    on_disk = json.loads((run / "scores.json").read_text())
    assert on_disk["overall"] == scores["overall"]
    assert [e["prompt"] for e in on_disk["prompts"]] == ["sksToy toy on a beach", "a red sksToy toy"]
    assert on_disk["prompts"][0]["prompt_as_written"] == "sksToy on a beach"
    assert on_disk["prompts"][0]["prompt_without_token"] == "toy on a beach"
    for entry in on_disk["prompts"]:
        for variant in ("lora", "baseline"):
            row = entry[variant]
            assert (row["images"], row["real_images"]) == (2, 2)
            assert all(-1 <= row[k] <= 1 for k in ("dino", "clip_i", "clip_t", "clip_t_with_token"))
    overall = on_disk["overall"]["lora"]
    assert (overall["images"], overall["prompts"]) == (4, 2)
    # equal image counts per prompt: the pooled figure is the mean of the per-prompt ones
    assert overall["dino"] == pytest.approx(np.mean([e["lora"]["dino"] for e in on_disk["prompts"]]))
    assert on_disk["scorers"]["dino"]["model"] == "tiny-dino"
    assert "resize the shorter side to 256" in on_disk["scorers"]["dino"]["preprocess"]
    assert "last_hidden_state[:, 0]" in on_disk["scorers"]["dino"]["embedding"]
    assert on_disk["scorers"]["clip"]["library"].startswith("open_clip ")
    assert "as is" in on_disk["scale"]
    assert on_disk["real"]["count"] == 2 and on_disk["real"]["files"] == ["img_008.png", "img_009.png"]
    assert not list(run.glob(".scores.json*"))  # atomic: no temp file left


def test_rescoring_is_incremental(tmp_path):
    run = write_run(tmp_path)
    add_samples(run / "samples", ["sksToy on a beach"], per_variant=2)
    first = score_run(load_run(run), **TINY)
    assert first["embedded"] == {"dino": 6, "clip": 6}  # 4 generated + 2 val photos
    second = score_run(load_run(run), **TINY)
    assert second["embedded"] == {"dino": 0, "clip": 0}
    assert second["overall"] == first["overall"]
    add_samples(run / "samples", ["a red sksToy toy"], per_variant=1, seed0=7)  # 2 more images
    third = score_run(load_run(run), **TINY)
    assert third["embedded"] == {"dino": 2, "clip": 2}
    assert third["overall"]["lora"]["images"] == 3
    caches = sorted(p.name for p in (run / ".cache" / "embeddings").iterdir())
    assert caches == ["clip--tiny-clip--None--random-seed-0.safetensors", "dino--tiny-dino--random-seed-0.safetensors"]


def test_cache_of_another_scorer_setup_is_not_used(tmp_path):
    cache = EmbeddingCache(tmp_path, "dino--x", {"preprocess": "A"})
    cache.put("abc", torch.ones(4))
    cache.save()
    assert "abc" in EmbeddingCache(tmp_path, "dino--x", {"preprocess": "A"})
    assert "abc" not in EmbeddingCache(tmp_path, "dino--x", {"preprocess": "B"})
    (tmp_path / "dino--x.safetensors").write_bytes(b"damaged")
    assert "abc" not in EmbeddingCache(tmp_path, "dino--x", {"preprocess": "A"})


def test_prompts_select_a_subset(tmp_path):
    run = write_run(tmp_path)
    add_samples(run / "samples", ["sksToy on a beach", "a red sksToy toy"], per_variant=1)
    scores = score_run(load_run(run), prompts=["a red sksToy toy"], **TINY)
    assert [e["prompt"] for e in scores["prompts"]] == ["a red sksToy toy"]


def test_dreambench_prompts_are_the_papers_25():
    assert len(OBJECT_PROMPTS) == 25 and len(set(OBJECT_PROMPTS)) == 25
    prompts = object_prompts("sksToy", "toy")
    assert prompts[0] == "a sksToy toy in the jungle"
    assert prompts[-1] == "a cube shaped sksToy toy"
    assert "a sksToy toy with the Eiffel Tower in the background" in prompts
    assert all("sksToy toy" in p for p in prompts)


def test_dreambench_scores_the_papers_prompts_and_names_the_missing_ones(tmp_path):
    """The scorer never samples: dreambench needs 4 LoRA + 4 baseline images of each of the 25 prompts,
    matched through the real prompt expansion; the error names the `sdlora sample` command to run."""
    run = write_run(tmp_path)
    prompts = object_prompts("sksToy", "toy")
    add_samples(run / "samples", prompts[:2], per_variant=4)  # two prompts already have their 4 + 4
    add_samples(run / "samples", prompts[2:3], per_variant=3)  # one short of the paper's 4
    add_samples(run / "samples", ["sksToy on a beach"], per_variant=1)  # not part of the benchmark
    plan = plan_scoring(load_run(run), ["dreambench"])
    assert (plan.prompt_set, plan.min_images, plan.wanted) == ("dreambench", 4, prompts)
    assert missing_prompts(load_run(run), plan) == prompts[2:]
    with pytest.raises(RunError) as info:
        score_run(load_run(run), prompts=["dreambench"], **TINY)
    message = str(info.value)
    assert "no samples for 23 prompt(s)" in message and "\n" not in message
    assert f"sdlora sample --run {run.resolve()} --num-images 4 'a sksToy toy on the beach'" in message
    add_samples(run / "samples", prompts[2:], per_variant=4)
    scores = score_run(load_run(run), prompts=["dreambench"], **TINY)
    assert [e["prompt"] for e in scores["prompts"]] == prompts
    assert scores["overall"]["lora"]["images"] == 100 and scores["overall"]["baseline"]["images"] == 100
    assert scores["prompt_set"] == "dreambench"


def test_prompts_as_typed_match_their_expanded_samples(tmp_path):
    """`--prompts 'sksToy on a beach'` finds the images `sdlora sample` made for 'sksToy toy on a beach'."""
    run = write_run(tmp_path)
    add_samples(run / "samples", ["sksToy on a beach"], per_variant=1)
    (run / "samples" / "samples.json").write_text(
        (run / "samples" / "samples.json")
        .read_text()
        .replace('"prompt_as_written": "sksToy on a beach"', '"prompt_as_written": null')
    )
    plan = plan_scoring(load_run(run), ["sksToy  on a beach"])
    assert missing_prompts(load_run(run), plan) == []


def test_run_without_samples_wants_its_validation_prompts(tmp_path):
    run = write_run(tmp_path, validation={"prompts": ["{token} {class} on a sofa"]})
    plan = plan_scoring(load_run(run))
    assert (plan.wanted, plan.prompt_set, plan.min_images) == (["sksToy toy on a sofa"], "validation prompts", 1)
    assert missing_prompts(load_run(run), plan) == ["sksToy toy on a sofa"]
    with pytest.raises(RunError, match="no samples for 1 prompt"):
        score_run(load_run(run), **TINY)


def test_dino_similarity_to_val(tmp_path):
    run = write_run(tmp_path)
    dataset = load_run(run).dataset
    val = val_photos(dataset)
    cache = tmp_path / "cache"
    same = dino_similarity_to_val(
        [Image.open(val[0]), val[1]], dataset, dino_model="tiny-dino", device="cpu", cache_dir=cache
    )
    dino = load_dino("tiny-dino", "cpu")
    expected = pairwise_mean(dino.embed([Image.open(p) for p in val]), dino.embed([Image.open(p) for p in val]))
    assert same == pytest.approx(expected, abs=1e-6)
    assert len(list(cache.iterdir())) == 1


# ---- bad input: one clear error each ----------------------------------------------------------


def test_missing_run(tmp_path):
    with pytest.raises(RunError, match="no such run folder"):
        load_run(tmp_path / "runs" / "latest")


def test_run_without_lora(tmp_path):
    run = write_run(tmp_path, lora=False)
    add_samples(run / "samples", ["sksToy on a beach"], per_variant=1)
    with pytest.raises(RunError, match="no LoRA in lora/"):
        score_run(load_run(run), **TINY)


def test_dataset_without_val_images(tmp_path):
    run = write_run(tmp_path, val=False)
    add_samples(run / "samples", ["sksToy on a beach"], per_variant=1)
    with pytest.raises(DataError, match="no val images"):
        score_run(load_run(run), **TINY)


@pytest.mark.parametrize("prompts", [[""], ["  "], ["sksToy on a beach", ""]])
def test_empty_prompts(tmp_path, prompts):
    run = write_run(tmp_path)
    with pytest.raises(ConfigError, match="--prompts: empty prompt"):
        score_run(load_run(run), prompts=prompts, **TINY)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dino_model": "facebook/dino-vits16"}, "scorer model facebook/dino-vits16: not in the local cache"),
        ({"dino_model": "facebook/dinov2-small"}, "scorer model facebook/dinov2-small: not in the local cache"),
        (
            {"clip_model": "ViT-B-32", "clip_pretrained": "openai"},
            "scorer model ViT-B-32 (openai): not in the local cache",
        ),
        ({"clip_model": "ViT-X-99"}, "--clip-model ViT-X-99: not an open_clip model"),
        (
            {"clip_model": "ViT-B-32", "clip_pretrained": "bogus"},
            "--clip-pretrained bogus: not a weights tag of ViT-B-32",
        ),
    ],
)
def test_unknown_scorer_model_offline(tmp_path, monkeypatch, kwargs, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = write_run(tmp_path)
    add_samples(run / "samples", ["sksToy on a beach"], per_variant=1)
    with pytest.raises(ModelError) as info:
        score_run(load_run(run), **{**TINY, **kwargs})
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (run / "scores.json").exists()


def test_missing_sample_file(tmp_path):
    run = write_run(tmp_path)
    entries = add_samples(run / "samples", ["sksToy on a beach"], per_variant=1)
    (run / "samples" / entries[0]["file"]).unlink()
    with pytest.raises(RunError, match="listed in .*samples.json but missing"):
        score_run(load_run(run), **TINY)


# ---- loading real-format models from local folders (the hub code path, offline) ---------------


def test_dino_from_a_local_vit_folder_matches_tiny(tmp_path, dino):
    from sdlora.evaluate.tiny import tiny_dino

    folder = tmp_path / "my-dino"
    tiny_dino().save_pretrained(folder)
    scorer = load_dino(str(folder), "cpu")
    assert scorer.model.pooler is None and scorer.revision.startswith("local-")
    image = Image.open(random_png(tmp_path / "x.png", seed=5))
    assert torch.allclose(scorer.embed([image]), dino.embed([image]), atol=1e-6)


def test_dinov2_folder_uses_its_cls_token(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path / "my-dinov2"
    torch.manual_seed(0)
    model = Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=224,
            patch_size=14,
        )
    ).eval()
    model.save_pretrained(folder)
    scorer = load_dino(str(folder), "cpu")
    image = Image.open(random_png(tmp_path / "x.png", seed=6))
    with torch.no_grad():
        cls = model(pixel_values=_manual_dino_pixels(image)[None]).last_hidden_state[:, 0]
    assert torch.allclose(scorer.embed([image]), torch.nn.functional.normalize(cls, dim=-1), atol=1e-5)


def test_dino_model_of_another_kind_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match="a 'bert' model; use a ViT or DINOv2 model"):
        load_dino(str(tmp_path / "bert"), "cpu")


def test_clip_from_a_local_open_clip_folder_matches_tiny(tmp_path, clip):
    from safetensors.torch import save_file

    from sdlora.evaluate.tiny import TINY_CLIP_CONFIG

    folder = tmp_path / "my-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}))
    save_file(
        {k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(folder / "open_clip_model.safetensors")
    )
    scorer = load_clip(f"local-dir:{folder}", None, "cpu")
    image = Image.open(random_png(tmp_path / "x.png", seed=7))
    assert torch.allclose(scorer.embed([image]), clip.embed([image]), atol=1e-5)
    assert torch.allclose(scorer.embed_text(["a toy"]), clip.embed_text(["a toy"]), atol=1e-5)
    assert scorer.revision.startswith("local-")


@pytest.mark.parametrize(("tag", "quick_gelu"), [("openai", True), ("laion2b_s34b_b79k", False)])
def test_openai_clip_weights_get_quickgelu(monkeypatch, clip, tag, quick_gelu):
    # OpenAI's CLIP was trained with QuickGELU; open_clip's ViT-B-32 config uses GELU and only warns.
    seen = {}

    def fake_create(name, pretrained=None, **kwargs):
        seen.update(name=name, pretrained=pretrained, **kwargs)
        return clip.model, None, clip.preprocess

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    from sdlora.evaluate import clip as clip_module

    scorer = clip_module._load.__wrapped__("ViT-B-32", tag, "cpu")  # past the lru cache: nothing kept
    assert (seen["name"], seen["pretrained"], seen["force_quick_gelu"]) == ("ViT-B-32", tag, quick_gelu)
    assert scorer.info()["quick_gelu"] is quick_gelu


def test_explicit_samples_file_that_is_missing(tmp_path):
    run = write_run(tmp_path)
    with pytest.raises(RunError, match="other.json: missing"):
        score_run(load_run(run), samples_json=run / "other.json", **TINY)
