"""The build's phases: two one-thread processes side by side per phase, each a trainer module's main.

    0  pool shard 0  | pool shard 1      the scene pool (pool.py)
    A  vae           | clip              nothing depends on anything
    B  unet          | dino              the UNet trains on A's VAE and text tower
    C  unet_xl           | flux          world-sdxl's UNet and world-flux's transformer (with its T5), on A's
                                         VAE and the CLIP's text tower

Every trainer skips what is already built and resumes from its checkpoint, so running the build
again after an interruption (or a failure) continues where it stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from sdlora.errors import SdloraError

MODELS = ("clip", "vae", "unet", "dino", "unet_xl", "flux")
PHASES: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("pool", "--shard", "0"), ("pool", "--shard", "1")),
    (("vae",), ("clip",)),
    (("unet",), ("dino",)),
    (("unet_xl",), ("flux",)),
)


def _nice() -> None:
    os.nice(19)  # a two-hour background job: the machine's other work goes first


def run_phase(jobs: list[tuple[str, ...]], out: Path, scale: float) -> None:
    procs = []
    for module, *extra in jobs:
        cmd = [
            sys.executable,
            "-m",
            f"sdlora.world.trainers.{module}",
            "--out",
            str(out),
            "--steps-scale",
            str(scale),
            *extra,
        ]
        procs.append((module, subprocess.Popen(cmd, preexec_fn=_nice)))
    failed = [(name, proc.wait()) for name, proc in procs]
    failed = [(name, rc) for name, rc in failed if rc != 0]
    if failed:
        what = ", ".join(f"{name} (exit {rc})" for name, rc in failed)
        raise SdloraError(f"world build: {what} failed; run the same command again to resume from the checkpoints")


def build(out: Path, only: str | None = None, scale: float = 1.0) -> None:
    """Run the build (or one model of it, `only`) into `out`."""
    start = time.monotonic()
    for phase in PHASES:
        # The pool is every model's data but the ViT's (it renders its own pairs).
        jobs = [job for job in phase if only in (None, job[0]) or (job[0] == "pool" and only != "dino")]
        if jobs:
            run_phase(jobs, out, scale)
    print(f"[build] done in {(time.monotonic() - start) / 60:.1f} min: {out}", flush=True)
