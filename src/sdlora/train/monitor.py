"""What a training run records about itself: metrics lines, gradient norms, machine load.

`metrics.jsonl` holds one JSON object per line, each written with a single `write` and flushed,
so `report.py`, `tail -f` or a notebook can read it while training runs (`sdlora.run.read_metrics`
skips a line still being written). Values are plain JSON numbers; a NaN or infinite value becomes
`null`, because strict JSON has no NaN and readers should not choke on a diverged step. Key names
are `sdlora.run.Metric`'s.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import psutil
import torch

from sdlora.fsutil import writing
from sdlora.run import Metric

_GIB = float(1 << 30)


class MetricsWriter:
    """Appends one JSON object per line to `path` (created with its folder; resume appends)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        line = json.dumps(_plain(record), ensure_ascii=False, allow_nan=False)
        with writing(self.path):  # a full disk: one line naming metrics.jsonl
            self._file.write(line + "\n")  # one write per line: readers never see two half-lines
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            with writing(self.path):
                try:
                    self._file.flush()
                    os.fsync(self._file.fileno())
                finally:
                    self._file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(value: Any) -> Any:
    """Tensors, numpy scalars and paths as JSON values; non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    raise TypeError(f"metrics value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


def grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    """Global L2 norm of the parameters' gradients (0.0 when none has a gradient), in float32."""
    norms = [p.grad.detach().float().norm(2) for p in params if p.grad is not None]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]  # FSDP's shards: the whole norm
    if not norms:
        return 0.0
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2).item()


def group_grad_norms(groups: dict[str, list[torch.nn.Parameter]]) -> dict[str, float]:
    """`grad_norm/<group>` of each parameter group and `grad_norm/total`, the norm over all of them."""
    norms = {Metric.grad_norm(name): grad_norm(params) for name, params in groups.items()}
    return {**norms, Metric.GRAD_NORM_TOTAL: math.sqrt(sum(norm**2 for norm in norms.values()))}


_PROCESS: psutil.Process | None = None


def machine_load(device: torch.device) -> dict[str, float]:
    """Process and system CPU %, RSS in GiB and, on CUDA, memory in GiB and GPU utilisation %.

    CPU percentages are measured since the previous call (the first call primes psutil and
    reads 0.0). `cpu_percent` is per process and can exceed 100 on several cores.
    `cuda_utilization_percent` appears only when nvidia-ml-py is installed and NVML answers.
    """
    global _PROCESS
    if _PROCESS is None or _PROCESS.pid != os.getpid():  # a forked worker measures itself
        _PROCESS = psutil.Process()
    load = {
        "cpu_percent": float(_PROCESS.cpu_percent(interval=None)),
        "system_cpu_percent": float(psutil.cpu_percent(interval=None)),
        Metric.RSS_GB: _PROCESS.memory_info().rss / _GIB,
    }
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        load[Metric.CUDA_PREFIX + "allocated_gb"] = torch.cuda.memory_allocated(device) / _GIB
        load[Metric.CUDA_PEAK_GB] = torch.cuda.max_memory_allocated(device) / _GIB
        utilization = _nvml_utilization(device)
        if utilization is not None:
            load[Metric.CUDA_PREFIX + "utilization_percent"] = utilization
    return load


def _nvml_utilization(device: torch.device) -> float | None:
    if importlib.util.find_spec("pynvml") is None:
        return None
    try:
        # torch maps the CUDA index to the NVML one (CUDA_VISIBLE_DEVICES) through pynvml.
        return float(torch.cuda.utilization(device))
    except Exception:  # NVML missing from the driver, no permission, MIG slice: just leave it out
        return None


class RunningMean:
    """The mean of the last `window` values, or a bias-corrected exponential mean with `beta`.

    `RunningMean(window=50)` smooths a noisy loss for the progress bar; `RunningMean(beta=0.98)`
    gives more weight to recent steps. `state_dict()` lets a resumed run continue the curve.
    """

    def __init__(self, window: int | None = 100, *, beta: float | None = None):
        if beta is not None and not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if beta is None and (window is None or window < 1):
            raise ValueError(f"window must be >= 1, got {window}")
        self.beta = beta
        self.window = None if beta is not None else window
        self._values: collections.deque[float] = collections.deque(maxlen=self.window)
        self._ema = 0.0
        self.count = 0

    def update(self, x: float | torch.Tensor) -> float:
        x = float(x.item() if isinstance(x, torch.Tensor) else x)
        self.count += 1
        if self.beta is not None:
            self._ema = self.beta * self._ema + (1.0 - self.beta) * x
        else:
            self._values.append(x)
        return self.value

    @property
    def value(self) -> float:
        """The current mean (NaN before the first update)."""
        if self.count == 0:
            return math.nan
        if self.beta is not None:
            return self._ema / (1.0 - self.beta**self.count)
        return sum(self._values) / len(self._values)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "ema": self._ema, "values": list(self._values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self._ema = float(state["ema"])
        self._values = collections.deque(state["values"], maxlen=self.window)


def add_timing(record: dict[str, Any], elapsed: float, effective_batch: int, epoch: int) -> None:
    """The step's time, throughput and epoch, into its metrics record."""
    record[Metric.STEP_TIME] = elapsed
    record[Metric.IMAGES_PER_S] = effective_batch / elapsed if elapsed > 0 else 0.0
    record[Metric.EPOCH] = epoch
