"""`TrainState`: everything the training loop and its builders share, built by `loop.setup`.

Its own module so the builders under train/ (checkpoint, export, validation, ...) can name the
type without importing the loop that imports them.
"""

from __future__ import annotations

import math
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdlora.config import Config
from sdlora.events import OnEvent
from sdlora.models.families import Family
from sdlora.train import monitor
from sdlora.train.data import BatchPlan, LatentSet
from sdlora.train.objective import Objective


@dataclass
class TrainState:
    """Everything the loop needs, built by `setup` in dependency order."""

    cfg: Config
    accelerator: Any
    pipe: Any
    arch: Family  # the model family (models/families/); "arch" as run files and events record it
    unet: Any  # prepared (maybe DDP-wrapped)
    text_encoders: list[Any]  # prepared, only those with a LoRA being trained
    objective: Objective  # the training objective the family gives (train/objective.py)
    optimizer: Any
    lr_scheduler: Any
    plan: BatchPlan
    val_data: LatentSet | None
    sample_conds: list[tuple[torch.Tensor, torch.Tensor | None]] | None  # cached prompt embeddings for samples
    negative_cond: tuple[torch.Tensor, torch.Tensor | None] | None
    run_dir: Path
    weight_dtype: torch.dtype
    emit: OnEvent
    step: int = 0
    best_val_loss: float = math.inf
    best_dino: float = -math.inf  # highest DINO so far (--score-every)
    loss_mean: monitor.RunningMean = field(default_factory=lambda: monitor.RunningMean(window=50))
    metrics: monitor.MetricsWriter | None = None
    last_checkpoint: Path | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    stop_signal: int = int(signal.SIGINT)  # what asked to stop: SIGINT (Ctrl-C, `request_stop`) or SIGTERM
    locks: list[Path] = field(default_factory=list)  # the run folder's lock (main process) and the dataset's
    # shared one, released by `cleanup`
    param_groups: dict[str, list[torch.nn.Parameter]] = field(default_factory=dict)
    tokens: Any = None  # TokenEmbeddings (train/embeddings.py) when the token's own embedding trains
    # Run by the loss without a LoRA, in the family's order: all of them for that embedding when no text-encoder
    # LoRA trains; beside one, those the family trains none on (FLUX.1's T5: `Family.lora_text_encoders`).
    frozen_text_encoders: list[Any] = field(default_factory=list)
    empty_caption: Any = None  # --caption-dropout's empty caption (train/dropout.py), else None
    ema: Any = None  # --ema-decay's EMA of the trained weights (train/ema.py), else None

    def request_stop(self) -> None:
        """Stop after the current step, save a checkpoint and the LoRA (what Ctrl-C does)."""
        self.stop.set()

    @property
    def live_text_encoders(self) -> list[Any]:
        """The text encoders the loss runs through, in the family's order (none when all text embeddings are
        cached): the trained ones and the frozen ones beside them."""
        if not (self.text_encoders and self.frozen_text_encoders):
            return self.text_encoders or self.frozen_text_encoders
        trained = dict(zip(self.arch.lora_text_encoders(), self.text_encoders))
        frozen = iter(self.frozen_text_encoders)
        return [trained[name] if name in trained else next(frozen) for name in self.arch.text_encoders]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def unwrap(self, model: Any) -> Any:
        return self.accelerator.unwrap_model(model)
