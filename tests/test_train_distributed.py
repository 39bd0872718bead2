"""Data parallel: 2 processes x batch 1 (gloo on the CPU) train the same LoRA as 1 process x batch 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdlora.config import load_config
from sdlora.run import read_metrics
from sdlora.train import loop

STEPS = 3


def common_flags(dataset: Path, runs: Path) -> dict:
    return {
        "model.name": "tiny-sd",
        "data.dataset": str(dataset),
        "run.runs_dir": str(runs),
        "train.max_steps": STEPS,
        "train.learning_rate": 1e-3,
        "validation.validate_every": 0,
        "validation.prompts": [],
        "checkpoint.checkpoint_every": 0,
    }


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path, tiny_dataset: Path):
    runs = tmp_path / "runs"
    single = loop.run_training(
        load_config(None, {**common_flags(tiny_dataset, runs), "train.batch_size": 2, "run.name": "single"})
    )

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "sdlora",
        "train",
        "--num-processes",
        "2",
        "--batch-size",
        "1",
        "--name",
        "ddp",
        "--model",
        "tiny-sd",
        "--dataset",
        str(tiny_dataset),
        "--runs-dir",
        str(runs),
        "--max-steps",
        str(STEPS),
        "--learning-rate",
        "1e-3",
        "--validate-every",
        "0",
        "--checkpoint-every",
        "0",
        "validation.prompts=[]",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effective batch 2 = 1 x 2 process(es)" in proc.stdout

    ddp = runs / "ddp"
    a = load_file(single.lora_dir / "pytorch_lora_weights.safetensors")
    b = load_file(ddp / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:  # only the order of float reductions differs
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    losses_single = [r["loss"] for r in read_metrics(single.run_dir / "metrics.jsonl") if "loss" in r]
    losses_ddp = [r["loss"] for r in read_metrics(ddp / "metrics.jsonl") if "loss" in r]
    assert len(losses_ddp) == STEPS
    torch.testing.assert_close(torch.tensor(losses_ddp), torch.tensor(losses_single), atol=1e-5, rtol=1e-5)
