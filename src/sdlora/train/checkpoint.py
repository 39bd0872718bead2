"""Checkpoints: accelerate state holding only the LoRA weights, plus what resume needs to know.

`checkpoints/step-NNNNNN/` holds accelerate's optimizer, LR scheduler, RNG (and fp16 scaler)
states, `lora_weights_<i>.safetensors` (the trainable parameters of each trained model, in
float32: a few MB instead of the full UNet accelerate would write), `sdlora.json` (step, best
val loss, config hash, running loss) and the run's `config.yaml` at that point.

On resume the run's config.yaml is the base and the command line may change it. Values that
define what is trained (model, data, LoRA shape) must match the checkpoint: the checkpoint's
value wins, with a warning. Anything else (learning rate, --max-steps, logging) may change:
the command line wins, with a warning naming the key.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from sdlora import config as config_mod
from sdlora.errors import RunError
from sdlora.fsutil import write_json
from sdlora.run import CONFIG

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
