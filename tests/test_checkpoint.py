"""Checkpoints and resume: no pickle is ever loaded, a damaged or unfinished checkpoint is skipped with a
reason, a run without one starts again from step 0, `runs/latest` only moves onto a run with something
in it. One tiny-sd run (2 steps, a checkpoint at each) serves as the starting point of every test."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, write_tiny_dataset
from sdlora.cli import app
from sdlora.config import load_config
from sdlora.errors import RunError
from sdlora.run import read_metrics
from sdlora.train import loop, resolve

runner = CliRunner()


def flags(runs: Path, dataset: Path, **more) -> dict:
    return {
        "model.name": "tiny-sd",
        "data.dataset": str(dataset),
        "run.runs_dir": str(runs),
        "train.max_steps": 2,
        "train.learning_rate": 1e-3,
        "lora.rank": 4,
        "lora.dropout": 0.1,  # the RNG state matters on resume
        "validation.validate_every": 0,
        "validation.prompts": [],
        "checkpoint.checkpoint_every": 1,
        "checkpoint.keep_checkpoints": 2,
        **more,
    }


class Events(list):
    def __call__(self, event: dict) -> None:
        self.append(event)

    def warnings(self) -> list[str]:
        return [e["message"] for e in self if e["event"] == "warning"]

    def resumed(self) -> int | None:
        return next((e["step"] for e in self if e["event"] == "resumed"), None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, run folder) of a finished 2-step run with checkpoints at steps 1 and 2."""
    root = tmp_path_factory.mktemp("ckpt")
    dataset = write_tiny_dataset(root / "dataset")
    result = loop.run_training(load_config(None, flags(root / "runs", dataset, **{"run.name": "base"})))
    return dataset, result.run_dir


def copy_run(trained: tuple[Path, Path], tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "r"
    shutil.copytree(trained[1], run)
    return run


def resume(run: Path, steps: int = 3):
    events = Events()
    run_dir, cfg, _ = resolve.resume_run(run, [{"train": {"max_steps": steps}}], ("command line",))
    result = loop.run_training(cfg, resume=run_dir, on_event=events)
    return result, events


def test_a_checkpoint_holds_only_safetensors_json_and_yaml(trained):
    run = trained[1]
    folders = sorted((run / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["step-000001", "step-000002"]  # no temp folder left
    names = {p.name for p in folders[-1].iterdir()}
    assert {"sdlora.json", "lora_weights_0.safetensors", "optimizer.safetensors", "scheduler.json"} <= names
    assert all(n.endswith((".safetensors", ".json", ".yaml")) for n in names), names
    manifest = json.loads((folders[-1] / "sdlora.json").read_text())["files"]
    assert set(manifest) == names - {"sdlora.json"}
    assert not (run / ".sdlora.lock").exists()  # the run folder's lock is released at the end


class _Plant:
    """Unpickling this writes the marker file: what a hostile checkpoint could run instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_are_never_loaded(trained, tmp_path: Path):
    run = copy_run(trained, tmp_path)
    marker = tmp_path / "pwned"
    newest = run / "checkpoints" / "step-000002"
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl", "scheduler.bin"):
        torch.save({"state": _Plant(marker)}, newest / name)
    # A newer checkpoint in accelerate's old format (pickles and an sdlora.json without a manifest).
    old = run / "checkpoints" / "step-000003"
    old.mkdir()
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"):
        torch.save({"state": _Plant(marker)}, old / name)
    (old / "sdlora.json").write_text(json.dumps({"step": 3, "best_val_loss": None}))

    result, events = resume(run, steps=3)
    assert not marker.exists()
    assert events.resumed() == 2 and result.steps == 3
    warnings = events.warnings()
    assert any("step-000003: skipped, written by an older sdlora" in w for w in warnings), warnings
    assert any("ignoring files sdlora did not write there: custom_checkpoint_0.pkl" in w for w in warnings)


def test_a_damaged_newest_checkpoint_is_skipped_and_temp_folders_removed(trained, tmp_path: Path):
    run = copy_run(trained, tmp_path)
    lora = run / "checkpoints" / "step-000002" / "lora_weights_0.safetensors"
    lora.write_bytes(lora.read_bytes()[:100])  # cut short
    leftover = run / "checkpoints" / ".step-000003.tmp"
    leftover.mkdir()
    (leftover / "lora_weights_0.safetensors").write_bytes(b"half")
    stray = run / "checkpoints" / "step-000009"  # a folder without its sdlora.json (copied by hand, say)
    shutil.copytree(run / "checkpoints" / "step-000001", stray)
    (stray / "sdlora.json").unlink()

    result, events = resume(run, steps=3)
    assert events.resumed() == 1 and result.steps == 3
    skipped = [w for w in events.warnings() if "skipped" in w]
    assert len(skipped) == 2, skipped
    assert "step-000009: skipped, incomplete (no sdlora.json)" in skipped[0]
    assert "step-000002: skipped, lora_weights_0.safetensors is 100 bytes" in skipped[1]
    assert not leftover.exists()
    # The stale one does not outlive the good ones (--keep-checkpoints 2 counts back from the newest step).
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3]

    # A same-size change is caught by the checksum.
    opt = run / "checkpoints" / "step-000003" / "optimizer.json"
    opt.write_text(opt.read_text().replace("0", "1", 1))
    from sdlora.train.checkpoint import problem

    assert problem(opt.parent) == "optimizer.json is damaged (its checksum differs)"


def test_a_run_without_a_complete_checkpoint_starts_again_from_step_0(trained, tmp_path: Path):
    # What a kill during the first checkpoint write leaves: only a temp folder.
    run = copy_run(trained, tmp_path)
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "lora")
    (run / "checkpoints" / ".step-000001.tmp").mkdir(parents=True)
    (run / "checkpoints" / ".step-000001.tmp" / "lora_weights_0.safetensors").write_bytes(b"x")
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "no checkpoint to resume from" in result.stderr and "from step 0" in result.stderr
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


@pytest.mark.parametrize("text", ["model: [unclosed\n", "- just\n- a list\n", "train: {max_steps: lots}\n"])
def test_a_damaged_config_yaml_on_resume_is_one_line(trained, tmp_path: Path, text: str):
    run = copy_run(trained, tmp_path)
    (run / "config.yaml").write_text(text)
    one_line_error(runner.invoke(app, ["train", "--resume", str(run)]), str(run / "config.yaml"))


def test_latest_moves_only_onto_a_run_with_a_checkpoint_or_a_lora(trained, tmp_path: Path, monkeypatch):
    dataset = trained[0]
    runs = tmp_path / "runs"
    good = loop.run_training(load_config(None, flags(runs, dataset, **{"checkpoint.checkpoint_every": 0})))
    assert (runs / "latest").resolve() == good.run_dir

    real = loop.compute_loss

    def poisoned(state, batch):
        loss, parts = real(state, batch)
        return loss * float("nan"), parts

    monkeypatch.setattr(loop, "compute_loss", poisoned)
    with pytest.raises(RunError, match="the loss is nan"):
        loop.run_training(load_config(None, flags(runs, dataset, **{"run.name": "diverged"})))
    assert (runs / "diverged").is_dir() and (runs / "latest").resolve() == good.run_dir
    run_dir, _, warnings = resolve.resume_run("latest", [{}], ("command line",), runs_dir=runs)
    assert run_dir == good.run_dir  # and it says which newer run `latest` skipped, and how to continue that one
    assert f"the newer run {runs / 'diverged'} has no checkpoint or LoRA yet" in warnings[0], warnings
    assert not (runs / "diverged" / ".sdlora.lock").exists()  # released on the error too


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_in_one_line(tmp_path: Path, value: str):
    one_line_error(
        runner.invoke(app, ["train", "--model", "tiny-sd", "--learning-rate", value, "--print-config"]),
        "--learning-rate",
        "finite",
    )
    one_line_error(
        runner.invoke(app, ["train", "--model", "tiny-sd", f"train.adam_epsilon={value}", "--print-config"]),
        "--adam-epsilon",
        "finite",
    )


def test_state_files_round_trip_optimizer_scaler_and_rng_states_exactly(tmp_path: Path):
    from sdlora.train.checkpoint import rng_state, set_rng_state
    from sdlora.train.statefile import load_state, save_state

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW([{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 2e-4}], betas=(0.9, 0.99))
    sum(p.sum() for p in params).backward()
    opt.step()
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3, "nested": {"__tensor__": "not a marker"}}
    state = {"optimizer": opt.state_dict(), "scaler": scaler, "rng": rng_state()}
    files = save_state(tmp_path, "s", state)
    assert files == ["s.safetensors", "s.json"] and not list(tmp_path.glob("*.pkl"))
    back = load_state(tmp_path, "s")
    assert back["scaler"] == scaler and back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    for key, value in opt.state_dict()["state"].items():  # int keys survive, tensors bit-exact with their dtype
        for name, tensor in value.items():
            assert (
                torch.equal(back["optimizer"]["state"][key][name], tensor)
                and back["optimizer"]["state"][key][name].dtype == tensor.dtype
            )
    set_rng_state(back["rng"])
    first = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(back["rng"])
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (
        first[0].tolist(),
        first[1],
        first[2],
    )
    (tmp_path / "s.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(RunError, match=r"s\.safetensors: damaged or incomplete"):
        load_state(tmp_path, "s")


def test_resume_removes_temp_files_that_killed_writes_left(trained, tmp_path: Path):
    run = copy_run(trained, tmp_path)
    stale = [run / ".metrics.jsonl.k3j2.tmp", run / "checkpoints" / "step-000002" / ".optimizer.json.x1y2.tmp"]
    for path in stale:
        path.write_text("half a file")
    sample_tmp = run / "samples" / ".grid.png.a1b2.tmp"  # `sdlora sample` may be writing it now: kept
    sample_tmp.parent.mkdir(exist_ok=True)
    sample_tmp.write_text("being written")
    resume(run, steps=2)
    assert not any(path.exists() for path in stale)
    assert sample_tmp.exists()


@pytest.mark.parametrize("bad", [b"\xff\xfe\x00garbage \x80\x81\n", b'{"step": "x"}\n'], ids=["binary", "step-x"])
def test_resume_keeps_the_good_metrics_lines_and_drops_bad_ones(trained, tmp_path: Path, bad: bytes):
    run = copy_run(trained, tmp_path)
    path = run / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + bad + b"".join(lines[1:]) + bad)  # line 2 and the last line are bad
    result = runner.invoke(app, ["train", "--resume", str(run), "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    assert f"{path}: skipped 2 unreadable lines" in result.stderr and "first: line 2" in result.stderr
    assert [r["step"] for r in read_metrics(path) if "loss" in r] == [1, 2, 3]
    assert bad not in path.read_bytes()
    report = runner.invoke(app, ["report", "--run", str(run)])
    assert report.exit_code == 0, report.output
