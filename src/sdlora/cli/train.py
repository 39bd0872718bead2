"""`sdlora train`: train a LoRA on a prepared dataset; writes runs/<name> and points runs/latest at it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sdlora import config as config_mod
from sdlora.cli._common import console, err_console
from sdlora.config import field_help as _h
from sdlora.errors import ConfigError

EPILOG = """\
Examples (the dataset defaults to ./dataset, the run goes to ./runs/<time>):

  sdlora train

  sdlora train --model stabilityai/stable-diffusion-xl-base-1.0 --config sdxl --mixed-precision bf16

  sdlora train --max-steps 1500 --rank 32 --validation-prompt "{token} {class} on a beach"

  sdlora train --config runs/20260101-120000/config.yaml        # repeat a run

  sdlora train --resume latest --max-steps 2000                # continue the newest run

  sdlora train --score-every 200 --best-by dino                # DINO of the samples; best/ by DINO (GPU)

  sdlora train --num-processes 2                               # data parallel on 2 GPUs

  sdlora train --model tiny-sd --max-steps 20 lora.rank=4 train.seed=1
"""

# CLI parameter -> config key. Defaults live in config.py only: an option left out is `None` here.
KEYS = {
    "model": "model.name",
    "revision": "model.revision",
    "variant": "model.variant",
    "vae": "model.vae",
    "dataset": "data.dataset",
    "resolution": "data.resolution",
    "class_word": "data.class_word",
    "random_flip": "data.random_flip",
    "cache": "data.cache",
    "rank": "lora.rank",
    "alpha": "lora.alpha",
    "dropout": "lora.dropout",
    "target_modules": "lora.target_modules",
    "train_text_encoder": "lora.train_text_encoder",
    "dora": "lora.dora",
    "train_token_embedding": "embedding.train",
    "init_token": "embedding.init_token",
    "embedding_lr": "embedding.learning_rate",
    "embedding_steps_fraction": "embedding.steps_fraction",
    "max_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "gradient_accumulation": "train.gradient_accumulation",
    "learning_rate": "train.learning_rate",
    "text_encoder_lr": "train.text_encoder_lr",
    "optimizer": "train.optimizer",
    "lr_scheduler": "train.lr_scheduler",
    "lr_warmup_steps": "train.lr_warmup_steps",
    "max_grad_norm": "train.max_grad_norm",
    "mixed_precision": "train.mixed_precision",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "seed": "train.seed",
    "snr_gamma": "train.snr_gamma",
    "noise_offset": "train.noise_offset",
    "class_prompt": "prior.class_prompt",
    "num_class_images": "prior.num_class_images",
    "prior_loss_weight": "prior.prior_loss_weight",
    "class_dir": "prior.class_dir",
    "validate_every": "validation.validate_every",
    "validation_prompt": "validation.prompts",
    "validation_steps": "validation.steps",
    "validation_images": "validation.num_images",
    "score_every": "validation.score_every",
    "dino_model": "validation.dino_model",
    "best_by": "validation.best_by",
    "log_every": "logging.log_every",
    "report_to": "logging.report_to",
    "checkpoint_every": "checkpoint.checkpoint_every",
    "keep_checkpoints": "checkpoint.keep_checkpoints",
    "runs_dir": "run.runs_dir",
    "name": "run.name",
}


def _opt(*names: str, key: str, **kwargs: Any) -> Any:
    return typer.Option(*names, help=_h(key), **kwargs)


def train(
    overrides: Annotated[
        Optional[list[str]],
        typer.Argument(
            metavar="[KEY=VALUE]...", help="Config overrides in dotted form, e.g. lora.rank=8 train.seed=1."
        ),
    ] = None,
    config: Annotated[
        Optional[str],
        typer.Option(
            "--config",
            "-c",
            help="YAML config (e.g. a run's config.yaml) or a preset: sd15, sdxl, tiny. Flags override it.",
        ),
    ] = None,
    resume: Annotated[
        Optional[str],
        typer.Option("--resume", help="Continue a run from its newest checkpoint: a run folder or 'latest'."),
    ] = None,
    num_processes: Annotated[
        int, typer.Option("--num-processes", min=1, help="Data-parallel processes (one per GPU; gloo on a CPU).")
    ] = 1,
    accelerate_config: Annotated[
        Optional[Path],
        typer.Option(
            "--accelerate-config", help="accelerate config file (FSDP, DeepSpeed, multi-node); implies a launch."
        ),
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the resolved config and exit (checks it; trains nothing).")
    ] = False,
    model: Annotated[Optional[str], _opt("--model", "-m", key="model.name")] = None,
    revision: Annotated[Optional[str], _opt("--revision", key="model.revision")] = None,
    variant: Annotated[Optional[str], _opt("--variant", key="model.variant")] = None,
    vae: Annotated[Optional[str], _opt("--vae", key="model.vae")] = None,
    dataset: Annotated[Optional[str], _opt("--dataset", "-d", key="data.dataset")] = None,
    resolution: Annotated[Optional[int], _opt("--resolution", key="data.resolution")] = None,
    class_word: Annotated[Optional[str], _opt("--class-word", key="data.class_word")] = None,
    random_flip: Annotated[Optional[bool], _opt("--random-flip/--no-random-flip", key="data.random_flip")] = None,
    cache: Annotated[Optional[bool], _opt("--cache/--no-cache", key="data.cache")] = None,
    rank: Annotated[Optional[int], _opt("--rank", key="lora.rank")] = None,
    alpha: Annotated[Optional[float], _opt("--alpha", key="lora.alpha")] = None,
    dropout: Annotated[Optional[float], _opt("--dropout", key="lora.dropout")] = None,
    target_modules: Annotated[Optional[str], _opt("--target-modules", key="lora.target_modules")] = None,
    train_text_encoder: Annotated[
        Optional[bool], _opt("--train-text-encoder/--no-train-text-encoder", key="lora.train_text_encoder")
    ] = None,
    dora: Annotated[Optional[bool], _opt("--dora/--no-dora", key="lora.dora")] = None,
    train_token_embedding: Annotated[
        Optional[bool], _opt("--train-token-embedding/--no-train-token-embedding", key="embedding.train")
    ] = None,
    init_token: Annotated[Optional[str], _opt("--init-token", key="embedding.init_token")] = None,
    embedding_lr: Annotated[Optional[float], _opt("--embedding-lr", key="embedding.learning_rate")] = None,
    embedding_steps_fraction: Annotated[
        Optional[float], _opt("--embedding-steps-fraction", key="embedding.steps_fraction")
    ] = None,
    max_steps: Annotated[Optional[int], _opt("--max-steps", key="train.max_steps")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", key="train.batch_size")] = None,
    gradient_accumulation: Annotated[
        Optional[int], _opt("--gradient-accumulation", key="train.gradient_accumulation")
    ] = None,
    learning_rate: Annotated[Optional[float], _opt("--learning-rate", "--lr", key="train.learning_rate")] = None,
    text_encoder_lr: Annotated[Optional[float], _opt("--text-encoder-lr", key="train.text_encoder_lr")] = None,
    optimizer: Annotated[Optional[str], _opt("--optimizer", key="train.optimizer")] = None,
    lr_scheduler: Annotated[Optional[str], _opt("--lr-scheduler", key="train.lr_scheduler")] = None,
    lr_warmup_steps: Annotated[Optional[int], _opt("--lr-warmup-steps", key="train.lr_warmup_steps")] = None,
    max_grad_norm: Annotated[Optional[float], _opt("--max-grad-norm", key="train.max_grad_norm")] = None,
    mixed_precision: Annotated[Optional[str], _opt("--mixed-precision", key="train.mixed_precision")] = None,
    gradient_checkpointing: Annotated[
        Optional[bool], _opt("--gradient-checkpointing/--no-gradient-checkpointing", key="train.gradient_checkpointing")
    ] = None,
    seed: Annotated[Optional[int], _opt("--seed", key="train.seed")] = None,
    snr_gamma: Annotated[Optional[float], _opt("--snr-gamma", key="train.snr_gamma")] = None,
    noise_offset: Annotated[Optional[float], _opt("--noise-offset", key="train.noise_offset")] = None,
    class_prompt: Annotated[Optional[str], _opt("--class-prompt", key="prior.class_prompt")] = None,
    num_class_images: Annotated[Optional[int], _opt("--num-class-images", key="prior.num_class_images")] = None,
    prior_loss_weight: Annotated[Optional[float], _opt("--prior-loss-weight", key="prior.prior_loss_weight")] = None,
    class_dir: Annotated[Optional[str], _opt("--class-dir", key="prior.class_dir")] = None,
    validate_every: Annotated[Optional[int], _opt("--validate-every", key="validation.validate_every")] = None,
    validation_prompt: Annotated[Optional[list[str]], _opt("--validation-prompt", key="validation.prompts")] = None,
    validation_steps: Annotated[Optional[int], _opt("--validation-steps", key="validation.steps")] = None,
    validation_images: Annotated[Optional[int], _opt("--validation-images", key="validation.num_images")] = None,
    score_every: Annotated[Optional[int], _opt("--score-every", key="validation.score_every")] = None,
    dino_model: Annotated[Optional[str], _opt("--dino-model", key="validation.dino_model")] = None,
    best_by: Annotated[Optional[str], _opt("--best-by", key="validation.best_by")] = None,
    log_every: Annotated[Optional[int], _opt("--log-every", key="logging.log_every")] = None,
    report_to: Annotated[Optional[str], _opt("--report-to", key="logging.report_to")] = None,
    checkpoint_every: Annotated[Optional[int], _opt("--checkpoint-every", key="checkpoint.checkpoint_every")] = None,
    keep_checkpoints: Annotated[Optional[int], _opt("--keep-checkpoints", key="checkpoint.keep_checkpoints")] = None,
    runs_dir: Annotated[Optional[str], _opt("--runs-dir", key="run.runs_dir")] = None,
    name: Annotated[Optional[str], _opt("--name", key="run.name")] = None,
) -> None:
    """Train a LoRA on a prepared dataset (SD 1.x or SDXL) and write a run folder."""
    params = dict(locals())
    flags = {KEYS[k]: v for k, v in params.items() if k in KEYS and v is not None}
    dotted = list(overrides or [])
    from sdlora.train import loop, resolve

    # The config is resolved (and checked) here, once, also when N processes will run it.
    resume_dir = None
    if resume is not None:
        layers, sources = [], []
        if config is not None:
            layers.append(config_mod.read_yaml(config))
            sources.append(config)
        layers += [config_mod.flat_to_nested(flags), config_mod.parse_dotted(dotted)]
        sources += ["command line", "overrides"]
        resume_dir, cfg, warnings = resolve.resume_run(
            resume, layers, tuple(sources), runs_dir=flags.get("run.runs_dir", "runs")
        )
        for warning in warnings:
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    else:
        cfg = config_mod.load_config(config, flags, dotted)
    if print_config:
        typer.echo(config_mod.config_yaml(cfg), nl=False)
        return
    if num_processes > 1 or accelerate_config is not None:
        from sdlora.train.launch import in_launched_process

        if not in_launched_process():
            _relaunch(config, resume, flags, dotted, num_processes, accelerate_config)
            return
    _quiet_libraries()
    renderer = _Renderer()
    try:
        result = loop.run_training(cfg, resume=resume_dir, on_event=renderer)
    finally:
        renderer.close()
    if result.interrupted:
        console.print(
            f"[yellow]stopped at step {result.steps}[/]; checkpoint and LoRA saved. "
            f"Continue with: sdlora train --resume {result.run_dir}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130)


def _relaunch(
    config: str | None,
    resume: str | None,
    flags: dict[str, Any],
    dotted: list[str],
    num_processes: int,
    accelerate_config: Path | None,
) -> None:
    """Run this same command as N processes (accelerate's launcher); the run name is fixed here first."""
    import json

    import torch

    from sdlora.train.launch import launch_processes

    argv = ["train"]
    if config is not None:
        argv += ["--config", str(Path(config).resolve()) if Path(config).exists() else config]
    if resume is not None:
        argv += ["--resume", resume]
    elif "run.name" not in flags and not any(o.startswith("run.name=") for o in dotted):
        flags = {**flags, "run.name": time.strftime("%Y%m%d-%H%M%S")}  # every worker writes to the same folder
    argv += [f"{key}={json.dumps(value)}" for key, value in flags.items()] + dotted
    code = launch_processes(argv, num_processes, config_file=accelerate_config, cpu=not torch.cuda.is_available())
    if code:
        raise typer.Exit(code)


def _quiet_libraries() -> None:
    """sdlora reports what matters itself; library chatter (dtype notes, deprecations) only with --debug."""
    import os

    if os.environ.get("SDLORA_DEBUG"):
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


class _Renderer:
    """Draws the core's events: one line at start, a rich progress bar, warnings, a summary."""

    def __init__(self) -> None:
        self.progress: Any = None
        self.task: Any = None
        self.bars: dict[str, Any] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "warning":
            self._print(f"[yellow]warning:[/] {event['message']}")
        elif kind == "progress":
            self._bar(event["what"], event["done"], event["total"])
        elif kind == "cache":
            self._print(f"{event['what']}: {event['encoded']} encoded, {event['reused']} from the cache")
        elif kind == "start":
            self._start(event)
        elif kind == "step" and self.progress is not None:
            self.progress.update(
                self.task,
                completed=event["step"],
                description=f"step {event['step']}/{event['total']}",
                loss=f"{event['loss']:.4f}",
                lr=f"{event['lr']:.2e}",
                its=f"{event['it_s']:.2f}",
            )
        elif kind == "validation":
            parts = [f"val loss {event['val_loss']:.4f}"] if event["val_loss"] is not None else []
            if event.get("dino") is not None:
                parts.append(f"DINO {event['dino']:.3f}")
            val = (", ".join(parts) or "validation") + (" (best)" if event["best"] else "")
            where = f", samples in {event['samples_dir']}" if event.get("samples_dir") else ""
            self._print(f"step {event['step']}: {val}{where}")
        elif kind == "checkpoint":
            self._print(f"step {event['step']}: checkpoint {event['path']}", dim=True)
        elif kind == "resumed":
            self._print(f"resumed at step {event['step']} from {event['path']}")
        elif kind == "done":
            self.close()
            best = f"{event['best_val_loss']:.4f}" if event.get("best_val_loss") is not None else "n/a"
            if event.get("best_dino") is not None:
                best += f", best DINO {event['best_dino']:.3f}"
            console.print(
                f"[green]done:[/] {event['steps']} steps in {event['elapsed_s']:.0f} s, best val loss {best}\n"
                f"  LoRA: {event['lora_dir']}\n  run:  {event['run_dir']}",
                highlight=False,
                soft_wrap=True,
            )

    def _start(self, event: dict[str, Any]) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.close()
        console.print(
            f"training {event['arch']} on {event['train_images']} images ({event['val_images']} val) -> {event['run_dir']}\n"
            f"  effective batch {event['effective_batch']} = {event['batch_size']} x {event['num_processes']} process(es)"
            f" x {event['gradient_accumulation']} accumulation; {event['total_steps']} steps"
            + (f" (from step {event['start_step']})" if event["start_step"] else "")
            + f"; {event['device']}, precision {event['mixed_precision']}",
            highlight=False,
            soft_wrap=True,
        )
        embedding = event.get("token_embedding")
        if embedding:
            console.print(
                f"  token {embedding['token']}: its own embedding, from {embedding['init_token']!r}, "
                f"trained until step {embedding['until_step']} (saved as lora/embeddings.safetensors)",
                highlight=False,
                soft_wrap=True,
            )
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[its]} it/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            f"step {event['start_step']}/{event['total_steps']}",
            total=event["total_steps"],
            completed=event["start_step"],
            loss="-",
            lr="-",
            its="-",
        )

    def _bar(self, what: str, done: int, total: int) -> None:
        from rich.progress import Progress

        if what not in self.bars:
            bar = Progress(console=err_console, transient=True)
            bar.start()
            self.bars[what] = (bar, bar.add_task(what, total=total))
        bar, task = self.bars[what]
        bar.update(task, completed=done, total=total)
        if done >= total:
            bar.stop()

    def _print(self, text: str, dim: bool = False) -> None:
        target = self.progress.console if self.progress is not None else err_console
        target.print(f"[dim]{text}[/]" if dim else text, highlight=False, soft_wrap=True)

    def close(self) -> None:
        for bar, _ in self.bars.values():
            bar.stop()
        self.bars.clear()
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _check_flags_cover_config() -> None:
    """Drift guard: every CLI parameter maps to a real config key."""
    known = set(config_mod.all_keys())
    stray = [key for key in KEYS.values() if key not in known]
    if stray:
        raise ConfigError(f"sdlora.cli.train maps flags to unknown config keys: {stray}")


_check_flags_cover_config()
