"""`sdlora tune` end to end on tiny models: trials are run folders, tune.json, the winner, best/, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, write_tiny_dataset
from sdlora.cli import app
from sdlora.run import load_run, read_metrics, read_scores

SCORING = ["--prompt", "a photo of {token} {class}", "--seeds", "2", "--sample-steps", "2"]
TINY = ["--model", "tiny-sd", "--dino-model", "tiny-dino", "--clip-model", "tiny-clip", "validation.prompts=[]"]


def tune_args(dataset: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return ["tune", *TINY, *SCORING, "--dataset", str(dataset), "--runs-dir", str(runs), "--name", name, *extra]


def by_hand(tune_dir: Path, data: dict) -> tuple[str, int]:
    """The winner from the step folders' scores.json files: highest DINO with CLIP-T >= base - 0.02."""
    base = data["base"]["clip_t"]
    best = None
    for trial in data["trials"]:
        for point in trial["points"]:
            overall = read_scores(tune_dir / point["folder"] / "scores.json")["overall"]["lora"]
            if overall["clip_t"] >= base - 0.02 and (best is None or overall["dino"] > best[0]):
                best = (overall["dino"], trial["name"], point["step"])
    return best[1], best[2]


@pytest.fixture(scope="module")  # 8 trainings and 8 scorings: about 50 s on 2 busy cores
def grid_sweep(tmp_path_factory) -> tuple[Path, dict, str]:
    root = tmp_path_factory.mktemp("tune")
    dataset = write_tiny_dataset(root / "dataset")
    args = tune_args(dataset, root / "runs", "g", "--grid", "lr=1e-3,3e-3", "--grid", "rank=2,4", "--steps", "1,2")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    tune_dir = root / "runs" / "g"
    return tune_dir, json.loads((tune_dir / "tune.json").read_text()), result.output


@pytest.mark.slow
def test_grid_gives_four_run_folders_every_point_and_the_winner(grid_sweep):
    tune_dir, data, output = grid_sweep
    assert [t["name"] for t in data["trials"]] == ["trial-00", "trial-01", "trial-02", "trial-03"]
    settings = [(t["settings"]["train.learning_rate"], t["settings"]["lora.rank"]) for t in data["trials"]]
    assert settings == [(1e-3, 2), (1e-3, 4), (3e-3, 2), (3e-3, 4)]
    for trial in data["trials"]:
        assert trial["status"] == "done" and [p["step"] for p in trial["points"]] == [1, 2]
        run = load_run(tune_dir / trial["name"])  # an ordinary run folder
        assert run.config["lora"]["rank"] == trial["settings"]["lora.rank"]
        assert run.config["train"]["learning_rate"] == trial["settings"]["train.learning_rate"]
        steps = [r["step"] for r in read_metrics(run.path / "metrics.jsonl") if "loss" in r]
        assert steps == [1, 2]  # trained once to 1, resumed to 2: no step twice
        assert (run.path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert data["base"] is not None and data["objective"]["floor"] == pytest.approx(data["base"]["clip_t"] - 0.02)
    winner = data["winner"]
    assert (winner["trial"], winner["step"]) == by_hand(tune_dir, data)
    assert winner["trial"] in output and "CLIP-T" in output
    assert "trial-00: done, 2 points in" in output and "; the other 3: about" in output  # the estimate


@pytest.mark.slow
def test_best_repeats_the_winner_at_its_step_and_report_compares_trials(grid_sweep):
    tune_dir, data, _ = grid_sweep
    winner = data["winner"]
    best = tune_dir / "best"
    config = yaml.safe_load((best / "config.yaml").read_text())
    assert config["train"]["max_steps"] == winner["step"]
    trial_config = yaml.safe_load((tune_dir / winner["trial"] / "config.yaml").read_text())
    assert (
        config["lora"] == trial_config["lora"]
        and config["train"]["learning_rate"] == trial_config["train"]["learning_rate"]
    )
    assert (best / "trial").resolve() == (tune_dir / winner["trial"]).resolve()
    assert (best / "lora" / "pytorch_lora_weights.safetensors").is_file()
    html = (tune_dir / "report.html").read_text()
    assert "<svg" in html and "trial-03" in html and "data:image/png" in html


def test_a_trial_that_raises_is_recorded_and_the_others_finish(tmp_path, monkeypatch):
    from sdlora.train import loop

    real = loop.run_training

    def flaky(cfg, **kwargs):
        if cfg.train.learning_rate == 2e-3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(cfg, **kwargs)

    monkeypatch.setattr(loop, "run_training", flaky)
    dataset = write_tiny_dataset(tmp_path / "dataset")
    result = CliRunner().invoke(
        app, tune_args(dataset, tmp_path / "runs", "f", "--grid", "lr=2e-3,1e-3", "--steps", "1")
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "runs" / "f" / "tune.json").read_text())
    failed, done = data["trials"]
    assert failed["status"] == "failed" and "out of memory" in failed["error"]
    assert data["failures"] == [{"trial": "trial-00", "error": failed["error"]}]
    assert done["status"] == "done" and data["winner"]["trial"] == "trial-01"
    # the first trial failed before sampling the base model: the next one did
    assert data["base"] is not None and "failed" in result.output
    assert load_run(tmp_path / "runs" / "f" / "trial-01").config["train"]["learning_rate"] == 1e-3
    assert not (tmp_path / "runs" / "f" / "trial-00").exists()  # it failed before its run folder was made
    best = yaml.safe_load((tmp_path / "runs" / "f" / "best" / "config.yaml").read_text())
    assert best["train"]["max_steps"] == 1 and best["train"]["learning_rate"] == 1e-3


@pytest.mark.slow
def test_resume_after_kill_9_finishes_without_retraining(tmp_path, monkeypatch):
    dataset = write_tiny_dataset(tmp_path / "dataset")
    runs = tmp_path / "runs"
    args = tune_args(dataset, runs, "k", "--grid", "lr=1e-3,2e-3", "--steps", "1,2")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdlora", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    record = runs / "k" / ".trials" / "trial-01.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once trial-00 is done and trial-01 has begun
        if record.is_file() and json.loads(record.read_text() or "{}").get("status") == "running":
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = json.loads((runs / "k" / "tune.json").read_text())
    assert [t["status"] for t in before["trials"]] == ["done", "pending"]

    from sdlora.train import loop

    calls = []
    real = loop.run_training

    def counted(cfg, **kwargs):
        calls.append((cfg.train.learning_rate, cfg.train.max_steps))
        return real(cfg, **kwargs)

    monkeypatch.setattr(loop, "run_training", counted)
    result = CliRunner().invoke(app, ["tune", "--resume", str(runs / "k")])
    assert result.exit_code == 0, result.output
    assert all(lr == 2e-3 for lr, _ in calls) and [s for _, s in calls][-1] == 2  # trial-00 not retrained
    data = json.loads((runs / "k" / "tune.json").read_text())
    assert [t["status"] for t in data["trials"]] == ["done", "done"]
    assert [p["step"] for p in data["trials"][1]["points"]] == [1, 2]
    steps = [r["step"] for r in read_metrics(runs / "k" / "trial-01" / "metrics.jsonl") if "loss" in r]
    assert sorted(set(steps)) == [1, 2]


@pytest.mark.slow
def test_ray_local_instance_gives_the_same_trials_and_winner(grid_sweep, tmp_path):
    pytest.importorskip("ray")
    tune_dir, local, _ = grid_sweep
    dataset = Path(local["trials"][0]["job"]["config"]["data"]["dataset"])
    args = tune_args(dataset, tmp_path / "runs", "g", "--grid", "lr=1e-3,3e-3", "--grid", "rank=2,4", "--steps", "1,2")
    result = CliRunner().invoke(app, [*args, "--executor", "ray", "--parallel", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "runs" / "g" / "tune.json").read_text())
    assert [(t["name"], t["settings"], t["status"]) for t in data["trials"]] == [
        (t["name"], t["settings"], t["status"]) for t in local["trials"]
    ]
    for ours, theirs in zip(data["trials"], local["trials"]):
        for a, b in zip(ours["points"], theirs["points"]):
            assert a["step"] == b["step"] and a["dino"] == pytest.approx(b["dino"], abs=1e-4)
    assert (data["winner"]["trial"], data["winner"]["step"]) == (local["winner"]["trial"], local["winner"]["step"])


def _signal_once(monkeypatch, module, name: str, signum: int) -> None:
    """`module.name` sends this process `signum` on its first call (what Ctrl-C or `kill` would)."""
    real, sent = getattr(module, name), []

    def wrapped(*args, **kwargs):
        if not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def _ctrl_c_while_training(tmp_path, monkeypatch) -> Path:
    """A 2-trial sweep stopped by Ctrl-C in trial-00's first of 2 steps: checked, returns the tune folder."""
    from sdlora.train import runtime

    _signal_once(monkeypatch, runtime, "step_event", signal.SIGINT)
    dataset = write_tiny_dataset(tmp_path / "dataset")
    tune_dir = tmp_path / "runs" / "c"
    args = tune_args(dataset, tmp_path / "runs", "c", "--grid", "lr=1e-3,2e-3", "--steps", "2")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert "trial-00 saved at step 1" in result.stderr and f"sdlora tune --resume {tune_dir}" in result.stderr
    data = json.loads((tune_dir / "tune.json").read_text())
    assert [t["status"] for t in data["trials"]] == ["interrupted", "pending"] and not data["failures"]
    assert (tune_dir / "trial-00" / "checkpoints" / "step-000001").is_dir() and not (tune_dir / "trial-01").exists()
    assert not (tune_dir / "best").exists()
    monkeypatch.undo()
    return tune_dir


def test_ctrl_c_while_training_stops_the_sweep(tmp_path, monkeypatch):
    _ctrl_c_while_training(tmp_path, monkeypatch)


@pytest.mark.slow
def test_a_sweep_stopped_by_ctrl_c_resumes_where_it_stopped(tmp_path, monkeypatch):
    tune_dir = _ctrl_c_while_training(tmp_path, monkeypatch)
    result = CliRunner().invoke(app, ["tune", "--resume", str(tune_dir)])
    assert result.exit_code == 0, result.output
    data = json.loads((tune_dir / "tune.json").read_text())
    assert [t["status"] for t in data["trials"]] == ["done", "done"]
    steps = [r["step"] for r in read_metrics(tune_dir / "trial-00" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2]  # continued from its step-1 checkpoint


def test_sigterm_while_scoring_stops_the_sweep_with_143(tmp_path, monkeypatch):
    from sdlora.tune import trial

    _signal_once(monkeypatch, trial, "_score", signal.SIGTERM)
    dataset = write_tiny_dataset(tmp_path / "dataset")
    tune_dir = tmp_path / "runs" / "t"
    result = CliRunner().invoke(
        app, tune_args(dataset, tmp_path / "runs", "t", "--grid", "lr=1e-3,2e-3", "--steps", "1")
    )
    assert result.exit_code == 143, result.output
    assert f"continue with: sdlora tune --resume {tune_dir}" in result.stderr
    data = json.loads((tune_dir / "tune.json").read_text())
    assert [t["status"] for t in data["trials"]] == ["interrupted", "pending"]


def test_a_big_space_runs_only_when_asked_for(tmp_path, monkeypatch):
    from conftest import one_line_error
    from sdlora.tune import sweep

    dataset = write_tiny_dataset(tmp_path / "dataset")
    big = ["--grid", "lr=" + ",".join(f"{i}e-4" for i in range(1, 18)), "--grid", "rank=2,4,8", "--steps", "1"]
    result = CliRunner().invoke(app, tune_args(dataset, tmp_path / "runs", "big", *big))  # 51 trials, no tty
    one_line_error(result, "the space has 51 trials (more than 50)", "--max-trials 51", "--yes", "--random")
    assert not (tmp_path / "runs").exists()
    result = CliRunner().invoke(app, tune_args(dataset, tmp_path / "runs", "big", *big, "--max-trials", "50"))
    one_line_error(result, "51 trials, more than --max-trials 50")

    started = []
    monkeypatch.setattr(sweep, "plan_sweep", lambda _, __, space, *a, **kw: started.append(space) or sys.exit(0))
    for flag in (["--max-trials", "51"], ["--yes"]):
        result = CliRunner().invoke(app, tune_args(dataset, tmp_path / "runs", f"big{len(started)}", *big, *flag))
        assert result.exit_code == 0, result.output
    assert [sweep.trial_count(space) for space in started] == [51, 51]


@pytest.mark.slow
def test_ray_with_one_scored_step_per_trial_reports_every_point(tmp_path):
    pytest.importorskip("ray")
    dataset = write_tiny_dataset(tmp_path / "dataset")
    args = tune_args(dataset, tmp_path / "runs", "one", "--grid", "lr=1e-3,2e-3", "--max-steps", "1")
    # the local warm-up scores trial-00's only point: its Ray trial finds it done and must still report it
    result = CliRunner().invoke(app, [*args, "--executor", "ray"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "runs" / "one" / "tune.json").read_text())
    assert [(t["status"], [p["step"] for p in t["points"]]) for t in data["trials"]] == [("done", [1]), ("done", [1])]
    assert data["winner"] is not None and "Traceback" not in result.output


def test_a_ray_error_is_its_last_error_line():
    from sdlora.tune.executors import ray_error_line

    text = (
        "Traceback (most recent call last):\n"
        '  File "ray/tune/execution/tune_controller.py", line 1406, in _on_result\n'
        "    raise ValueError(\n"
        "ValueError: Trial returned a result which did not include the specified metric(s) `dino` that "
        "`tune.TuneConfig()` expects.\n"
        "Result: {'step': 1}\n"
    )
    assert ray_error_line(RuntimeError(text)).startswith("ValueError: Trial returned a result which did not")
    assert ray_error_line(ConnectionError("could not reach 10.0.0.1:6379\nretrying")) == (
        "ConnectionError: could not reach 10.0.0.1:6379"
    )


@pytest.mark.slow
def test_ctrl_c_with_parallel_workers_stops_them_once_and_they_save(tmp_path):
    import threading

    dataset = write_tiny_dataset(tmp_path / "dataset")
    tune_dir = tmp_path / "runs" / "p"
    metrics = tune_dir / "trial-00" / "metrics.jsonl"

    def ctrl_c_once_training() -> None:  # the worker warming the caches (trial-00) is training
        deadline = time.time() + 300
        while time.time() < deadline and not metrics.is_file():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_once_training, daemon=True).start()
    # Steps enough that the Ctrl-C lands mid-training even on a loaded machine: with 10, the slow suite once saw
    # the worker finish its last step before the stop reached it (a whole run, so no checkpoint to resume from).
    args = tune_args(dataset, tmp_path / "runs", "p", "--grid", "lr=1e-3,2e-3", "--steps", "400", "--parallel", "2")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert f"sdlora tune --resume {tune_dir}" in result.stderr
    data = json.loads((tune_dir / "tune.json").read_text())
    assert [t["status"] for t in data["trials"]] == ["interrupted", "pending"] and not data["failures"]
    assert list((tune_dir / "trial-00" / "checkpoints").iterdir())  # the worker saved before it exited
