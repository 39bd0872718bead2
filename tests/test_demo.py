"""`sdlora demo`: the README's first command runs every stage offline and leaves a report."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.demo import DEMO_PHOTOS


def test_demo_runs_every_stage_offline(tmp_path):
    """In the world (the default): photos of the demo object, world-sd, the world's scorers."""
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--steps", "4"])
    assert result.exit_code == 0, result.output
    run = (out / "runs" / "latest").resolve()
    # every stage left its contract file behind
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    assert len(manifest["train"]) + len(manifest["val"]) == DEMO_PHOTOS and manifest["val"]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    samples = json.loads((run / "samples" / "samples.json").read_text())
    assert {img["variant"] for img in samples["images"]} == {"lora", "baseline"}
    scores = json.loads((run / "scores.json").read_text())
    for variant in ("lora", "baseline"):
        assert 0.0 <= scores["overall"][variant]["dino"] <= 1.0
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
