"""EMA of the trained weights (`--ema-decay`), and the weights that validation and export see.

The EMA is a float32 copy of every trained tensor (the LoRA's, the token's vectors), on the training
device or, with `--ema-device cpu`, in host memory, updated every `--ema-every` optimizer steps by
`ema = d * ema + (1 - d) * weight` with diffusers' EMAModel warm-up, d = min(decay, (1 + n) / (10 + n))
after n updates, so the start (random B = 0 LoRA) fades out quickly. Validation loss, samples, best/
and the exported LoRA use it (`eval_weights`); the training weights stay in the models and in the
checkpoint, and the EMA's own tensors and update count go into the checkpoint too (train/statefile.py),
so a resumed run matches an uninterrupted one. `eval_weights` also switches a schedule-free optimizer
to its averaged weights (train/optim.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from sdlora.train import optim
from sdlora.train.statefile import load_state, save_state

if TYPE_CHECKING:
    from sdlora.train.state import TrainState

NAME = "ema"  # the checkpoint's ema.safetensors + ema.json


class EMA:
    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float, every: int, device: Any):
        self.params = list(params)
        self.decay, self.every = float(decay), int(every)
        self.shadow = [p.detach().to(device=device, dtype=torch.float32, copy=True) for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.current_decay()
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().to(device=shadow.device, dtype=torch.float32), weight)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": list(self.shadow), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["shadow"]
        if len(saved) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(saved, self.shadow)):
            from sdlora.errors import RunError

            raise RunError("the checkpoint's EMA does not match this LoRA (another --rank or --target-modules?)")
        from sdlora.train.fsdp import like

        for shadow, value in zip(self.shadow, saved):
            shadow.copy_(like(value, shadow))  # FSDP: this process's shard of the whole tensor
        self.updates = int(state["updates"])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the models, then the training weights again (bit-exact)."""
        raw = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for param, shadow in zip(self.params, self.shadow):
                param.copy_(shadow.to(device=param.device, dtype=param.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, raw):
                    param.copy_(value)


def build(cfg: Any, groups: dict[str, list[torch.nn.Parameter]], device: Any) -> EMA | None:
    """The EMA of every trained tensor (None without --ema-decay)."""
    if not cfg.lora.ema_decay:
        return None
    where = "cpu" if cfg.lora.ema_device == "cpu" else device
    return EMA([p for params in groups.values() for p in params], cfg.lora.ema_decay, cfg.lora.ema_every, where)


def update(state: TrainState) -> None:
    """After the optimizer step `state.step` (counted from 0): the EMA's update, every --ema-every steps."""
    ema = state.ema
    if ema is not None and (state.step + 1) % ema.every == 0:
        ema.update()


@contextlib.contextmanager
def eval_weights(state: TrainState) -> Iterator[None]:
    """The weights validation, samples, best/ and the exported LoRA use: the EMA's, or a schedule-free
    optimizer's average, else the training weights."""
    with optim.averaged_weights(state.optimizer):
        if state.ema is None:
            yield
        else:
            with state.ema.applied():
                yield


def save(folder: Path, ema_state: dict[str, Any] | None) -> list[str]:
    """The EMA's state (`EMA.state_dict()`, its tensors whole) into a checkpoint folder (nothing without one)."""
    return [] if ema_state is None else save_state(folder, NAME, ema_state)


def load(state: TrainState, folder: Path) -> None:
    """The checkpoint's EMA; a checkpoint without one (EMA turned on at resume) starts it from the weights."""
    if state.ema is not None and (Path(folder) / f"{NAME}.json").is_file():
        state.ema.load_state_dict(load_state(folder, NAME))
