"""Data parallel: 2 processes x batch 1 (gloo on the CPU) train the same LoRA as 1 process with the same
global batch, as 2 accumulated micro-batches of 1 (the batch plan gives both the same samples, noise and
timesteps: test_train_buckets.py checks that for every batch shape)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlora.config import load_config
from sdlora.run import read_metrics
from sdlora.train import loop

STEPS = 2  # 4 samples of the 5 train images: within the first epoch, where the two orders coincide


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


@pytest.mark.slow  # 30 s; tests/test_launch.py's 2-process all-reduce stays in the default suite
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path, tiny_dataset: Path):
    runs = tmp_path / "runs"
    assert torch.get_num_threads() == 1  # as the workers (OMP_NUM_THREADS=1): the same kernels on both sides
    flags = {"train.batch_size": 1, "train.gradient_accumulation": 2, "run.name": "single"}
    single = loop.run_training(load_config(None, {**common_flags(tiny_dataset, runs), **flags}))

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
    # Equal to float32 rounding, not merely close: each worker runs the batch-1 forward and backward of one
    # micro-batch of the single process, with the same kernels (one thread each side, whatever the load),
    # and averaging two gradients rounds the same either way (halving is exact in binary floating point; a
    # sum of two has no order). Comparing with 1 process x batch 2 instead needs a tolerance of the size of
    # the training itself: its batch-2 kernels round differently (1e-5 after 3 steps, more on other CPUs),
    # and Adam divides each update by the gradient's own size, so a near-zero gradient element can move by
    # up to the learning rate (1e-3) per step, the size of the LoRA update.
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=0)
    losses_single = [r["loss"] for r in read_metrics(single.run_dir / "metrics.jsonl") if "loss" in r]
    losses_ddp = [r["loss"] for r in read_metrics(ddp / "metrics.jsonl") if "loss" in r]
    assert len(losses_ddp) == STEPS
    torch.testing.assert_close(torch.tensor(losses_ddp), torch.tensor(losses_single), atol=1e-7, rtol=0)


@pytest.mark.slow
def test_two_processes_match_one_with_masked_loss_and_dop(tmp_path: Path, tiny_dataset: Path):
    from test_masked_loss import add_masks

    add_masks(tiny_dataset)
    runs = tmp_path / "runs"
    extra = {"data.unmasked_weight": 0.2, "prior.preservation": "dop"}
    flags = {"train.batch_size": 1, "train.gradient_accumulation": 2, "run.name": "single", **extra}
    single = loop.run_training(load_config(None, {**common_flags(tiny_dataset, runs), **flags}))
    assert single.lora_dir is not None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sdlora", "train", "--num-processes", "2", "--batch-size", "1", "--name", "ddp"]
    cmd += ["--model", "tiny-sd", "--dataset", str(tiny_dataset), "--runs-dir", str(runs)]
    cmd += ["--max-steps", str(STEPS), "--learning-rate", "1e-3", "--validate-every", "0", "--checkpoint-every", "0"]
    cmd += ["--unmasked-weight", "0.2", "--preservation", "dop", "validation.prompts=[]"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(single.lora_dir / "pytorch_lora_weights.safetensors")
    b = load_file(runs / "ddp" / "lora" / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=0)
    ddp_steps = [r for r in read_metrics(runs / "ddp" / "metrics.jsonl") if "loss" in r]
    single_steps = [r for r in read_metrics(single.run_dir / "metrics.jsonl") if "loss" in r]
    assert all("mask_coverage" in r and "loss/preservation" in r for r in ddp_steps)
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in ddp_steps]), torch.tensor([r["loss"] for r in single_steps]), atol=1e-7, rtol=0
    )
