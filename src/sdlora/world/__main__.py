"""`python -m sdlora.world`: the miniature world's commands (a developer's tool, not an sdlora verb).

python -m sdlora.world photos --object 3 --count 24 --out photos/
python -m sdlora.world photos --object 3 --count 24 --out room/ --clutter --masks room-masks/
python -m sdlora.world scenes --count 16 --size 64 --out scenes.png
python -m sdlora.world build --out world-models/     # about 2 hours on 2 cores; resumes if interrupted
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sdlora.cli._common import err_console
from sdlora.errors import ConfigError, SdloraError

app = typer.Typer(
    name="python -m sdlora.world",
    help="The miniature world: phone photos of its novel objects, and its scenes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Keeps the commands as subcommands (Typer runs a lone command directly otherwise)."""


def _fail(exc: SdloraError | OSError, flag: str = "--out") -> typer.Exit:
    """One red line for a problem the user can fix (bad options, a place that cannot be written)."""
    from rich.markup import escape

    from sdlora.fsutil import write_problem

    line = str(exc) if isinstance(exc, SdloraError) else write_problem(exc, flag)
    if line is None:
        raise exc
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


@app.command()
def photos(
    object_: Annotated[int, typer.Option("--object", help="Which novel object (any integer).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the photos (IMG_0001.HEIC, IMG_0002.JPG, ...).")],
    count: Annotated[int, typer.Option("--count", help="How many photos.")] = 24,
    seed: Annotated[int, typer.Option("--seed", help="Varies backgrounds, places and light; not the object.")] = 0,
    clutter: Annotated[
        bool, typer.Option("--clutter", help="All in one cluttered room, instead of the world's backgrounds.")
    ] = False,
    masks: Annotated[
        Optional[Path], typer.Option("--masks", help="Also write each photo's true mask here (<stem>.png).")
    ] = None,
) -> None:
    """Phone-style photos of novel object K (HEIC and JPEG, 4:3, some stored sideways): input for `sdlora prepare`."""
    from sdlora.world.objects import novel_object
    from sdlora.world.photos import write_photos

    try:
        paths = write_photos(out, object_, count, seed=seed, clutter=clutter, masks=masks)
    except (SdloraError, OSError) as exc:
        raise _fail(exc) from None
    typer.echo(f"{len(paths)} photos of {novel_object(object_).composition.phrase} in {out}")


@app.command()
def scenes(
    out: Annotated[Path, typer.Option("--out", help="PNG file for the contact sheet.")],
    count: Annotated[int, typer.Option("--count", help="How many scenes.")] = 16,
    size: Annotated[int, typer.Option("--size", help="Side of each scene in pixels.")] = 64,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """A contact sheet of base scenes with their captions printed: to look at what the models learn from."""
    import numpy as np
    from PIL import Image

    from sdlora.fsutil import atomic_path
    from sdlora.world.scenes import sample_scene

    if count < 1 or size < 8:
        raise _fail(ConfigError(f"--count {count} --size {size}: give at least 1 scene of at least 8 px"))
    rng = np.random.default_rng(seed)
    cols = min(count, 8)
    sheet = Image.new("RGB", (cols * size, -(-count // cols) * size))
    for i in range(count):
        image, caption, _, _ = sample_scene(rng, size)
        sheet.paste(image, ((i % cols) * size, (i // cols) * size))
        typer.echo(f"{i:3d} {caption}")
    try:
        with atomic_path(out) as tmp:
            sheet.save(tmp, format="PNG")
    except OSError as exc:
        raise _fail(exc) from None


@app.command()
def build(
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Folder for world-sd/, world-sdxl/, world-flux/, world-clip/, world-dino/ (and work/)."
        ),
    ] = Path("world-models"),
    only: Annotated[
        Optional[str],
        typer.Option(
            "--only",
            help="Build one model: clip, vae, unet, unet_xl or flux (these three need clip and vae), or dino.",
        ),
    ] = None,
    steps_scale: Annotated[
        float, typer.Option("--steps-scale", help="Multiply every trainer's steps (and the scene pool) by this.")
    ] = 1.0,
) -> None:
    """Train the world's base models from seeds (two one-thread processes at a time), printing their curves."""
    from sdlora.world.trainers.orchestrate import MODELS
    from sdlora.world.trainers.orchestrate import build as run_build

    if only is not None and only not in MODELS:
        raise _fail(ConfigError(f"--only {only}: use one of {', '.join(MODELS)}"))
    if not 0 < steps_scale <= 10:
        raise _fail(ConfigError(f"--steps-scale {steps_scale}: give a number above 0 and at most 10"))
    try:
        run_build(out, only, steps_scale)
    except (SdloraError, OSError) as exc:
        raise _fail(exc) from None


if __name__ == "__main__":
    app()
