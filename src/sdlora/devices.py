"""Which device to compute on, and giving its memory back: one answer for every stage."""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys
from typing import Mapping

import torch

from sdlora.errors import ConfigError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`--device`, or the best available: CUDA, then Apple's MPS, then the CPU."""
    if device:
        try:
            chosen = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"--device {device}: not a device (use cpu, cuda, cuda:1 or mps)") from exc
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
        if chosen.type == "mps" and not _mps_available():
            raise ConfigError(f"--device {device}: Apple's MPS is not available here (use --device cpu)")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def free_memory() -> None:
    """Collect garbage, give the freed heap back to the OS and return cached accelerator memory (between
    stages, after freeing models). Without the heap trim, glibc keeps what models and activations freed
    in the process (its resident size stays up) and a later stage's allocations land on top of it."""
    gc.collect()
    _trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif _mps_available():
        torch.mps.empty_cache()


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> object | None:
    """glibc's malloc_trim, or None (not Linux, or another C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)  # type: ignore[operator]


# ----------------------------------------------------------------------------- CPU threads
# An OpenMP step waits at the end of every parallel region for its slowest thread: a thread whose
# core another process holds stalls the whole step. So a CPU run uses the cores the other processes
# leave free, decided again at every logged step (on 2 shared cores under a load average of 9, a LoRA
# UNet step ran 1.4x slower on 2 threads than on 1, and 15x slower while idle threads spun: see
# OMP_WAIT_POLICY in sdlora/cli/__init__.py). OMP_NUM_THREADS, when set, is the user's choice and wins.
THREADS_ENV = "OMP_NUM_THREADS"


def cpu_threads(cpus: int, others_busy: float) -> int:
    """The intra-op threads for a CPU step: the `cpus` minus the cores other processes keep busy
    (`others_busy`, in cores), rounded, at least one."""
    return max(1, min(cpus, int(cpus - max(0.0, others_busy) + 0.5)))


def others_busy_cores(cpus: int, system_percent: float, process_percent: float) -> float:
    """Cores kept busy by other processes since the last reading: the whole machine's busy share
    (`system_percent`, psutil's 0-100 over all cores) less this process's (`process_percent`, 100 per core)."""
    return max(0.0, system_percent * cpus / 100.0 - process_percent / 100.0)


def fit_cpu_threads(
    device: torch.device,
    system_percent: float,
    process_percent: float,
    most: int,
    environ: Mapping[str, str] = os.environ,
) -> int | None:
    """Set torch's intra-op threads to the cores left free (`cpu_threads`), at most `most` (the threads
    the run started with: torch's one per physical core, or what the caller set); the count, or None
    where it is not ours to choose (not the CPU, or OMP_NUM_THREADS set)."""
    if torch.device(device).type != "cpu" or environ.get(THREADS_ENV):
        return None
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    others = others_busy_cores(logical, system_percent, process_percent) * max(1, most) / logical
    threads = cpu_threads(max(1, most), others)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
