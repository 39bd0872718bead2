"""The dependency floors in pyproject.toml load a trained run's files (slow: pip and a tiny training run).

pip installs the floor versions of diffusers, peft and transformers into a temp `--target` folder
(reusing this environment's torch and the rest); `floor_check.py` then loads a freshly trained tiny-sd
run (UNet + text-encoder LoRA, the token's embedding) with them and checks every LoRA weight delta and
the embedding row. Skipped when pip cannot reach a package index.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_tiny_dataset

FLOORED = ("diffusers", "peft", "transformers")


def floors() -> dict[str, str]:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    return {name: re.search(rf'"{name}>=([\d.]+)"', text)[1] for name in FLOORED}


@pytest.mark.slow
def test_the_declared_floors_load_a_trained_runs_files(tmp_path: Path):
    versions = floors()
    target = tmp_path / "floors"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(target)]
    wanted = [f"{name}=={version}" for name, version in versions.items()]
    result = subprocess.run([*pip, "--no-deps", *wanted], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        if re.search(r"(?i)network|connection|resolve|index|No matching distribution", result.stderr):
            pytest.skip(f"pip cannot reach a package index: {result.stderr.strip().splitlines()[-1]}")
        pytest.fail(result.stderr)
    subprocess.run([*pip, "httpx"], capture_output=True, text=True, timeout=300)  # older diffusers import it

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    dataset = write_tiny_dataset(tmp_path / "ds")
    train = [sys.executable, "-m", "sdlora", "train", "-d", str(dataset), "--model", "tiny-sd", "--resolution", "64"]
    train += ["--max-steps", "2", "--train-text-encoder", "--alpha", "8", "--runs-dir", str(tmp_path / "runs")]
    done = subprocess.run([*train, "--name", "r"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    lora = tmp_path / "runs" / "r" / "lora"
    assert (lora / "embeddings.safetensors").is_file()

    env["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO / "src")])
    check = [sys.executable, str(REPO / "tests" / "floor_check.py"), str(lora), "tiny-sd", "sksToy"]
    result = subprocess.run(check, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    for name, version in versions.items():  # the floors were what loaded (0.38 installs as 0.38.0)
        assert re.search(rf"{name} {re.escape(version)}(\.0)*(,|$)", result.stdout.strip().splitlines()[-1]), name
