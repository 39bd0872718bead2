"""What every verb shares: consoles, option aliases, a progress bar for core callbacks."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sdlora.errors import ConfigError
from sdlora.events import ProgressFn

console = Console()
err_console = Console(stderr=True)

# One definition per shared option, so help text is the same on every verb.
# Each has a short metavar (DIR, RUN...), so help shows no Typer type names (<path>, <str>).
DatasetOpt = Annotated[Path, typer.Option("--dataset", "-d", metavar="DIR", help="Prepared dataset folder.")]
RunOpt = Annotated[Path, typer.Option("--run", "-r", metavar="RUN", help="Run folder written by `sdlora train`.")]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        metavar="NAME",
        help="Base model: a hub id or local diffusers folder (SD 1.x, SDXL, FLUX.1, FLUX.2 [klein], Z-Image), an SD 1.x / "
        "SDXL .safetensors file, or tiny-sd / tiny-sdxl / tiny-flux / tiny-flux2-klein / tiny-zimage (random weights, "
        "offline).",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="INT", help="Random seed.")]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, mps (default: CUDA, then MPS, then the CPU)."),
]


def at_least_1(**values: int | None) -> None:
    """ConfigError naming the first option below 1 (`num_images=0` -> "--num-images must be at least 1, got 0").

    The verbs check counts here instead of Typer's `min=1`, whose help shows `<int range> [x>=1]`.
    """
    for name, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def refresh_report(run_dir: Path, *, strict: bool = False) -> Path | None:
    """(Re)write the run's report.html (and its model card): the one place a verb refreshes them, after its own stage.

    A verb whose job is something else (train, sample, score, demo) gets a warning line if the report
    cannot be written, never a failure; `sdlora report` itself passes strict=True and fails.
    """
    from sdlora.report import write_report

    refresh_card(run_dir)
    try:
        return write_report(run_dir)
    except Exception as exc:
        if strict:
            raise
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        err_console.print(f"[yellow]warning:[/] report.html not written: {reason}", highlight=False, soft_wrap=True)
        return None


def refresh_card(run_dir: Path) -> Path | None:
    """(Re)write the run's model card (README.md, `sdlora.publish.card`) with the report, so a run that is
    never pushed has one too; a run without a LoRA yet gets none, and a failure is a warning line."""
    from sdlora.publish.card import write_run_card
    from sdlora.run import DIFFUSERS_LORA, LORA_DIR

    if not (Path(run_dir) / LORA_DIR / DIFFUSERS_LORA).is_file():
        return None
    try:
        return write_run_card(run_dir)
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        err_console.print(f"[yellow]warning:[/] README.md (model card) not written: {reason}", highlight=False)
        return None


@contextlib.contextmanager
def progress_bar(transient: bool = False) -> Iterator[ProgressFn]:
    """A rich progress bar driven by core callbacks `(description, done, total)`.

    Each new description gets its own task row, so one callback can report several phases.
    """
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=transient) as progress:
        tasks: dict[str, int] = {}

        def update(description: str, done: int, total: int) -> None:
            if description not in tasks:
                tasks[description] = progress.add_task(description, total=total)
            progress.update(tasks[description], completed=done, total=total)

        yield update
