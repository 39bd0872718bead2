"""FSDP through --accelerate-config: 2 CPU processes (gloo) shard the denoiser with FSDP2 and train the same
LoRA as 1 process with the same global batch (2 accumulated micro-batches of 1); the accelerate config is
checked before any process starts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.config import load_config
from sdlora.errors import ConfigError
from sdlora.run import read_metrics
from sdlora.train import loop
from sdlora.train.fsdp import read_accelerate_config

STEPS = 2
FSDP_YAML = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
mixed_precision: 'no'
num_machines: 1
num_processes: 2
"""


def write(tmp_path: Path, text: str, name: str = "accelerate.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the config file


def test_an_fsdp_config_is_read_with_its_process_count(tmp_path: Path):
    assert read_accelerate_config(write(tmp_path, FSDP_YAML), has_gpu=False)["num_processes"] == 2


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("distributed_type: FSDPX\n", "unknown distributed_type 'FSDPX'"),
        ("distributed_type: [FSDP\n", "not valid YAML"),
        ("distributed_type: MULTI_GPU\n", "asks for GPUs (distributed_type: MULTI_GPU)"),
        ("distributed_type: DEEPSPEED\n", "asks for GPUs"),
        ("distributed_type: FSDP\ngpu_ids: 0,1\n", "asks for GPUs (gpu_ids: 0,1)"),
        ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n", "fsdp_version: 2"),
        ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n  fsdp_auto_wrap_policy: SIZE_BASED_WRAP\n", "SIZE"),
        ("- FSDP\n", "not an accelerate config"),
        ("distributed_type: MULTI_CPU\nnum_processes: 0\n", "num_processes"),
        ("distributed_type: FSDP\n", "fsdp_version: 2"),  # accelerate's default is FSDP1
    ],
)
def test_a_bad_accelerate_config_is_one_line_naming_the_file(tmp_path: Path, text: str, fragment: str):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="accelerate.yaml") as caught:
        read_accelerate_config(path, has_gpu=False)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_the_cli_refuses_a_bad_accelerate_config_before_launching(tmp_path: Path, tiny_dataset: Path):
    path = write(tmp_path, "distributed_type: TPU_POD\n")
    args = ["train", "--accelerate-config", str(path), "--model", "tiny-sd", "--dataset", str(tiny_dataset)]
    result = CliRunner().invoke(app, [*args, "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code != 0
    assert "accelerate.yaml: unknown distributed_type 'TPU_POD'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


def test_what_fsdp_cannot_train_is_refused_before_launching(tmp_path: Path, tiny_dataset: Path):
    path = write(tmp_path, FSDP_YAML)
    args = ["train", "--accelerate-config", str(path), "--model", "tiny-sd", "--dataset", str(tiny_dataset)]
    result = CliRunner().invoke(app, [*args, "--runs-dir", str(tmp_path / "runs"), "--train-text-encoder"])
    assert result.exit_code != 0
    assert "FSDP shards the denoiser only: leave --train-text-encoder out" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()
    fp8 = CliRunner().invoke(app, [*args, "--runs-dir", str(tmp_path / "runs"), "--base-precision", "fp8"])
    assert fp8.exit_code != 0 and "FSDP: --base-precision fp8 is not sharded here" in fp8.output
    assert "Traceback" not in fp8.output and not (tmp_path / "runs").exists()


def test_the_flux_blocks_are_the_fsdp_units():
    from sdlora.models.families import FAMILIES

    flux = next(f for f in FAMILIES if f.name == "flux1")
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    assert flux.fsdp_blocks(FluxTransformer2DModel) == ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    assert flux.fsdp_blocks(UNet2DConditionModel) == ("BasicTransformerBlock",)


# ----------------------------------------------------------------------------- 2 processes


def _compare(tmp_path: Path, dataset: Path, model: str, *, resume: bool = False, **extra: Any) -> None:
    runs = tmp_path / "runs"
    assert torch.get_num_threads() == 1  # as the workers (OMP_NUM_THREADS=1): the same kernels on both sides
    common = {
        "model.name": model,
        "data.dataset": str(dataset),
        "run.runs_dir": str(runs),
        "train.max_steps": STEPS,
        "train.learning_rate": 1e-3,
        "train.mixed_precision": "no",
        "validation.validate_every": 0,  # the last step validates (val loss): the main process alone, gathered
        "validation.prompts": [],
        "checkpoint.checkpoint_every": STEPS,
    }
    flags = {"train.batch_size": 1, "train.gradient_accumulation": 2, "run.name": "single"}
    single = loop.run_training(load_config(None, {**common, **flags, **extra}))

    config = write(tmp_path, FSDP_YAML, "fsdp.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def fsdp_run(name: str, steps: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "sdlora", "train", "--accelerate-config", str(config), "--batch-size", "1"]
        cmd += ["--name", name, "--model", model, "--dataset", str(dataset), "--runs-dir", str(runs)]
        cmd += ["--max-steps", str(steps), "--learning-rate", "1e-3", "--mixed-precision", "no"]
        cmd += ["--validate-every", "0", "--checkpoint-every", str(STEPS), "validation.prompts=[]"]
        cmd += [f"{key}={value}" for key, value in extra.items()]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    proc = fsdp_run("fsdp", STEPS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effective batch 2 = 1 x 2 process(es)" in proc.stdout  # the config's num_processes
    units = re.search(r"FSDP: the denoiser sharded in (\d+) units", proc.stdout)
    assert units and int(units.group(1)) > 1, proc.stdout  # its blocks and the root: sharded, not DDP

    fsdp_dir = runs / "fsdp"
    a = load_file(single.lora_dir / "pytorch_lora_weights.safetensors")
    b = load_file(fsdp_dir / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert a[key].shape == b[key].shape
        torch.testing.assert_close(b[key], a[key], atol=TOLERANCE, rtol=0)
    # The checkpoint: the same files as one process's, with the weights and the optimizer's state whole.
    step = f"checkpoints/step-{STEPS:06d}"
    written = sorted(p.name for p in (single.run_dir / step).glob("*.safetensors"))
    assert written == sorted(p.name for p in (fsdp_dir / step).glob("*.safetensors") if p.name != "rng_1.safetensors")
    for name in [*(f"{step}/{n}" for n in written if not n.startswith("rng_")), "lora/embeddings.safetensors"]:
        if not (single.run_dir / name).is_file():
            continue
        a, b = load_file(single.run_dir / name), load_file(fsdp_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=TOLERANCE, rtol=0)
    losses = [
        [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] for run in (single.run_dir, fsdp_dir)
    ]
    assert len(losses[1]) == STEPS
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), atol=TOLERANCE, rtol=0)
    val = [
        [r["val_loss"] for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
        for run in (single.run_dir, fsdp_dir)
    ]
    torch.testing.assert_close(torch.tensor(val[1]), torch.tensor(val[0]), atol=TOLERANCE, rtol=0)
    if not resume:
        return
    # Resumed one step further from its checkpoint (whole tensors, sharded again as they are read) = an
    # uninterrupted FSDP run of one step more. (Step 3 starts the second epoch, where 2 processes x 1 and
    # 1 process x 2 micro-batches order the images differently: FSDP is compared with FSDP there.)
    more = ["--max-steps", str(STEPS + 1)]
    proc = fsdp_run("fsdp3", STEPS + 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resume_cmd = [
        sys.executable,
        "-m",
        "sdlora",
        "train",
        "--accelerate-config",
        str(config),
        "--resume",
        str(fsdp_dir),
    ]
    proc = subprocess.run([*resume_cmd, *more], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed at step {STEPS}" in proc.stderr + proc.stdout
    a = load_file(runs / "fsdp3" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(fsdp_dir / "lora" / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=TOLERANCE, rtol=0)


# FSDP reduce-scatters the two processes' gradients (a/2 + b/2, as DDP averages them), and the single process
# sums its two micro-batches' gradients, each halved: equal in float32. What differs is the gradient norm
# (and so the clipping): the whole norm of sharded gradients is summed in another order. Measured on this
# CPU: tiny-flux bit-equal (LoRA, checkpoint, losses, resume); tiny-sd with EMA and LoRA+ 7.4e-7 at most
# in the LoRA and EMA, 1.2e-7 in the loss. 1e-5 leaves room for other CPUs' rounding and is still 100 times
# below what one step changes (lr 1e-3).
TOLERANCE = 1e-5


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_process_tiny_flux(tmp_path: Path, tiny_dataset: Path):
    _compare(tmp_path, tiny_dataset, "tiny-flux", resume=True)


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_process_tiny_sd(tmp_path: Path, tiny_dataset: Path):
    # With the EMA (its state in the checkpoint, whole) and LoRA+ (its groups over the sharded parameters);
    # tiny-sd trains the token's own embedding too (outside the sharded model: averaged by hand).
    _compare(tmp_path, tiny_dataset, "tiny-sd", **{"lora.ema_decay": 0.9, "lora.loraplus_ratio": 4.0})
