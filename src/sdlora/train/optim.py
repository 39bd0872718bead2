"""What trains and how fast: parameter groups, the optimizer, the learning-rate schedule.

Each trained part is its own group (`unet`, `text_encoder`, `text_encoder_2`, `embeddings`), with
its own learning rate and weight decay (`group_settings`), so each has its own gradient norm and
learning rate in metrics.jsonl. An `--optimizer` choice is one entry of `OPTIMIZERS`: where its
class comes from (an optional package is imported, and missing, reported before the model loads)
and its settings besides the learning rate and weight decay. Adding an optimizer is one entry
here (and its name among the config's choices).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from sdlora.config import Config
from sdlora.config.schema import ADAPTIVE_OPTIMIZERS as ADAPTIVE
from sdlora.config.schema import SCHEDULE_FREE_OPTIMIZERS as SCHEDULE_FREE
from sdlora.errors import ConfigError
from sdlora.models.families import Family
from sdlora.run import Metric


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


def _extra(package: str, extra: str, name: str) -> Any:
    """An optional package's module; one ConfigError line naming the extra when it is missing."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(
            f"--optimizer {name} needs {package} (pip install 'sdlora[{extra}]' or pip install {package})"
        ) from None


def _prodigy_settings(cfg: Config) -> dict[str, Any]:
    return {
        **_adam_settings(cfg),
        "d_coef": cfg.train.prodigy_d_coef,
        "safeguard_warmup": cfg.train.prodigy_safeguard_warmup,
        "use_bias_correction": cfg.train.prodigy_bias_correction,
    }


def _schedulefree_settings(cfg: Config) -> dict[str, Any]:
    return {**_adam_settings(cfg), "warmup_steps": cfg.train.lr_warmup_steps}


OPTIMIZERS: dict[str, OptimizerChoice] = {
    "adamw": OptimizerChoice(load=lambda: torch.optim.AdamW, settings=_adam_settings),
    "adamw8bit": OptimizerChoice(load=_bitsandbytes_adamw8bit, settings=_adam_settings),
    "prodigy": OptimizerChoice(
        load=lambda: _extra("prodigyopt", "optimizers", "prodigy").Prodigy, settings=_prodigy_settings
    ),
    "adamw-schedulefree": OptimizerChoice(
        load=lambda: _extra("schedulefree", "optimizers", "adamw-schedulefree").AdamWScheduleFree,
        settings=_schedulefree_settings,
    ),
}


def _choice(cfg: Config) -> OptimizerChoice:
    try:
        return OPTIMIZERS[cfg.train.optimizer]
    except KeyError:
        raise ConfigError(f"--optimizer {cfg.train.optimizer}: not one of {', '.join(OPTIMIZERS)}") from None


def check_optimizer(cfg: Config) -> None:
    """The optimizer's package is importable (checked before minutes of model loading)."""
    _choice(cfg).load()


LORAPLUS_SUFFIX = "_B"  # LoRA+: a group's B (up) matrices are the group `<name>_B`, at --loraplus-ratio x its rate


def param_groups(
    unet: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
    arch: Family,
    tokens: Any = None,
    loraplus: bool = False,
) -> dict[str, list[torch.nn.Parameter]]:
    """Group name -> trainable parameters: the UNet's LoRA, each trained text encoder's, the token's vectors.

    With `loraplus` (--loraplus-ratio) each model's B (up, `lora_B`) matrices form a group of their own
    right after it (`unet_B`, `text_encoder_B`, ...), so they get their own rate and metrics."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, model in [("unet", unet), *zip(arch.lora_text_encoders(), text_encoders)]:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        up = [p for n, p in named if loraplus and is_lora_b(n)]
        groups[name] = [p for n, p in named if not (loraplus and is_lora_b(n))]
        if up:
            groups[name + LORAPLUS_SUFFIX] = up
    if tokens is not None:
        groups["embeddings"] = list(tokens.parameters())
    return groups


def is_lora_b(param_name: str) -> bool:
    """A LoRA B (up) matrix (peft's `lora_B`): what LoRA+ trains faster (LoRA only: LoKr/LoHa have no A/B)."""
    return ".lora_B." in param_name or "lora_B" in param_name.split(".")


def group_settings(cfg: Config, name: str) -> dict[str, float]:
    """Learning rate and weight decay of one optimizer group (unet, text_encoder[_2], embeddings, `<name>_B`).

    Under Prodigy (ADAPTIVE) every group takes --learning-rate (1.0: the rate Prodigy finds): prodigyopt
    (>= 1.1) estimates one rate for all groups and refuses other per-group rates."""
    if name.endswith(LORAPLUS_SUFFIX) and name != "embeddings":
        base = group_settings(cfg, name[: -len(LORAPLUS_SUFFIX)])
        return {**base, "lr": base["lr"] * float(cfg.lora.loraplus_ratio or 1.0)}
    adaptive = cfg.train.optimizer in ADAPTIVE
    if name == "embeddings":  # weight decay would pull the token's embedding towards zero
        return {"lr": cfg.train.learning_rate if adaptive else cfg.embedding.learning_rate, "weight_decay": 0.0}
    lr = (
        cfg.train.learning_rate
        if name == "unet" or adaptive
        else (cfg.train.text_encoder_lr or cfg.train.learning_rate)
    )
    return {"lr": lr, "weight_decay": cfg.train.weight_decay}


def build_optimizer(cfg: Config, groups: dict[str, list[torch.nn.Parameter]]) -> torch.optim.Optimizer:
    """The optimizer over `groups`, in their order (the order metrics and checkpoints rely on)."""
    choice = _choice(cfg)
    param_groups = [{"params": params, **group_settings(cfg, name)} for name, params in groups.items()]
    optimizer = choice.load()(param_groups, **choice.settings(cfg))
    if cfg.train.optimizer in SCHEDULE_FREE:
        optimizer.train()  # type: ignore[attr-defined]  # schedule-free starts in eval mode
    return optimizer


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> Any:
    """The learning-rate schedule (diffusers' schedulers: constant, cosine, linear...) with its warmup."""
    from diffusers.optimization import get_scheduler

    schedule_free = cfg.train.optimizer in SCHEDULE_FREE
    return get_scheduler(
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=0 if schedule_free else cfg.train.lr_warmup_steps,  # schedule-free warms up itself
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


def effective_lrs(group_names: Sequence[str], optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`lr_effective/<group>`: the step size an adaptive optimizer takes (Prodigy's d x lr); {} for others."""
    groups = getattr(optimizer, "optimizer", optimizer).param_groups  # accelerate wraps the optimizer
    return {
        Metric.lr_effective(name): float(group["d"]) * float(group["lr"])
        for name, group in zip(group_names, groups)
        if "d" in group
    }


@contextlib.contextmanager
def averaged_weights(optimizer: Any) -> Iterator[None]:
    """Schedule-free optimizers: the averaged weights in the models (its eval mode) for validation, samples,
    best/ and the exported LoRA, then its training weights again; nothing for other optimizers.
    Checkpoints keep the training weights (with the optimizer state they resume exactly)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not (hasattr(inner, "eval") and hasattr(inner, "train")):
        yield
        return
    inner.eval()
    try:
        yield
    finally:
        inner.train()
