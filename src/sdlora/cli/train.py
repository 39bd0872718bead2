"""`sdlora train`: train a LoRA on a prepared dataset; writes runs/<name> and points runs/latest at it."""

from __future__ import annotations

import inspect
import os
import statistics
import time
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from sdlora import config as config_mod
from sdlora.cli._common import console, err_console, refresh_report
from sdlora.errors import ConfigError

EPILOG = """\
Examples (the dataset defaults to ./dataset, the run goes to ./runs/<time>):

  sdlora train --config sdxl --max-steps 1500 --rank 32

  sdlora train --resume latest --max-steps 2000

  sdlora train --model tiny-sd --print-config lora.rank=4 train.seed=1
"""

# The Distributed panel holds the verb's launch options; the config fields bring the other panels.
DISTRIBUTED = "Distributed"


def verb_options(
    overrides: Annotated[
        Optional[list[str]],
        typer.Argument(metavar="KEY=VALUE", hidden=True, show_default=False),  # in the verb's help text
    ] = None,
    config: Annotated[
        Optional[str],
        typer.Option(
            "--config",
            "-c",
            metavar="FILE",
            show_default=False,
            help="YAML config (e.g. a run's config.yaml) or a preset: sd15, sdxl, tiny. Flags override it.",
        ),
    ] = None,
    resume: Annotated[
        Optional[str],
        typer.Option(
            "--resume",
            metavar="RUN",
            show_default=False,
            help="Continue a run (a folder or 'latest') from its newest complete checkpoint; without one, from step 0.",
        ),
    ] = None,
    print_config: Annotated[
        bool,
        typer.Option(
            "--print-config",
            metavar="",
            show_default=False,
            help="Print the resolved config and exit (checks it; trains nothing).",
        ),
    ] = False,
    num_processes: Annotated[
        Optional[int],
        typer.Option(
            "--num-processes",
            metavar="N",
            rich_help_panel=DISTRIBUTED,
            show_default=False,
            help="Data-parallel processes (one per GPU; gloo on a CPU). (default: 1, or --accelerate-config's)",
        ),
    ] = None,
    accelerate_config: Annotated[
        Optional[Path],
        typer.Option(
            "--accelerate-config",
            metavar="FILE",
            show_default=False,
            rich_help_panel=DISTRIBUTED,
            help="accelerate config file (distributed_type: FSDP shards the denoiser); implies a launch.",
        ),
    ] = None,
) -> None:
    """The options of `sdlora train` that are not config fields (declared once, here; `train` takes them)."""


FIELDS = config_mod.options()
_OFF = "__off"  # suffix of the parameter behind a bool field's --no- flag


def _param_name(option: config_mod.FieldOption) -> str:
    return option.key.replace(".", "__")  # lora.rank -> lora__rank: never one of the verb's own names


def field_parameters(option: config_mod.FieldOption) -> list[inspect.Parameter]:
    """A config field as Typer option(s); left out, it is None, so the config's default (or YAML) stands.

    A bool field is `--x` plus `--no-x`; the help lists `--x` and names `--no-x` in its text (a second
    column of `--no-...` names would not fit 80 columns beside the help).
    """
    typ: Any = list[str] if option.kind == "repeat" else option.type
    help_text = option.help
    if option.kind == "flag":
        help_text += f" ({'on by default; ' if option.default is True else ''}{_negative(option)}: off)"
    info = typer.Option(  # escaped: the help is rich markup, where "FLUX.1 [dev]" would lose its "[dev]"
        *option.flags, help=escape(help_text), metavar=option.metavar, rich_help_panel=option.panel, show_default=False
    )
    params = [_keyword(_param_name(option), Annotated[Optional[typ], info])]
    if option.kind == "flag":
        off = typer.Option(_negative(option), hidden=True, rich_help_panel=option.panel, show_default=False)
        params.append(_keyword(_param_name(option) + _OFF, Annotated[Optional[bool], off]))
    return params


def _negative(option: config_mod.FieldOption) -> str:
    return "--no-" + option.flags[0][2:]


def _keyword(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _signature() -> inspect.Signature:
    """The verb's own options, the config fields by panel, then the Distributed panel."""
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(verb_options, eval_str=True).parameters.values()
    ]
    launch = [p for p in own if getattr(typing.get_args(p.annotation)[1], "rich_help_panel", None) == DISTRIBUTED]
    fields = [param for option in FIELDS for param in field_parameters(option)]
    return inspect.Signature([*(p for p in own if p not in launch), *fields, *launch])


def flags_given(params: dict[str, Any]) -> dict[str, Any]:
    """The config fields given on the command line, by dotted key ({"lora.rank": 8})."""
    given = {}
    for option in FIELDS:
        value = params.get(_param_name(option))
        if option.kind == "flag" and params.get(_param_name(option) + _OFF):
            if value:
                raise ConfigError(f"{option.flags[0]} and {_negative(option)} contradict each other: give one")
            value = False
        if value is None or (option.kind == "repeat" and not value):
            continue
        given[option.key] = list(value) if option.kind == "repeat" else value
    return given


def train(**params: Any) -> None:
    """Train a LoRA on a prepared dataset (SD 1.x, SDXL, FLUX.1, FLUX.2 [klein], Z-Image) and write a run folder.

    Flags override --config; dotted KEY=VALUE overrides after them (lora.rank=8 train.seed=1) override both.
    """
    config, resume, num_processes = params["config"], params["resume"], params["num_processes"]
    accelerate_config = params["accelerate_config"]
    flags = flags_given(params)
    dotted = list(params["overrides"] or [])
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
    launch: dict[str, Any] = {}
    if accelerate_config is not None:  # checked here, once, before any process starts
        import torch

        from sdlora.train.fsdp import read_accelerate_config

        launch = read_accelerate_config(accelerate_config, has_gpu=torch.cuda.is_available())
        num_processes = num_processes or launch.get("num_processes", 1)
    num_processes = num_processes or 1
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
    if params["print_config"]:
        typer.echo(config_mod.config_yaml(cfg), nl=False)
        return
    if launch.get("distributed_type") == "FSDP" and num_processes > 1:
        from sdlora.train.fsdp import check_run

        check_run(cfg)  # what FSDP cannot train: one line here, not one per process
    if num_processes > 1 or accelerate_config is not None:
        from sdlora.train.launch import in_launched_process

        if not in_launched_process():
            _relaunch(config, resume, flags, dotted, num_processes, accelerate_config)
            return
    from sdlora.train.runtime import StopNow

    main = os.environ.get("RANK", "0") == "0"
    renderer = TrainRenderer()
    try:
        result = loop.run_training(cfg, resume=resume_dir, on_event=renderer)
    except StopNow as stop:  # a second Ctrl-C / SIGTERM: nothing more is saved
        renderer.close()
        if main:
            err_console.print(f"[yellow]{escape(stop.saved)}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(128 + stop.signum) from None
    except KeyboardInterrupt:  # Ctrl-C before training started (loading, encoding)
        renderer.close()
        if main:
            err_console.print("[yellow]stopped before training started: nothing saved[/]", highlight=False)
        raise typer.Exit(130) from None
    finally:
        renderer.close()
    if main:  # one report per run: the main process's (also when stopped)
        refresh_report(result.run_dir)
    if result.interrupted:
        console.print(_stopped_line(result), highlight=False, soft_wrap=True)
        raise typer.Exit(128 + (result.stop_signal or 2))  # 130 after Ctrl-C, 143 after SIGTERM


def _stopped_line(result: Any) -> str:
    """What a run stopped by Ctrl-C / SIGTERM saved, and how to go on."""
    if not result.max_steps or result.steps < result.max_steps:
        return (
            f"[yellow]stopped at step {result.steps}[/]; checkpoint and LoRA saved. "
            f"Continue with: sdlora train --resume {result.run_dir}"
        )
    import signal

    name = signal.Signals(result.stop_signal or signal.SIGINT).name
    return (
        f"[yellow]stopped by {name} after the last step[/]: all {result.steps} steps trained; "
        f"the LoRA was saved whole in {result.lora_dir}"
    )


train.__signature__ = _signature()  # type: ignore[attr-defined]


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


class TrainRenderer:
    """Draws the core's events: one line at start, a rich progress bar, warnings, a summary."""

    def __init__(self) -> None:
        self.progress: Any = None
        self.task: Any = None
        self.bars: dict[str, Any] = {}
        self.compile: dict[str, Any] | None = None  # --compile: the blocks, the first step, its time, later times

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "warning":
            self._print(f"[yellow]warning:[/] {event['message']}")
        elif kind == "stopping":
            self._print(f"[yellow]{event['message']}[/]")
        elif kind == "progress":
            self._bar(event["what"], event["done"], event["total"])
        elif kind == "cache":
            self._print(f"{event['what']}: {event['encoded']} encoded, {event['reused']} from the cache")
        elif kind == "start":
            self._start(event)
        elif kind == "step" and self.progress is not None:
            self._compile_time(event)
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
            + f"; {event['device']}, precision {event['mixed_precision']}"
            + (f", compiled ({event['compile']} UNet blocks)" if event.get("compile") else "")
            + (f", FSDP: the denoiser sharded in {event['fsdp_units']} units" if event.get("fsdp_units") else ""),
            highlight=False,
            soft_wrap=True,
        )
        first = event["start_step"] + 1
        self.compile = {"blocks": event["compile"], "first": first, "times": []} if event.get("compile") else None
        masked = event.get("masked_loss")
        if masked:
            console.print(
                f"  masked loss: {masked['masked']} of {event['train_images']} train images have a subject mask; "
                f"the background weighs {masked['unmasked_weight']:g} (--unmasked-weight)",
                highlight=False,
                soft_wrap=True,
            )
        if event.get("preservation") == "dop":
            console.print(
                "  preservation: dop (each caption with the class word instead of the token keeps the base "
                "model's output; loss/preservation)",
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

    LATER_STEPS = 3  # steps after the first one whose median the compile line shows

    def _compile_time(self, event: dict[str, Any]) -> None:
        """--compile: one line once the first step (which compiles) and a few later ones have run."""
        info = self.compile
        if info is None or event["step"] < info["first"]:
            return
        info["times"].append(event["step_s"])
        if len(info["times"]) <= self.LATER_STEPS and event["step"] < event["total"]:
            return
        first, later = info["times"][0], info["times"][1:]
        after = f" (later steps ~{statistics.median(later):.2f} s)" if later else ""
        self._print(f"compile: first step {first:.1f} s{after}")
        self.compile = None

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
