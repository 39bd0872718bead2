"""`sdlora demo`: the README's first command runs every stage offline and leaves a report."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.demo import DEMO_PHOTOS

LEARNED = 0.15  # world-DINO: the LoRA's images to the val photos, minus the base model's


def test_demo_runs_every_stage_offline_and_the_lora_learns_the_object(tmp_path):
    """In the world (the default): photos of a novel object, world-sd, the world's scorers, the preset's
    steps. The base model has never seen the object; the LoRA must draw it: its world-DINO similarity
    to the val photos is far above the base model's. A defect that stops learning (a LoRA not
    applied or scaled wrong at sampling, a loss that trains nothing, the token's embedding lost)
    brings the two together and fails here."""
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = (out / "runs" / "latest").resolve()
    # every stage left its contract file behind
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    assert len(manifest["train"]) + len(manifest["val"]) == DEMO_PHOTOS and manifest["val"]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    samples = json.loads((run / "samples" / "samples.json").read_text())
    assert {img["variant"] for img in samples["images"]} == {"lora", "baseline"}
    scores = json.loads((run / "scores.json").read_text())
    lora, baseline = scores["overall"]["lora"], scores["overall"]["baseline"]
    # 0.19 against -0.19 on 2026-12-06 (world-DINO cosines); a margin that float noise cannot close
    assert lora["dino"] - baseline["dino"] > LEARNED, (lora, baseline)
    assert scores["scorers"]["dino"]["model"] == "world-dino" and scores["scorers"]["clip"]["model"] == "world-clip"
    assert (run / "report.html").is_file()
    assert str(run / "report.html") in result.stdout.replace("\n", "")
    assert (out / "demo.png").is_file() and str(out / "demo.png") in result.stdout.replace("\n", "")
    assert "images are noise" not in result.stderr


def test_demo_on_a_tiny_model_says_its_images_are_noise(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--steps", "2", "--model", "tiny-sd"])
    assert result.exit_code == 0, result.output
    assert "images are noise" in result.stderr


def test_demo_refuses_a_real_model_with_one_line(tmp_path):
    result = CliRunner().invoke(
        app, ["demo", "--out", str(tmp_path), "--model", "stable-diffusion-v1-5/stable-diffusion-v1-5"]
    )
    assert result.exit_code != 0
    assert "tiny-sd" in result.output
