"""Real processes and real signals against a run folder: a second `train` on a locked folder, a kill -9
during the first checkpoint write, a second signal during the save of the first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_line_error
from sdlora.cli import app
from sdlora.config import load_config, save_config
from sdlora.run import read_metrics

runner = CliRunner()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# `sdlora` with the checkpoint's last write (sdlora.json, the manifest) held up: the test signals or kills
# the process while the first checkpoint is incomplete. SDLORA_TEST_SEAL names the file that says so.
SLOW_SEAL = """
import os, sys, time
from pathlib import Path
from sdlora.train import checkpoint
def held(state, folder):
    Path(os.environ["SDLORA_TEST_SEAL"]).write_text(str(folder))
    time.sleep(300)
checkpoint._seal = held
from sdlora.cli import main
sys.argv = ["sdlora", *sys.argv[1:]]
main()
"""


def train_args(dataset: Path, runs: Path, *more: str) -> list[str]:
    return [
        "train",
        "--model",
        "tiny-sd",
        "--dataset",
        str(dataset),
        "--runs-dir",
        str(runs),
        "--name",
        "r",
        "--rank",
        "4",
        "--validate-every",
        "0",
        "validation.prompts=[]",
        *more,
    ]


def start_held(tmp_path: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    seal = tmp_path / "sealing"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SEAL, *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, "SDLORA_TEST_SEAL": str(seal)},
    )
    return proc, seal


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(proc.communicate()[1][-2000:])
        time.sleep(0.1)


def test_a_second_train_on_a_locked_run_folder_fails_at_once_naming_the_pid(tmp_path: Path, tiny_dataset: Path):
    run = tmp_path / "runs" / "r"
    cfg = load_config(None, {"model.name": "tiny-sd", "data.dataset": str(tiny_dataset), "train.max_steps": 2})
    save_config(cfg, run / "config.yaml")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from sdlora.locks import acquire; acquire(sys.argv[1], 'train');"
            " print('held', flush=True); time.sleep(120)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = runner.invoke(app, ["train", "--resume", str(run)])
        one_line_error(result, str(run), f"pid {holder.pid}", "sdlora train")
        assert time.monotonic() - started < 20  # before any model loads
        assert not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow  # two trainings, one in a fresh process: ~15-25 s
def test_kill_9_during_the_first_checkpoint_write_then_resume_finishes_the_run(tmp_path: Path, tiny_dataset: Path):
    runs = tmp_path / "runs"
    proc, seal = start_held(tmp_path, train_args(tiny_dataset, runs, "--max-steps", "6", "--checkpoint-every", "3"))
    wait_for(seal, proc)
    proc.kill()  # SIGKILL, while checkpoints/ holds only the unfinished step 3
    proc.communicate()
    run = runs / "r"
    assert not (run / "checkpoints" / "step-000003").exists()
    assert (run / "checkpoints" / ".step-000003.tmp" / "lora_weights_0.safetensors").is_file()
    assert not (runs / "latest").exists()  # nothing to resume or sample yet

    result = runner.invoke(app, ["train", "--resume", "latest", "--runs-dir", str(runs)])
    one_line_error(result, "has no checkpoint or LoRA yet", f"--resume {run.resolve()}")  # `latest` skips it
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert "no checkpoint to resume from" in result.stderr and "from step 0" in result.stderr
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (runs / "latest").resolve() == run.resolve()


@pytest.mark.slow  # a fresh process: ~10-20 s (the handler itself: test_second_signal_raises_stop_now)
def test_a_second_signal_during_the_save_stops_without_saving(tmp_path: Path, tiny_dataset: Path):
    runs = tmp_path / "runs"
    args = train_args(tiny_dataset, runs, "--max-steps", "100000", "--checkpoint-every", "0")
    proc, seal = start_held(tmp_path, args)
    metrics = runs / "r" / "metrics.jsonl"
    wait_for(metrics, proc)
    proc.send_signal(signal.SIGTERM)  # the first: finish the step, save
    wait_for(seal, proc)  # the save is under way
    proc.send_signal(signal.SIGINT)  # the second: stop now
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "stopping after this step; saving a checkpoint and the LoRA (Ctrl-C again to stop without saving)" in err
    assert "stopped without saving: nothing saved" in err
    assert not list((runs / "r" / "checkpoints").glob("step-*"))
    assert not (runs / "r" / "lora").exists() and not (runs / "r" / ".sdlora.lock").exists()


def test_second_signal_raises_stop_now_naming_what_is_saved(tmp_path: Path):
    """The handlers themselves (the slow test above sends real signals): the first asks to stop after the
    step and says so; the second stops at once with what is on disk."""
    import threading
    from types import SimpleNamespace

    from sdlora.train.runtime import STOPPING, StopNow, install_signal_handlers

    events: list[dict] = []
    state = SimpleNamespace(
        stop=threading.Event(), stop_signal=0, emit=events.append, run_dir=tmp_path, last_checkpoint=None
    )
    before = signal.getsignal(signal.SIGTERM)
    restore = install_signal_handlers(state)
    try:
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        assert state.stop.is_set() and state.stop_signal == signal.SIGTERM
        assert events == [{"event": "stopping", "signal": "SIGTERM", "message": STOPPING}]
        with pytest.raises(StopNow) as stop:
            handler(signal.SIGINT, None)
        assert stop.value.signum == signal.SIGINT and stop.value.saved.endswith("nothing saved (no checkpoint yet)")
        state.last_checkpoint = tmp_path / "checkpoints" / "step-000010"
        with pytest.raises(StopNow) as stop:
            handler(signal.SIGTERM, None)
        assert "the last checkpoint is step-000010; continue with: sdlora train --resume" in stop.value.saved
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is before
