"""The model card (sdlora.publish.card): front matter read back by huggingface_hub's own parsers, the body's
sections, and the card that every report refresh writes into the run folder.

`ModelCard.validate` posts the card to the Hub's /api/validate-yaml, so it needs the network: these tests
check what huggingface_hub parses offline (`ModelCard.load`, `metadata_load`) instead. test_push.py
sends the card through create_commit, which calls validate-yaml on a loopback stand-in.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard, metadata_load
from typer.testing import CliRunner

from publish_helpers import PROMPTS, add_samples, add_scores, fake_run
from sdlora.cli import app
from sdlora.publish.card import build_card, write_run_card


def test_the_run_folder_card_parses_with_huggingface_hub(tmp_path: Path):
    run = fake_run(tmp_path, samples=True, scores=True)
    path = write_run_card(run)
    assert path == run / "README.md"
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert metadata_load(path) == data
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"lora", "text-to-image", "diffusers", "stable-diffusion"} <= set(data["tags"])
    assert data["instance_prompt"] == "sksToy"
    assert "base_model" not in data and data["license"] == "other"  # tiny-sd is no hub model
    # the widget: each prompt's first LoRA image, paths relative to the card, files that exist
    assert [w["text"] for w in data["widget"]] == PROMPTS
    assert [w["output"]["url"] for w in data["widget"]] == [f"samples/p{i}/lora-00.png" for i in range(3)]
    assert all((run / w["output"]["url"]).is_file() for w in data["widget"])
    # honest about the base model, and the baseline beside each LoRA image
    assert "tiny random-weight model" in card.text and "Not a usable LoRA" in card.text
    assert "![base model, seed 7](samples/p0/base-00.png)" in card.text
    # loads from the run folder
    assert 'pipe.load_lora_weights("runs/r1/lora")' in card.text
    assert 'load_textual_inversion("runs/r1/lora/embeddings.safetensors", token="sksToy")' in card.text


@pytest.mark.parametrize(
    ("model", "arch", "license_", "family"),
    [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd1", "creativeml-openrail-m", "stable-diffusion"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "openrail++", "stable-diffusion-xl"),
        ("someone/a-finetune", "sd1", "other", "stable-diffusion"),  # license unknown: not cached, not a preset
    ],
)
def test_the_hub_card_names_the_base_model_its_license_and_loads_from_the_repo(
    tmp_path: Path, model: str, arch: str, license_: str, family: str
):
    run = fake_run(tmp_path, model=model, arch=arch)
    card = build_card(run, repo_id="me/toy-lora")
    data = card.data.to_dict()
    assert data["base_model"] == model and data["license"] == license_ and family in data["tags"]
    assert "Not a usable LoRA" not in card.text and "widget" not in data  # no samples yet
    assert 'pipe.load_lora_weights("me/toy-lora", weight_name="pytorch_lora_weights.safetensors")' in card.text
    assert f'from_pretrained("{model}"' in card.text
    if arch == "sdxl":  # one vector per text encoder, as sdlora.generate.load_embeddings loads them
        assert 'hf_hub_download("me/toy-lora", "embeddings.safetensors")' in card.text
        assert 'state["clip_g"], token="sksToy", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2' in (
            card.text
        )
    else:
        assert 'load_textual_inversion("me/toy-lora", weight_name="embeddings.safetensors", token="sksToy")' in (
            card.text
        )
    assert "copy `r1.safetensors` to `ComfyUI/models/loras/`" in card.text
    assert "`embeddings.safetensors` to `ComfyUI/models/embeddings/sksToy.safetensors`" in card.text
    assert str(tmp_path) not in card.text  # no local paths go to the Hub


def test_a_cached_base_models_own_license_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--a-finetune" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    run = fake_run(tmp_path, model="someone/a-finetune")
    assert build_card(run).data.to_dict()["license"] == "apache-2.0"


def test_a_local_base_model_folder_is_named_not_pathed(tmp_path: Path):
    base = tmp_path / "private" / "my-model"
    base.mkdir(parents=True)
    (base / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": []}')
    run = fake_run(tmp_path, model=str(base), arch="sdxl")
    card = build_card(run, repo_id="me/x")
    assert "base_model" not in card.data.to_dict() and "`my-model`" in card.text
    assert str(base) not in card.text and "stable-diffusion-xl" in card.data.to_dict()["tags"]


def test_the_scores_table_against_the_base_model_and_the_ceiling_when_there_is_one(tmp_path: Path):
    run = fake_run(tmp_path, scores=True)
    text = build_card(run).text
    assert "| DINO | 0.612 | 0.346 | +0.267 |" in text and "| CLIP-T | 0.281 | 0.291 | -0.010 |" in text
    assert "ceiling" not in text  # today's scores.json has none
    add_scores(run, ceiling={"dino": 0.81, "clip_i": 0.9})
    text = build_card(run).text
    assert "real photos (ceiling) |" in text and "| DINO | 0.612 | 0.346 | +0.267 | 0.810 |" in text
    assert "| CLIP-T | 0.281 | 0.291 | -0.010 | \u2013 |" in text


def test_the_training_settings_that_matter(tmp_path: Path):
    run = fake_run(tmp_path, data={"dataset": "d", "resolution": 512, "token": "sksToy", "class_word": "toy",
                                   "masked_loss": True, "unmasked_weight": 0.1})  # fmt: skip
    text = build_card(run).text
    for row in (
        "| steps | 40 (of 50 planned) |",
        "| rank | 4 |",
        "| alpha | 8.0 |",
        "| learning rate | 0.0001 |",
        "| optimizer | adamw |",
        "| resolution | 512 |",
        "| masked loss | yes (background weight 0.1) |",
        "| preservation | DOP, differential output preservation (weight 1.0) |",
    ):
        assert row in text, row
    assert "| pivotal tuning (token embedding) | yes: the token's own embedding, from \u201ctoy\u201d" in text
    prior = {
        "preservation": "none",
        "class_prompt": "a photo of a toy",
        "num_class_images": 50,
        "prior_loss_weight": 1.0,
    }
    text = build_card(fake_run(tmp_path, name="r2", embedding=False, prior=prior)).text
    assert "| preservation | prior preservation: 50 class images of \u201ca photo of a toy\u201d (weight 1.0) |" in text
    assert "| pivotal tuning (token embedding) | no (the token is used as the tokenizer splits it) |" in text
    assert "load_textual_inversion" not in text and "- Write `sksToy` in the prompt." in text


def test_a_lycoris_run_says_diffusers_cannot_load_it(tmp_path: Path):
    lora = {"rank": 4, "alpha": 4, "lora_type": "lokr"}
    text = build_card(fake_run(tmp_path, lora=lora)).text
    assert "LyCORIS adapter (LoKr/LoHa): diffusers' `load_lora_weights` cannot read it" in text
    assert "load_lora_weights(" not in text and "| adapter | LOKR |" in text


def test_samples_from_another_lora_folder_are_noted(tmp_path: Path):
    run = fake_run(tmp_path, samples=True)
    data = __import__("json").loads((run / "samples" / "samples.json").read_text())
    data["lora_dir"] = str(run / "best")
    (run / "samples" / "samples.json").write_text(__import__("json").dumps(data))
    assert "these samples were made with `best/`, not the `lora/` LoRA shared here" in build_card(run).text


def test_every_report_refresh_writes_the_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run = fake_run(tmp_path)
    bare = fake_run(tmp_path, name="bare")
    for path in (bare / "lora").iterdir():
        path.unlink()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "--run", "runs/r1"])
    assert result.exit_code == 0, result.output
    assert "No samples yet" in ModelCard.load(run / "README.md").text
    add_samples(run)
    assert CliRunner().invoke(app, ["report", "--run", "runs/r1"]).exit_code == 0
    assert len(ModelCard.load(run / "README.md").data.to_dict()["widget"]) == 3  # refreshed
    result = CliRunner().invoke(app, ["report", "--run", "runs/bare"])  # no LoRA yet: no card, no warning
    assert result.exit_code == 0 and not (bare / "README.md").exists() and "warning" not in result.output
    # a card that cannot be made is a warning, never a failed verb
    (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"garbage")
    result = CliRunner().invoke(app, ["report", "--run", "runs/r1"])
    assert "warning: README.md (model card) not written:" in result.output and "damaged" in result.output


def _code(card_text: str) -> str:
    """The card's diffusers code block, without the last line (generating an image is not the point)."""
    block = card_text.split("```python\n", 1)[1].split("```", 1)[0]
    return "\n".join(line for line in block.splitlines() if not line.startswith("image = "))


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_the_cards_code_loads_the_lora_and_the_embedding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str):
    """The code the card shows runs: from the run folder, and (SD 1.x) from the staged repo layout."""
    from run_helpers import make_run, save_embedding
    from sdlora.publish.push import stage_hub_folder
    from sdlora.run import load_run

    run = make_run(tmp_path, model=model)
    save_embedding(run / "lora", model)
    monkeypatch.chdir(tmp_path)
    where = {}
    exec(_code(build_card(run).text), where)  # noqa: S102 (our own card's code)
    pipe = where["pipe"]
    assert "default_0" in pipe.get_list_adapters()["unet"]
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if model == "tiny-sdxl" else [])
    assert all("sksToy" in t.get_vocab() for t in tokenizers)
    if model == "tiny-sd":  # the repo's code, the repo id standing for the staged folder (same layout)
        staged = stage_hub_folder(load_run(run), "me/toy")
        where = {}
        exec(_code(build_card(run, "me/toy").text).replace('"me/toy"', f'"{staged.folder}"'), where)  # noqa: S102
        assert "sksToy" in where["pipe"].tokenizer.get_vocab() and where["pipe"].get_list_adapters()["unet"]
