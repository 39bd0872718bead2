"""Output a person reads: no third-party logs, tqdm bars or Python warnings between sdlora's lines.

Each check runs `sdlora` in a fresh process with the libraries' own switches unset (conftest sets
DIFFUSERS_VERBOSITY / TRANSFORMERS_VERBOSITY for the test process), so what a user sees is what is read.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

# What the libraries print when left alone: tqdm bars, their loading and saving bars, Python warnings
# (FutureWarning, UserWarning, ...), diffusers' error log before a failed LoRA load.
NOISE = re.compile(
    r"it/s\]|s/it\]|\[\d\d:\d\d<|Loading pipeline components|Loading weights|Writing model shards|Fetching \d+ files"
    r"|Warning|was unsuccessful|size mismatch"
)
LIBRARY_SWITCHES = (
    "DIFFUSERS_VERBOSITY",
    "TRANSFORMERS_VERBOSITY",
    "HF_HUB_VERBOSITY",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "TQDM_DISABLE",
    "PYTHONWARNINGS",
    "SDLORA_DEBUG",
)


def user_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LIBRARY_SWITCHES}
    src = str(REPO / "src")
    env.update(PYTHONPATH=os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p), HF_HUB_OFFLINE="1")
    env.update(COLUMNS="200", OMP_NUM_THREADS="1")
    return env


def sdlora(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdlora", *argv], cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=600
    )


def assert_quiet(result: subprocess.CompletedProcess, code: int = 0) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    noise = [line for line in output.splitlines() if NOISE.search(line)]
    assert not noise, "\n".join(noise)
    return output


def test_the_libraries_are_quiet_once_switched_off(tmp_path: Path):
    """The switch alone, on the libraries' own ways of talking (fast: no model is run)."""
    script = """
import logging, warnings
from sdlora.cli.quiet import quiet_libraries
quiet_libraries()
from diffusers.utils import deprecate, logging as dl
from transformers.utils import logging as tl
from huggingface_hub.utils import tqdm as hub_tqdm
dl.get_logger("diffusers.loaders.peft").error("Loading x was unsuccessful")
tl.get_logger("transformers.modeling_utils").warning("Some weights were not initialized")
deprecate("torch_dtype", "1.0.0", "Please use `dtype` instead.")
warnings.warn("a UserWarning from a library", UserWarning)
for bar in (dl.tqdm(range(3), desc="Loading pipeline components..."), tl.tqdm(range(3), desc="Loading weights"),
            hub_tqdm(range(3), desc="Fetching 3 files")):
    list(bar)
print("done")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=600
    )
    assert assert_quiet(result).strip() == "done"


@pytest.mark.slow
def test_every_verb_on_a_local_folder_prints_only_sdlora(tmp_path: Path):
    from run_helpers import save_random_lora
    from sdlora.models import load_pipeline

    pipe, _ = load_pipeline("tiny-sd")
    pipe.save_pretrained(tmp_path / "tiny-sd")
    xl_lora = save_random_lora(tmp_path / "xl-lora", "tiny-sdxl").parent
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        pixels = np.random.default_rng(i).integers(0, 256, (80, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"p{i}.png")
    model = str(tmp_path / "tiny-sd")
    tiny_scorers = ["--dino-model", "tiny-dino", "--clip-model", "tiny-clip", "--device", "cpu"]

    assert_quiet(sdlora(tmp_path, "prepare", "photos", "--resolution", "64"))
    assert_quiet(sdlora(tmp_path, "caption", "--check", "--model", model))
    train = ["train", "--model", model, "--max-steps", "1", "--checkpoint-every", "0", "--no-train-token-embedding"]
    out = assert_quiet(sdlora(tmp_path, *train))
    assert "done: 1 steps" in out
    assert_quiet(sdlora(tmp_path, "sample", "sksToy on a beach", "-n", "1", "--steps", "1"))
    assert_quiet(sdlora(tmp_path, "score", *tiny_scorers))
    assert_quiet(sdlora(tmp_path, "report"))
    # An SDXL LoRA on an SD 1.x run: diffusers' 26 lines of size mismatches before it raises; only the one line.
    wrong = sdlora(tmp_path, "sample", "sksToy", "-n", "1", "--steps", "1", "--lora", str(xl_lora))
    out = assert_quiet(wrong, code=1)
    assert out.strip().startswith("error: ") and len(out.strip().splitlines()) == 1, out
    # --debug brings the libraries' own output back.
    debug = sdlora(tmp_path, "--debug", "sample", "sksToy", "-n", "1", "--steps", "1", "--lora", str(xl_lora))
    assert "was unsuccessful" in debug.stderr
