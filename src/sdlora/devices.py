"""Which device to compute on, and giving its memory back: one answer for every stage."""

from __future__ import annotations

import ctypes
import functools
import gc
import sys

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
    trim_heap()
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


def trim_heap() -> None:
    """Give the heap glibc keeps after frees back to the OS (cheap: no garbage collection)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)  # type: ignore[operator]
