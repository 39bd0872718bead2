"""What trains and how fast: parameter groups, the optimizer, the learning-rate schedule.

Each trained part is its own group (`unet`, `text_encoder`, `text_encoder_2`, `embeddings`), with
its own learning rate and weight decay (`group_settings`), so each has its own gradient norm and
learning rate in metrics.jsonl. An `--optimizer` choice is one entry of `OPTIMIZERS`: where its
class comes from (an optional package is imported, and missing, reported before the model loads)
and its settings besides the learning rate and weight decay. Adding an optimizer is one entry
here (and its name among the config's choices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from sdlora.config import Config
from sdlora.errors import ConfigError
from sdlora.models.arch import Architecture


@dataclass(frozen=True)
class OptimizerChoice:
    """One `--optimizer`: `load()` gives its class (ConfigError when its package is missing);
    `settings(cfg)` its keyword arguments besides lr and weight_decay, which a resume applies again."""

    load: Callable[[], type[torch.optim.Optimizer]]
    settings: Callable[[Config], dict[str, Any]]


def _adam_settings(cfg: Config) -> dict[str, Any]:
    return {"betas": (cfg.train.adam_beta1, cfg.train.adam_beta2), "eps": cfg.train.adam_epsilon}


def _bitsandbytes_adamw8bit() -> type[torch.optim.Optimizer]:
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            "--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes, CUDA only); or use --optimizer adamw"
        ) from None
    return bitsandbytes.optim.AdamW8bit


OPTIMIZERS: dict[str, OptimizerChoice] = {
    "adamw": OptimizerChoice(load=lambda: torch.optim.AdamW, settings=_adam_settings),
    "adamw8bit": OptimizerChoice(load=_bitsandbytes_adamw8bit, settings=_adam_settings),
}


def _choice(cfg: Config) -> OptimizerChoice:
    try:
        return OPTIMIZERS[cfg.train.optimizer]
    except KeyError:
        raise ConfigError(f"--optimizer {cfg.train.optimizer}: not one of {', '.join(OPTIMIZERS)}") from None


def check_optimizer(cfg: Config) -> None:
    """The optimizer's package is importable (checked before minutes of model loading)."""
    _choice(cfg).load()


def param_groups(
    unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module], arch: Architecture, tokens: Any = None
) -> dict[str, list[torch.nn.Parameter]]:
    """Group name -> trainable parameters: the UNet's LoRA, each trained text encoder's, the token's vectors."""
    groups = {"unet": [p for p in unet.parameters() if p.requires_grad]}
    for name, encoder in zip(arch.text_encoders, text_encoders):
        groups[name] = [p for p in encoder.parameters() if p.requires_grad]
    if tokens is not None:
        groups["embeddings"] = list(tokens.parameters())
    return groups


def group_settings(cfg: Config, name: str) -> dict[str, float]:
    """Learning rate and weight decay of one optimizer group (unet, text_encoder[_2], embeddings)."""
    if name == "embeddings":  # weight decay would pull the token's embedding towards zero
        return {"lr": cfg.embedding.learning_rate, "weight_decay": 0.0}
    lr = cfg.train.learning_rate if name == "unet" else (cfg.train.text_encoder_lr or cfg.train.learning_rate)
    return {"lr": lr, "weight_decay": cfg.train.weight_decay}


def build_optimizer(cfg: Config, groups: dict[str, list[torch.nn.Parameter]]) -> torch.optim.Optimizer:
    """The optimizer over `groups`, in their order (the order metrics and checkpoints rely on)."""
    choice = _choice(cfg)
    param_groups = [{"params": params, **group_settings(cfg, name)} for name, params in groups.items()]
    return choice.load()(param_groups, **choice.settings(cfg))


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> Any:
    """The learning-rate schedule (diffusers' schedulers: constant, cosine, linear...) with its warmup."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )


def apply_config(cfg: Config, optimizer: torch.optim.Optimizer, scheduler: Any, group_names: Sequence[str]) -> None:
    """The config's learning rates and optimizer settings over a checkpoint's (a resume may change them).

    The optimizer's and scheduler's saved states carry the old values; the schedule's position
    (its step count) and the optimizer's moments are kept.
    """
    settings = [group_settings(cfg, name) for name in group_names]
    extra = _choice(cfg).settings(cfg)
    scheduler.base_lrs = [s["lr"] for s in settings]
    for group, setting, factor in zip(optimizer.param_groups, settings, scheduler.lr_lambdas):
        group.update(
            initial_lr=setting["lr"],
            lr=setting["lr"] * factor(scheduler.last_epoch),
            weight_decay=setting["weight_decay"],
            **extra,
        )
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
