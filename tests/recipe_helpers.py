"""Shared by the recipe-option tests: a tiny config, and the resume check (2x3 steps == 6 straight)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.run import Metric, read_metrics
from sdlora.train import loop, resolve
from test_train import tiny_cfg  # the one tiny config of the training tests

runner = CliRunner()


def losses(run_dir: Path) -> list[float]:
    return [r[Metric.LOSS] for r in read_metrics(run_dir / "metrics.jsonl") if Metric.LOSS in r]


def lora_file(result: Any) -> dict[str, torch.Tensor]:
    return load_file(result.lora_dir / "pytorch_lora_weights.safetensors")


def assert_same_lora(a: Any, b: Any, atol: float = 1e-6) -> list[str]:
    """Two TrainResults' diffusers LoRA files hold the same keys and, within `atol`, the same tensors (the
    same ops in one process on one thread: only summation order may differ); returns the keys."""
    first, second = lora_file(a), lora_file(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=atol, rtol=1e-5, msg=key)
    return list(first)


def straight_and_resumed(tmp_path: Path, dataset: Path, flags: dict[str, Any]) -> tuple[Any, Any]:
    """6 straight steps, and 3 steps + Ctrl-C + resume to 6, with `flags` on: their TrainResults.

    Asserts the two give the same losses and the same LoRA file."""
    flags = {"train.max_steps": 6, **flags}
    straight = loop.run_training(tiny_cfg(tmp_path, dataset, {**flags, "run.name": "straight"}))
    second, _, _ = stopped_and_resumed(tiny_cfg(tmp_path, dataset, {**flags, "run.name": "halves"}), 3)
    assert second.steps == 6
    assert losses(second.run_dir) == pytest.approx(losses(straight.run_dir), abs=1e-5)
    assert_same_lora(straight, second, atol=1e-5)
    return straight, second


def stopped_and_resumed(cfg: Any, stop_at: int) -> tuple[Any, Any, list[str]]:
    """Train `cfg`, stop after step `stop_at` as Ctrl-C does, resume to --max-steps: the resumed run's
    TrainResult, its resolved config and the resume warnings."""
    state = loop.setup(cfg)

    def stop(event: dict) -> None:
        if event["event"] == "step" and event["step"] == stop_at:
            state.request_stop()

    try:
        first = loop.train(state, stop)
    finally:
        loop.cleanup(state)
    assert first.interrupted and first.steps == stop_at
    run_dir, resumed, warnings = resolve.resume_run(first.run_dir, [{}], ("command line",))
    return loop.run_training(resumed, resume=run_dir), resumed, warnings


def invoke(*args: str):
    return runner.invoke(app, ["train", *args])


def print_config(*args: str) -> dict:
    import yaml

    result = invoke("--config", "tiny", *args, "--print-config")
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.output)
