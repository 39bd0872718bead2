"""Where a training run executes: accelerate, the run folder, trackers, signals.

- `make_accelerator`: a fresh `Accelerator` for the run's precision (TF32 on CUDA).
- `check_new_run` / `lock_run` / `create_run_dir`: the run folder, a new one (never an existing one) or
  the resumed one, the same on every process; its lock (`sdlora.locks`, taken once, by the main
  process) and config.yaml. `runs/latest` moves only once the run has a checkpoint or a LoRA.
- `start_event`, `check_tracker` / `start_logging` / `log`: the start event, metrics.jsonl and the
  trackers (`--report-to`).
- `install_signal_handlers` / `stop_requested`: Ctrl-C and SIGTERM stop after the step, on every process,
  and save; a second one stops at once (`StopNow`).
"""

from __future__ import annotations

import math
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from sdlora import config as config_mod
from sdlora.config import Config
from sdlora.errors import ConfigError, RunError
from sdlora.fsutil import recover_folder, remove_stale_tmp
from sdlora.locks import acquire
from sdlora.run import BEST_DIR, CHECKPOINTS, CONFIG, LORA_DIR, METRICS, Metric
from sdlora.train import monitor

if TYPE_CHECKING:
    from sdlora.train.state import TrainState


def reset_accelerate_state() -> None:
    """Forget an earlier run's precision and accumulation settings (accelerate keeps them per process).

    accelerate refuses a second `Accelerator` with another mixed precision in the same process;
    a Python session or test suite that trains twice needs a clean slate. The process group
    (PartialState) is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def make_accelerator(cfg: Config) -> Any:
    """The run's `Accelerator`; a ConfigError for a precision this machine cannot run."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    reset_accelerate_state()
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
        # SDXL's first text encoder leaves its last layer unused (penultimate hidden states).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.lora.train_text_encoder)],
    )
    if cfg.train.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("--mixed-precision fp16 needs a CUDA GPU; on a CPU use bf16 or no")
    if accelerator.device.type == "cuda":  # TF32 matmuls: free speed for fp32 work on Ampere and newer
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def _name_taken(folder: Path) -> str:
    return f"{folder}: a run with this name exists; choose another --name, or continue it with --resume {folder}"


def check_new_run(cfg: Config, resume: Path | None) -> None:
    """A named new run whose folder exists fails now, before minutes of loading and encoding."""
    named = Path(cfg.run.runs_dir).expanduser() / cfg.run.name if cfg.run.name else None
    if resume is None and named is not None and named.exists():
        raise RunError(_name_taken(named))


def lock_run(folder: Path, accelerator: Any) -> Path | None:
    """Take the run folder's lock on the main process (the other processes share it); the same RunError
    (naming the holder's pid) on every process when another sdlora holds it. Returns the lock file."""
    message: list[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            message[0] = str(acquire(folder, "train"))
            # Temp files of writes a kill cut short; samples/ is left alone (`sdlora sample` takes no run lock).
            remove_stale_tmp(folder, recursive=False)
            remove_stale_tmp(folder / CHECKPOINTS)
            for name in (LORA_DIR, BEST_DIR):  # an export a kill cut short: finished or undone, never mixed
                recover_folder(folder / name)
        except RunError as exc:
            message[1] = str(exc)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(message)
    if message[1]:
        raise RunError(message[1])
    return Path(message[0]) if accelerator.is_main_process else None


def create_run_dir(cfg: Config, accelerator: Any, resume: Path | None) -> tuple[Path, Path | None]:
    """The run folder (the resumed one, or a new one, locked), the same on every process, and its lock
    file (main process; None elsewhere, and for a resumed run, locked earlier by `lock_run`). The
    main process writes its config.yaml."""
    run_dir = _run_dir(cfg, accelerator, resume)
    lock = lock_run(run_dir, accelerator) if resume is None else None
    if accelerator.is_main_process:
        config_mod.save_run_config(cfg, run_dir / CONFIG)
    return run_dir, lock


def _run_dir(cfg: Config, accelerator: Any, resume: Path | None) -> Path:
    from accelerate.utils import broadcast_object_list

    if resume is not None:
        return Path(resume).resolve()
    runs = Path(cfg.run.runs_dir).expanduser().resolve()
    message: list[Any] = [None, None]
    if accelerator.is_main_process:
        name = cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = runs / name
        if folder.exists() and cfg.run.name:
            message[1] = _name_taken(folder)
        else:
            runs.mkdir(parents=True, exist_ok=True)
            n = 2
            while True:
                try:
                    folder.mkdir()  # atomic: two runs started in the same second get two folders
                    break
                except FileExistsError:
                    if cfg.run.name:
                        message[1] = _name_taken(folder)
                        break
                    folder, n = runs / f"{name}-{n}", n + 1
            message[0] = str(folder)
    if accelerator.num_processes > 1:
        broadcast_object_list(message)
    if message[1]:
        raise RunError(message[1])
    return Path(message[0])


# ----------------------------------------------------------------------------- metrics and trackers


def check_finite(state: TrainState, loss: float) -> None:
    """Stop with one line when the step's loss is NaN or infinite (the run diverged)."""
    if math.isfinite(loss):
        return
    where = state.last_checkpoint or "none written yet"
    hint = "; or --mixed-precision bf16/no" if state.cfg.train.mixed_precision == "fp16" else ""
    raise RunError(
        f"step {state.step}: the loss is {loss} (training diverged); stopped. "
        f"Last good checkpoint: {where}. Try a lower --learning-rate{hint}"
    )


def step_event(step: int, total: int, record: dict[str, Any], elapsed: float) -> dict[str, Any]:
    """The `step` event the CLI's progress bar shows."""
    return {
        "event": "step",
        "step": step,
        "total": total,
        "loss": record[Metric.LOSS],
        "loss_mean": record[Metric.LOSS_MEAN],
        "lr": record[Metric.LR],
        "it_s": 1.0 / elapsed if elapsed > 0 else 0.0,
        "step_s": elapsed,
    }


def end_event(result: Any, interrupted: bool) -> dict[str, Any]:
    """The `done` (or `interrupted`) event: the TrainResult's fields and the command that continues the run."""
    return {
        "event": "interrupted" if interrupted else "done",
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()},
        "resume_command": f"sdlora train --resume {result.run_dir}",
    }


def start_event(state: TrainState, effective_batch: int) -> dict[str, Any]:
    """The run's plan, as the `start` event the CLI prints."""
    from sdlora.train.compiling import compiled_blocks
    from sdlora.train.fsdp import units as fsdp_units
    from sdlora.train.resolve import embedding_steps

    cfg, acc, tokens = state.cfg, state.accelerator, state.tokens
    return {
        "event": "start",
        "run_dir": str(state.run_dir),
        "total_steps": cfg.train.max_steps,
        "start_step": state.step,
        "effective_batch": effective_batch,
        "batch_size": cfg.train.batch_size,
        "num_processes": acc.num_processes,
        "gradient_accumulation": cfg.train.gradient_accumulation,
        "train_images": len(state.plan.instances),
        "val_images": len(state.val_data) if state.val_data is not None else 0,
        "arch": state.arch.name,
        "device": str(state.device),
        "mixed_precision": cfg.train.mixed_precision,
        "compile": compiled_blocks(state.unwrap(state.unet)),  # --compile: the UNet blocks compiled (0: off)
        "fsdp_units": fsdp_units(state.unet),  # FSDP: the sharded units (the blocks and the root; 0: off)
        "prediction_type": state.objective.prediction_type,
        "masked_loss": None
        if state.plan.instances.masks is None
        else {
            "masked": sum(m is not None for m in state.plan.instances.masks),
            "unmasked_weight": cfg.data.unmasked_weight,
        },
        "preservation": cfg.prior.kind,
        "token_embedding": None
        if tokens is None
        else {
            "token": tokens.token,
            "init_token": cfg.embedding.init_token,
            "until_step": embedding_steps(cfg),
        },
    }


def check_tracker(report_to: str) -> None:
    """`--report-to` a tracker that is not installed fails before anything loads."""
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb", "clearml": "clearml"}.get(report_to)
    if (
        module
        and importlib.util.find_spec(module) is None
        and not (module == "tensorboard" and importlib.util.find_spec("tensorboardX"))
    ):
        raise ConfigError(f"--report-to {report_to}: {module} is not installed (pip install {module})")


def start_logging(state: TrainState) -> None:
    """metrics.jsonl (appended to on resume) on the main process, and the trackers."""
    cfg, accelerator, run_dir = state.cfg, state.accelerator, state.run_dir
    if accelerator.is_main_process:
        state.metrics = monitor.MetricsWriter(run_dir / METRICS)
    if cfg.logging.report_to != "none":
        accelerator.project_configuration.set_directories(str(run_dir))
        accelerator.project_configuration.logging_dir = str(run_dir / "logs")
        accelerator.init_trackers("sdlora", config=_flat(cfg.to_dict()), init_kwargs={"wandb": {"name": run_dir.name}})


def log(state: TrainState, record: dict[str, Any]) -> None:
    """One metrics record (with its "step") to metrics.jsonl and the trackers."""
    if state.metrics is not None:
        state.metrics.write(record)
    if state.cfg.logging.report_to != "none":
        state.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def stop_logging(state: TrainState) -> None:
    if state.metrics is not None:
        state.metrics.close()
        state.metrics = None
    if state.cfg.logging.report_to != "none":
        state.accelerator.end_training()


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as the flat `section.key` dict trackers show (lists as comma-separated text)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


# ----------------------------------------------------------------------------- signals


STOPPING = "stopping after this step; saving a checkpoint and the LoRA (Ctrl-C again to stop without saving)"


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C / SIGTERM: training stops at once, without saving; `saved` says what is on disk."""

    def __init__(self, signum: int, run_dir: Path, checkpoint: Path | None):
        self.signum, self.run_dir, self.checkpoint = signum, run_dir, checkpoint
        super().__init__(self.saved)

    @property
    def saved(self) -> str:
        if self.checkpoint is None:
            return "stopped without saving: nothing saved (no checkpoint yet)"
        return (
            f"stopped without saving: the last checkpoint is {self.checkpoint.name}; "
            f"continue with: sdlora train --resume {self.run_dir}"
        )


def install_signal_handlers(state: TrainState) -> Callable[[], None]:
    """First Ctrl-C / SIGTERM: a `stopping` event, then finish the step, checkpoint, save the LoRA, stop.
    A second: `StopNow` at once (the exit code is 128 + the signal: 130 for Ctrl-C, 143 for SIGTERM).

    Returns the function that puts the previous handlers back.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if state.stop.is_set():
            raise StopNow(signum, state.run_dir, state.last_checkpoint)
        state.stop_signal = signum
        state.stop.set()
        state.emit({"event": "stopping", "signal": signal.Signals(signum).name, "message": STOPPING})

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def stop_requested(state: TrainState) -> bool:
    """Whether any process was asked to stop (all processes must agree, or the next all-reduce hangs)."""
    stop = state.stop.is_set()
    if state.accelerator.num_processes > 1:
        flag = torch.tensor(float(stop), device=state.device)
        stop = bool(state.accelerator.reduce(flag, reduction="sum").item() > 0)
    return stop
