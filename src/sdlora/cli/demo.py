"""`sdlora demo`: the whole pipeline offline, on rendered example photos and tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sdlora.cli._common import console, err_console, progress_bar, refresh_report

EPILOG = """\
Examples (photos/, dataset/ and runs/ go under --out):

  sdlora demo

  sdlora demo --out /tmp/demo --steps 60 --model tiny-sdxl

  sdlora demo --photos ./my-photos
"""


def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="DIR", help="Folder for photos/, dataset/ and runs/.")
    ] = Path("sdlora-demo"),
    photos: Annotated[
        Optional[Path],
        typer.Option(
            "--photos",
            metavar="DIR",
            show_default=False,
            help="Use these photos instead of the rendered example toy (a dry run of your data on tiny models).",
        ),
    ] = None,
    model: Annotated[str, typer.Option("--model", "-m", metavar="NAME", help="tiny-sd or tiny-sdxl.")] = "tiny-sd",
    steps: Annotated[int, typer.Option("--steps", metavar="INT", help="Training steps (at least 1).")] = 30,
) -> None:
    """Run prepare, caption, train, sample, score and report offline on tiny models (about a minute)."""
    from sdlora.cli.train import TrainRenderer
    from sdlora.demo import run_demo
    from sdlora.models.loading import TINY_WARNING, is_tiny

    if not is_tiny(model):
        raise typer.BadParameter(
            "the demo runs offline on tiny-sd or tiny-sdxl; use the five verbs for a real model", param_hint="--model"
        )
    if steps < 1:
        raise typer.BadParameter(f"must be at least 1, got {steps}", param_hint="--steps")
    err_console.print(f"[yellow]note:[/] {TINY_WARNING}", highlight=False, soft_wrap=True)
    renderer = TrainRenderer()
    with progress_bar(transient=True) as on_progress:
        result = run_demo(
            out,
            photos=photos,
            model=model,
            steps=steps,
            on_phase=lambda name: err_console.print(f"[bold]== {name}[/]"),
            on_progress=on_progress,
            on_event=renderer,
        )
    renderer.close()
    err_console.print("[bold]== report[/]")
    report = refresh_report(result.run_dir)
    overall = result.scores.get("overall", {})
    for variant in ("lora", "baseline"):
        numbers = overall.get(variant) or {}
        shown = ", ".join(f"{k} {numbers[k]:.3f}" for k in ("dino", "clip_i", "clip_t") if k in numbers)
        console.print(f"{variant:>8}: {shown}", highlight=False)
    console.print(
        f"[green]demo finished.[/] Report: {report or 'not written (see the warning above)'}\n"
        f"Next: real photos and a real model (needs a GPU and a download): "
        f'sdlora prepare ./photos && sdlora train && sdlora sample "sksToy on a beach" && sdlora score',
        highlight=False,
        soft_wrap=True,
    )
