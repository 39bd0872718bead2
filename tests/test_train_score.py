"""`sdlora train --score-every N --best-by dino`: DINO of the validation samples during training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.errors import ConfigError, ModelError
from sdlora.train import loop
from sdlora.train.monitor import read_metrics
from test_train import Events, tiny_cfg

SCORED = {"validation.validate_every": 2, "validation.score_every": 2, "validation.dino_model": "tiny-dino",
          "validation.prompts": ["a photo of {token} {class}"], "validation.num_images": 2,
          "train.max_steps": 6, "run.name": "scored"}


def _best_step(run: Path) -> int:
    with safe_open(str(run / "best" / "pytorch_lora_weights.safetensors"), "pt") as f:
        return int(f.metadata()["sdlora.steps"])


def test_dino_is_logged_and_picks_best(tmp_path, tiny_dataset):
    events = Events()
    cfg = tiny_cfg(tmp_path, tiny_dataset, {**SCORED, "validation.best_by": "dino", "train.learning_rate": 5e-3})
    loop.run_training(cfg, on_event=events)
    run = tmp_path / "runs" / "scored"
    dino = {r["step"]: r["dino"] for r in read_metrics(run / "metrics.jsonl") if "dino" in r}
    assert sorted(dino) == [2, 4, 6]
    assert all(-1.0 <= v <= 1.0 for v in dino.values())
    assert [e["dino"] for e in events.of("validation")] == [dino[2], dino[4], dino[6]]
    best = max(dino, key=lambda step: (dino[step], -step))  # the first step reaching the highest DINO
    assert _best_step(run) == best
    assert "DINO of the validation samples" in (run / "report.html").read_text(encoding="utf-8")


def test_best_by_val_loss_stays_the_default(tmp_path, tiny_dataset):
    cfg = tiny_cfg(tmp_path, tiny_dataset, SCORED)
    loop.run_training(cfg)
    run = tmp_path / "runs" / "scored"
    val = {r["step"]: r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r}
    assert _best_step(run) == min(val, key=lambda step: (val[step], step))


def test_best_by_dino_without_score_every_is_one_config_error(tmp_path, tiny_dataset):
    with pytest.raises(ConfigError, match="--best-by dino needs --score-every"):
        tiny_cfg(tmp_path, tiny_dataset, {"validation.best_by": "dino"})
    result = CliRunner().invoke(app, ["train", "--model", "tiny-sd", "--dataset", str(tiny_dataset), "--best-by", "dino"])
    assert result.exit_code == 1
    assert "--best-by dino needs --score-every" in result.stderr


def test_unknown_dino_model_fails_before_training(tmp_path, tiny_dataset):
    cfg = tiny_cfg(tmp_path, tiny_dataset, {**SCORED, "validation.dino_model": "nobody/no-such-dino"})
    with pytest.raises(ModelError, match="nobody/no-such-dino"):
        loop.run_training(cfg)
    assert not (tmp_path / "runs" / "scored").exists()
