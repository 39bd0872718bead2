"""Checkpoints: the state a run resumes from, in files sdlora writes and reads itself (no pickle).

`checkpoints/step-NNNNNN/` holds:
  lora_weights_<i>.safetensors   the trainable (LoRA) parameters of each trained model, float32
  optimizer.safetensors/.json    the optimizer's state_dict (train/statefile.py: tensors + structure)
  scheduler.json                 the LR scheduler's state_dict
  scaler.safetensors/.json       the fp16 grad scaler's state (fp16 only)
  embeddings.safetensors         the token's own vectors (pivotal tuning only)
  rng_<process>.safetensors/.json  each process's torch (and CUDA), Python and numpy RNG states
  config.yaml                    the run's config at that point
  sdlora.json                    step, best scores, running loss, config hash, and the manifest:
                                 every other file's name, size and sha256

Nothing here is loaded with pickle: a planted `*.pkl` or `*.bin` is never opened. A checkpoint is
written into `checkpoints/.step-NNNNNN.tmp/` and renamed to `step-NNNNNN/` once complete, so a
kill leaves either the whole checkpoint or a temp folder (removed by the next run); a failed write
(a full disk) removes its temp folder and names the file in one line. On resume the
newest checkpoint whose files match its manifest is loaded; each one skipped gets one warning line
saying why. With none, the run starts again from step 0 with its own config.yaml (and says so).

On resume the run's config.yaml is the base and the command line may change it. Values that
define what is trained (model, data, LoRA shape) must match the checkpoint: the checkpoint's
value wins, with a warning. Anything else (learning rate, --max-steps, logging) may change:
the command line wins, with a warning naming the key (train/resolve.py `resume_config`).
A resumed run drops the metrics logged after its checkpoint (a crashed run's tail), so its curve
has no duplicates.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdlora import config as config_mod
from sdlora.errors import RunError
from sdlora.events import OnEvent
from sdlora.fsutil import sha256_file, swap_folder, write_json, write_text, writing
from sdlora.run import CHECKPOINTS, CONFIG, METRICS, Metric, bad_metrics_lines, parse_metrics, point_latest
from sdlora.train import ema, fsdp
from sdlora.train.optim import apply_config
from sdlora.train.statefile import load_state, save_state

if TYPE_CHECKING:
    from sdlora.train.state import TrainState

STATE_JSON = "sdlora.json"
FORMAT = 2  # 1: accelerate's save_state (pickle files), no longer read
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMP = re.compile(r"^\.step-\d+(\.old)?\.tmp$")


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:06d}"


def temp_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f".step-{step:06d}.tmp"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoint folders (renamed into place, so written to the end), oldest first."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def remove_temp(run_dir: Path) -> list[Path]:
    """Remove the temp folders of checkpoint writes that never finished (a kill); the ones removed."""
    folder = run_dir / CHECKPOINTS
    removed = []
    if folder.is_dir():
        for child in folder.iterdir():
            if _TEMP.match(child.name):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def problem(folder: Path) -> str | None:
    """Why the checkpoint in `folder` cannot be loaded (missing, damaged or old-format files), or None."""
    path = folder / STATE_JSON
    if not path.is_file():
        return f"incomplete (no {STATE_JSON})"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{STATE_JSON} is damaged"
    if not isinstance(saved, dict) or not isinstance(saved.get("step"), int):
        return f"{STATE_JSON} is damaged"
    if not isinstance(saved.get("files"), dict):
        return "written by an older sdlora (accelerate's pickle files, which sdlora no longer loads)"
    match = _STEP_DIR.match(folder.name)
    if match and int(match.group(1)) != saved["step"]:
        return f"{STATE_JSON} says step {saved['step']}"
    for name, entry in saved["files"].items():
        file = folder / name
        if Path(name).name != name or not isinstance(entry, dict):
            return f"{STATE_JSON} is damaged"
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry.get("bytes"):
            return f"{name} is {size} bytes, {entry.get('bytes')} were written (damaged or cut short)"
        if entry.get("sha256") and sha256_file(file) != entry["sha256"]:
            return f"{name} is damaged (its checksum differs)"
    return None


def newest_valid(run_dir: Path, emit: OnEvent) -> tuple[int, Path] | None:
    """The newest loadable checkpoint; one warning per newer one skipped, with the reason."""
    for step, folder in reversed(list_checkpoints(run_dir)):
        why = problem(folder)
        if why is None:
            return step, folder
        emit({"event": "warning", "message": f"{folder}: skipped, {why}"})
    return None


def prune(run_dir: Path, keep: int, step: int) -> None:
    """Keep the newest `keep` checkpoints up to `step` (the one just written); newer ones are stale (a
    damaged one skipped on resume) and go too, so they never outlive a good one."""
    found = list_checkpoints(run_dir)
    older = [folder for s, folder in found if s <= step]
    for folder in older[:-keep] + [folder for s, folder in found if s > step]:
        shutil.rmtree(folder, ignore_errors=True)


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _models(state: TrainState) -> list[torch.nn.Module]:
    return [state.unwrap(model) for model in (state.unet, *state.text_encoders)]


# ----------------------------------------------------------------------------- writing


def rng_state() -> dict[str, Any]:
    import numpy as np

    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_state(states: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _write_main(state: TrainState, folder: Path, optimizer_state: dict[str, Any], ema_state: Any) -> None:
    """The main process's files: LoRA weights, optimizer, scheduler, scaler, token vectors, config.
    Under FSDP the caller has the model's weights gathered, and the optimizer's and EMA's state whole."""
    from safetensors.torch import save_file

    for i, model in enumerate(_models(state)):
        save_file(trainable_state(model), str(folder / f"lora_weights_{i}.safetensors"))
    save_state(folder, "optimizer", optimizer_state)
    (folder / "scheduler.json").write_text(json.dumps(state.lr_scheduler.state_dict()) + "\n", encoding="utf-8")
    scaler = getattr(state.accelerator, "scaler", None)
    if scaler is not None:
        save_state(folder, "scaler", scaler.state_dict())
    if state.tokens is not None:
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in state.tokens.state_dict().items()},
            str(folder / "embeddings.safetensors"),
        )
    ema.save(folder, ema_state)
    config_mod.save_run_config(state.cfg, folder / CONFIG)


def _seal(state: TrainState, folder: Path) -> None:
    """sdlora.json, written last: the step, the scores, and the manifest of every file beside it."""
    files = {
        child.name: {"bytes": child.stat().st_size, "sha256": sha256_file(child)}
        for child in sorted(folder.iterdir())
        if child.is_file() and child.name != STATE_JSON
    }
    write_json(
        folder / STATE_JSON,
        {
            "format": FORMAT,
            "step": state.step,
            "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
            "best_dino": state.best_dino if math.isfinite(state.best_dino) else None,
            "config_hash": config_mod.config_hash(state.cfg),
            "loss_mean": state.loss_mean.state_dict(),
            "num_processes": state.accelerator.num_processes,
            "files": files,
        },
    )


def save_checkpoint(state: TrainState) -> Path:
    """Write the checkpoint of `state.step` (temp folder, then rename); keeps the newest --keep-checkpoints."""
    acc, run_dir = state.accelerator, state.run_dir
    final, tmp = step_dir(run_dir, state.step), temp_dir(run_dir, state.step)
    if state.is_main:
        remove_temp(run_dir)
    try:
        with writing(final, tmp=tmp):  # a full disk: one line naming the file (under the final folder's name)
            if state.is_main:
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            save_state(tmp, f"rng_{acc.process_index}", rng_state())
            # FSDP: every process gathers the shards (collective); the main process writes them whole.
            optimizer_state = fsdp.full_tensors(state.optimizer.state_dict())
            ema_state = fsdp.full_tensors(state.ema.state_dict()) if state.ema is not None else None
            with fsdp.gathered(state.unet):
                if state.is_main:
                    _write_main(state, tmp, optimizer_state, ema_state)
            acc.wait_for_everyone()
            if state.is_main:
                _seal(state, tmp)
                swap_folder(tmp, final)  # over an older copy of the same step
    except Exception:
        if state.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves nothing on the full disk
        raise
    if state.is_main:
        prune(run_dir, state.cfg.checkpoint.keep_checkpoints, state.step)
        point_latest(run_dir)  # the run has something to resume from
        state.emit({"event": "checkpoint", "step": state.step, "path": str(final)})
    state.last_checkpoint = final
    acc.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------- loading


def _choose(state: TrainState) -> tuple[int, Path] | None:
    """The checkpoint to resume from, chosen by the main process and the same on every process."""
    chosen: list[Any] = [None]
    if state.is_main:
        for removed in remove_temp(state.run_dir):
            state.emit({"event": "warning", "message": f"{removed}: removed an unfinished checkpoint write"})
        found = newest_valid(state.run_dir, state.emit)
        chosen[0] = None if found is None else (found[0], str(found[1]))
    if state.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(chosen)
    return None if chosen[0] is None else (int(chosen[0][0]), Path(chosen[0][1]))


def _load_lora(models: list[torch.nn.Module], folder: Path) -> None:
    from safetensors.torch import load_file

    for i, module in enumerate(models):
        path = folder / f"lora_weights_{i}.safetensors"
        tensors = load_file(str(path))
        params = dict(module.named_parameters())
        unknown = set(tensors) - set(params)
        if unknown:
            raise RunError(f"{path}: does not match this model (e.g. {sorted(unknown)[0]})")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(fsdp.like(value.to(params[name].dtype), params[name]))


def load_checkpoint(state: TrainState) -> None:
    """The run's newest valid checkpoint into `state`, with the config's learning rates and optimizer
    settings; without one, the run starts again from step 0 (a warning says so)."""
    from safetensors.torch import load_file

    chosen = _choose(state)
    if chosen is None:
        state.emit(
            {
                "event": "warning",
                "message": f"{state.run_dir}: no checkpoint to resume from; "
                f"training again from step 0 with its {CONFIG}",
            }
        )
        _truncate_metrics(state, 0)
        return
    step, folder = chosen
    saved = read_state(folder)
    unlisted = sorted(c.name for c in folder.iterdir() if c.name not in saved["files"] and c.name != STATE_JSON)
    if unlisted:
        state.emit(
            {
                "event": "warning",
                "message": f"{folder}: ignoring files sdlora did not write there: {', '.join(unlisted)}",
            }
        )
    if saved.get("config_hash") != config_mod.config_hash(state.cfg):
        state.emit(
            {
                "event": "warning",
                "message": f"{folder}: the config differs from the checkpoint's "
                "(see the warnings above); continuing with the resolved config",
            }
        )
    _load_lora(_models(state), folder)
    state.optimizer.load_state_dict(fsdp.shard_optimizer_state(load_state(folder, "optimizer"), state.optimizer))
    state.lr_scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text(encoding="utf-8")))
    scaler = getattr(state.accelerator, "scaler", None)
    if scaler is not None and (folder / "scaler.json").is_file():
        scaler.load_state_dict(load_state(folder, "scaler"))
    if state.tokens is not None:
        state.tokens.load_state_dict(load_file(str(folder / "embeddings.safetensors")))
    rng = f"rng_{state.accelerator.process_index}"
    if (folder / f"{rng}.json").is_file():
        set_rng_state(load_state(folder, rng))
    else:
        state.emit({"event": "warning", "message": f"{folder}: no RNG state for process {rng[4:]}; dropout differs"})
    ema.load(state, folder)
    apply_config(state.cfg, state.optimizer, state.lr_scheduler, list(state.param_groups))
    state.step = int(saved["step"])
    state.best_val_loss = saved["best_val_loss"] if saved.get("best_val_loss") is not None else math.inf
    state.best_dino = saved["best_dino"] if saved.get("best_dino") is not None else -math.inf
    if saved.get("loss_mean"):
        state.loss_mean.load_state_dict(saved["loss_mean"])
    state.last_checkpoint = folder
    _truncate_metrics(state, state.step)
    state.emit({"event": "resumed", "step": state.step, "path": str(folder)})


def _truncate_metrics(state: TrainState, step: int) -> None:
    if state.is_main:
        problem = truncate_metrics(state.run_dir / METRICS, step)
        if problem:
            state.emit({"event": "warning", "message": f"{problem}; dropped them"})


def truncate_metrics(path: Path, step: int) -> str | None:
    """Drop metrics logged after the checkpoint (a crashed run's tail), so the resumed curve has no
    duplicates; bad lines (`sdlora.run.parse_metrics`) go too. Returns the warning naming them, if any."""
    if not path.is_file():
        return None
    good, bad = parse_metrics(path)
    write_text(path, "".join(line for line, record in good if record[Metric.STEP] <= step))
    return bad_metrics_lines(path, bad) if bad else None
