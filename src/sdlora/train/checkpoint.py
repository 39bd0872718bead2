"""Checkpoints: accelerate state holding only the LoRA weights, plus what resume needs to know.

`checkpoints/step-NNNNNN/` holds accelerate's optimizer, LR scheduler, RNG (and fp16 scaler)
states, `lora_weights_<i>.safetensors` (the trainable parameters of each trained model, in
float32: a few MB instead of the full UNet accelerate would write), `sdlora.json` (step, best
val loss, config hash, running loss) and the run's `config.yaml` at that point.

On resume the run's config.yaml is the base and the command line may change it. Values that
define what is trained (model, data, LoRA shape) must match the checkpoint: the checkpoint's
value wins, with a warning. Anything else (learning rate, --max-steps, logging) may change:
the command line wins, with a warning naming the key (train/resolve.py `resume_config`).

`save_checkpoint` / `load_checkpoint` write and restore a training state; a resumed run drops the
metrics logged after its checkpoint (a crashed run's tail), so its curve has no duplicates.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from sdlora import config as config_mod
from sdlora.errors import RunError
from sdlora.fsutil import write_json, write_text
from sdlora.run import CONFIG, METRICS, Metric
from sdlora.train.optim import apply_config
from sdlora.train.runtime import saved_config

if TYPE_CHECKING:
    from sdlora.train.loop import TrainState

CHECKPOINTS = "checkpoints"
STATE_JSON = "sdlora.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of complete checkpoints, oldest first."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_JSON).is_file():  # sdlora.json is written last: complete
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path]:
    found = list_checkpoints(run_dir)
    if not found:
        raise RunError(f"{run_dir}: no checkpoint to resume from (train with --checkpoint-every N to write them)")
    return found[-1]


def prune(run_dir: Path, keep: int) -> None:
    for _, folder in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def write_state(folder: Path, state: dict[str, Any], cfg: config_mod.Config) -> None:
    config_mod.save_config(cfg, folder / CONFIG)
    write_json(folder / STATE_JSON, state)  # last: its presence marks the checkpoint complete


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def register_hooks(accelerator: Any, unwrap: Callable[[Any], torch.nn.Module]) -> None:
    """Make accelerate save and load only the trainable (LoRA) parameters of each prepared model."""
    from safetensors.torch import load_file, save_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                save_file(trainable_state(unwrap(model)), str(Path(output_dir) / f"lora_weights_{i}.safetensors"))
        weights.clear()  # keep accelerate from writing the full frozen model

    def load_hook(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            module = unwrap(model)
            tensors = load_file(str(Path(input_dir) / f"lora_weights_{i}.safetensors"))
            params = dict(module.named_parameters())
            unknown = set(tensors) - set(params)
            if unknown:
                raise RunError(f"{input_dir}: checkpoint does not match this model (e.g. {sorted(unknown)[0]})")
            with torch.no_grad():
                for name, value in tensors.items():
                    params[name].copy_(value.to(params[name].dtype))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def register(accelerator: Any, lr_scheduler: Any, tokens: Any = None) -> None:
    """What accelerate's checkpoints hold besides the prepared models and optimizer: the LR scheduler, the
    token's vectors (beside the LoRA), and only the trainable parameters of each model."""
    accelerator.register_for_checkpointing(lr_scheduler)
    if tokens is not None:
        accelerator.register_for_checkpointing(tokens)
    register_hooks(accelerator, accelerator.unwrap_model)


def save_checkpoint(state: TrainState) -> Path:
    """accelerate state (LoRA, optimizer, scheduler, RNG) + sdlora.json; keeps the newest --keep-checkpoints."""
    folder = step_dir(state.run_dir, state.step)
    state.accelerator.save_state(str(folder))
    if state.is_main:
        write_state(
            folder,
            {
                "step": state.step,
                "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
                "best_dino": state.best_dino if math.isfinite(state.best_dino) else None,
                "config_hash": config_mod.config_hash(state.cfg),
                "loss_mean": state.loss_mean.state_dict(),
            },
            saved_config(state.cfg),
        )
        prune(state.run_dir, state.cfg.checkpoint.keep_checkpoints)
        state.emit({"event": "checkpoint", "step": state.step, "path": str(folder)})
    state.last_checkpoint = folder
    state.accelerator.wait_for_everyone()
    return folder


def load_checkpoint(state: TrainState) -> None:
    """The run's newest checkpoint into `state`, with the config's learning rates and optimizer settings."""
    step, folder = latest_checkpoint(state.run_dir)
    saved = read_state(folder)
    if saved.get("config_hash") != config_mod.config_hash(state.cfg):
        state.emit(
            {
                "event": "warning",
                "message": f"{folder}: the config differs from the checkpoint's "
                "(see the warnings above); continuing with the resolved config",
            }
        )
    state.accelerator.load_state(str(folder))
    apply_config(state.cfg, state.optimizer, state.lr_scheduler, list(state.param_groups))
    state.step = int(saved["step"])
    state.best_val_loss = saved["best_val_loss"] if saved.get("best_val_loss") is not None else math.inf
    state.best_dino = saved["best_dino"] if saved.get("best_dino") is not None else -math.inf
    if saved.get("loss_mean"):
        state.loss_mean.load_state_dict(saved["loss_mean"])
    state.last_checkpoint = folder
    if state.is_main:
        truncate_metrics(state.run_dir / METRICS, state.step)
    state.emit({"event": "resumed", "step": state.step, "path": str(folder)})


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint (a crashed run's tail), so the resumed curve has no duplicates."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            continue
        try:
            if json.loads(line).get(Metric.STEP, 0) > step:
                continue
        except json.JSONDecodeError:
            continue
        keep.append(line)
    write_text(path, "".join(keep))
