"""`sdlora demo`: the whole pipeline offline, in the miniature world (a novel object, world-sd)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sdlora.cli._common import console, err_console, progress_bar, refresh_report

EPILOG = """\
Examples (photos/, dataset/ and runs/ go under --out):

  sdlora demo

  sdlora demo --out /tmp/demo --steps 600

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
            help="Use these photos instead of the rendered world object (a dry run of your data at 32 px).",
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            metavar="NAME",
            help="world-sd, world-sdxl or world-flux (they learn), or tiny-sd / tiny-sdxl (random: noise).",
        ),
    ] = "world-sd",
    steps: Annotated[
        Optional[int],
        typer.Option("--steps", metavar="INT", show_default=False, help="Training steps (default: the preset's)."),
    ] = None,
) -> None:
    """Run prepare, caption, train, sample, score and report offline in the miniature world (a few minutes)."""
    from sdlora.cli.train import TrainRenderer
    from sdlora.demo import DEMO_MODELS, run_demo
    from sdlora.models.loading import TINY_WARNING, is_tiny

    if model not in DEMO_MODELS:
        raise typer.BadParameter(
            f"the demo runs offline on {', '.join(DEMO_MODELS)}; use the five verbs for a real model",
            param_hint="--model",
        )
    if steps is not None and steps < 1:
        raise typer.BadParameter(f"must be at least 1, got {steps}", param_hint="--steps")
    if is_tiny(model):
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
        f"Photos, base model and LoRA side by side: {result.sheet}\n"
        f"Next: real photos and a real model (needs a GPU and a download): "
        f'sdlora prepare ./photos && sdlora train && sdlora sample "sksToy on a beach" && sdlora score',
        highlight=False,
        soft_wrap=True,
    )
