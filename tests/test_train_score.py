"""`sdlora train --score-every N --best-by dino`: DINO of the validation samples during training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.errors import ConfigError, DataError, ModelError
from sdlora.evaluate import dino as dino_mod
from sdlora.run import read_metrics
from sdlora.train import loop, resolve
from test_train import Events, tiny_cfg

SCORED = {
    "validation.validate_every": 2,
    "validation.score_every": 2,
    "validation.dino_model": "tiny-dino",
    "validation.prompts": ["a photo of {token} {class}"],
    "validation.num_images": 2,
    "train.max_steps": 6,
    "run.name": "scored",
}


def _best_step(run: Path) -> int:
    with safe_open(str(run / "best" / "pytorch_lora_weights.safetensors"), "pt") as f:
        return int(f.metadata()["sdlora.steps"])


def test_dino_is_logged_and_picks_best(tmp_path, tiny_dataset):
    events = Events()
    cfg = tiny_cfg(tmp_path, tiny_dataset, {**SCORED, "validation.best_by": "dino", "train.learning_rate": 5e-3})
    dino_mod._load.cache_clear()
    result = loop.run_training(cfg, on_event=events)
    assert dino_mod._load.cache_info().misses == 1  # the scorer is loaded once per run, not per validation
    run = tmp_path / "runs" / "scored"
    dino = {r["step"]: r["dino"] for r in read_metrics(run / "metrics.jsonl") if "dino" in r}
    assert sorted(dino) == [2, 4, 6]
    assert all(-1.0 <= v <= 1.0 for v in dino.values())
    assert [e["dino"] for e in events.of("validation")] == [dino[2], dino[4], dino[6]]
    best = max(dino, key=lambda step: (dino[step], -step))  # the first step reaching the highest DINO
    assert _best_step(run) == best
    highest = [dino[s] > max([dino[t] for t in dino if t < s], default=-2.0) for s in (2, 4, 6)]
    assert [e["best"] for e in events.of("validation")] == highest  # best/ rewritten on each new high
    val = {r["step"]: r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r}
    assert best != min(val, key=val.get)  # this run tells the two criteria apart
    assert result.best_dino == dino[best]
    # DINO scored the samples each validation drew: no second set of images
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert all(len(list(p.glob("*.png"))) == 2 for p in (run / "samples").iterdir())
    assert not (run / "report.html").exists()  # the loop trains; the CLI layer refreshes the report
    from sdlora.report import write_report

    assert "DINO of the validation samples" in write_report(run).read_text(encoding="utf-8")


def test_best_by_val_loss_stays_the_default(tmp_path, tiny_dataset):
    cfg = tiny_cfg(tmp_path, tiny_dataset, {**SCORED, "validation.score_every": 4})
    loop.run_training(cfg)
    run = tmp_path / "runs" / "scored"
    dino = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "dino" in r]
    assert dino == [4, 6]  # every 4th step and the last, not at the validation of step 2
    val = {r["step"]: r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r}
    assert _best_step(run) == min(val, key=lambda step: (val[step], step))


def test_best_by_dino_without_score_every_is_one_config_error(tmp_path, tiny_dataset):
    with pytest.raises(ConfigError, match="--best-by dino needs --score-every"):
        tiny_cfg(tmp_path, tiny_dataset, {"validation.best_by": "dino"})
    result = CliRunner().invoke(
        app, ["train", "--model", "tiny-sd", "--dataset", str(tiny_dataset), "--best-by", "dino"]
    )
    assert result.exit_code == 1
    assert "--best-by dino needs --score-every" in result.stderr


def test_score_every_must_match_validation_steps(tmp_path, tiny_dataset):
    with pytest.raises(ConfigError, match="--score-every 3 must be a multiple of --validate-every 2"):
        tiny_cfg(tmp_path, tiny_dataset, {**SCORED, "validation.score_every": 3})
    with pytest.raises(ConfigError, match="--score-every scores the validation samples"):
        tiny_cfg(tmp_path, tiny_dataset, {**SCORED, "validation.prompts": []})


def test_unknown_dino_model_fails_before_training(tmp_path, tiny_dataset):
    cfg = tiny_cfg(tmp_path, tiny_dataset, {**SCORED, "validation.dino_model": "nobody/no-such-dino"})
    with pytest.raises(ModelError, match="nobody/no-such-dino"):
        loop.run_training(cfg)
    assert not (tmp_path / "runs" / "scored").exists()


def test_resume_keeps_the_best_dino(tmp_path, tiny_dataset):
    flags = {
        **SCORED,
        "validation.best_by": "dino",
        "train.learning_rate": 5e-3,
        "train.max_steps": 4,
        "checkpoint.checkpoint_every": 2,
    }
    first = loop.run_training(tiny_cfg(tmp_path, tiny_dataset, flags))
    run_dir, cfg, _ = resolve.resume_run(first.run_dir, [{"train": {"max_steps": 6}}], ("command line",))
    events = Events()
    second = loop.run_training(cfg, resume=run_dir, on_event=events)
    dino = {r["step"]: r["dino"] for r in read_metrics(run_dir / "metrics.jsonl") if "dino" in r}
    assert sorted(dino) == [2, 4, 6]
    best = max(dino, key=lambda step: (dino[step], -step))
    # the checkpoint carries the best DINO so far: a lower one after the resume does not replace best/
    assert best != 6 and _best_step(run_dir) == best and second.best_dino == dino[best]
    assert [e["best"] for e in events.of("validation")] == [False]


def test_score_every_without_val_photos_fails_before_training(tmp_path, tiny_dataset):
    manifest_path = tiny_dataset / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["train"] += manifest["val"]
    manifest["val"] = []
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(DataError, match="--score-every compares samples with the val photos"):
        loop.run_training(tiny_cfg(tmp_path, tiny_dataset, SCORED))
    assert not (tmp_path / "runs" / "scored").exists()
