"""`sdlora prepare SOURCE`: photos (folder, .zip, Yandex Disk link) -> a prepared dataset."""

from __future__ import annotations

import enum
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from sdlora.cli._common import SeedOpt, at_least_1, console, err_console, progress_bar
from sdlora.data.ingest import NoUsableImages, PrepareResult, prepare_dataset
from sdlora.data.manifest import DEFAULT_CLASS, DEFAULT_TOKEN
from sdlora.data.masks import DEFAULT_DILATE, DEFAULT_MASK_MODEL, DEFAULT_THRESHOLD

EPILOG = """\
Examples (the dataset goes to ./dataset):

  sdlora prepare ./photos --class-word toy

  sdlora prepare https://disk.360.yandex.ru/d/d_2ADwdTPRPs8A --keep-aspect --resolution 1024

  sdlora prepare ./photos --masks auto --class-word toy
"""


class Crop(str, enum.Enum):
    center = "center"
    pad = "pad"


def prepare(
    source: Annotated[
        str, typer.Argument(metavar="SOURCE", hidden=True, show_default=False)  # in the verb's help text
    ],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Dataset folder to write.")] = Path("dataset"),
    resolution: Annotated[
        int,
        typer.Option(
            "--resolution",
            metavar="INT",
            help="Side of the square training images; with --keep-aspect, of a square of the same area (512 for SD 1.x, 1024 for SDXL).",
        ),
    ] = 512,
    crop: Annotated[
        Crop,
        typer.Option(
            "--crop", metavar="center|pad", help="center: crop the middle square; pad: keep the whole photo on white."
        ),
    ] = Crop.center,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", metavar="FLOAT", help="Share of images held out for validation.")
    ] = 0.2,
    seed: SeedOpt = 0,
    token: Annotated[
        str, typer.Option("--token", metavar="TEXT", help="Rare word that will mean your object in prompts.")
    ] = DEFAULT_TOKEN,
    class_word: Annotated[
        str, typer.Option("--class-word", metavar="TEXT", help="What the object is, e.g. toy, car, bowl.")
    ] = DEFAULT_CLASS,
    keep_duplicates: Annotated[
        bool,
        typer.Option("--keep-duplicates", metavar="", help="Keep photos with the same or nearly the same picture."),
    ] = False,
    keep_small: Annotated[
        bool,
        typer.Option("--keep-small", metavar="", help="Keep photos smaller than half the resolution (upscaled, soft)."),
    ] = False,
    keep_aspect: Annotated[
        bool,
        typer.Option(
            "--keep-aspect",
            metavar="",
            help="Keep each photo's aspect ratio: use it for 4:3 or 3:4 phone photos whose object a square crop would cut (SDXL also learns the true size).",
        ),
    ] = False,
    masks: Annotated[
        Optional[str],
        typer.Option(
            "--masks",
            metavar="HOW",
            help="Subject masks under masks/: auto (a segmentation model finds the --class-word), alpha (the photos' transparency), or a folder of masks named like the photos (white = object; ./auto for a folder named auto).",
        ),
    ] = None,
    mask_model: Annotated[
        str,
        typer.Option(
            "--mask-model",
            metavar="MODEL",
            help="Segmentation model for --masks auto: a CLIPSeg hub id or folder, or tiny-clipseg (random, offline).",
        ),
    ] = DEFAULT_MASK_MODEL,
    mask_threshold: Annotated[
        float,
        typer.Option(
            "--mask-threshold", metavar="FLOAT", help="--masks auto: probability above which a pixel is the object."
        ),
    ] = DEFAULT_THRESHOLD,
    mask_dilate: Annotated[
        int,
        typer.Option(
            "--mask-dilate",
            metavar="INT",
            help="Grow every mask by this many pixels (at 512 px; scaled) so the object's edges stay in.",
        ),
    ] = DEFAULT_DILATE,
    workers: Annotated[
        Optional[int], typer.Option("--workers", metavar="N", help="Decoding processes (default: all CPU cores).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", metavar="", help="Replace a different dataset (or write into a non-dataset folder) at --out."
        ),
    ] = False,
) -> None:
    """Decode, orient, crop and de-duplicate photos into a dataset: images/, captions.txt, manifest.json.

    SOURCE: a folder of photos (searched recursively), a .zip, or a Yandex Disk public link.
    """
    at_least_1(workers=workers)
    start = time.perf_counter()
    try:
        with progress_bar() as on_progress:
            result = prepare_dataset(
                source,
                out,
                resolution=resolution,
                crop=crop.value,
                val_fraction=val_fraction,
                seed=seed,
                token=token,
                class_word=class_word,
                keep_duplicates=keep_duplicates,
                keep_small=keep_small,
                keep_aspect=keep_aspect,
                masks=masks,
                mask_model=mask_model,
                mask_threshold=mask_threshold,
                mask_dilate=mask_dilate,
                workers=workers,
                force=force,
                on_progress=on_progress,
            )
    except NoUsableImages as exc:
        if exc.result.skipped:  # what was skipped, and why; an empty source has only its error line
            _render(exc.result)
        raise
    _render(result)
    seconds = time.perf_counter() - start
    what = {"new": "wrote", "update": "updated", "replace": "replaced", "resume": "finished"}[result.mode]
    at = f"at {resolution} px"
    if keep_aspect:
        at = f"in {len(result.size_counts())} sizes of about {resolution}x{resolution} px area"
    console.print(
        f"{what} {result.out_dir}: {len(result.records)} images {at} "
        f"(train {len(result.train)}, val {len(result.val)}); decoded {result.decoded}, reused {result.reused} "
        f"in {seconds:.1f}s. Next: sdlora caption {result.out_dir}",
        highlight=False,
    )


def _render(result: PrepareResult) -> None:
    table = Table(title=f"prepare {result.source}", title_justify="left")
    table.add_column("result")
    table.add_column("files", justify="right")
    table.add_column("examples", overflow="fold")
    if result.records:
        examples = ", ".join(r.source for r in result.records[:3])
        table.add_row("[green]kept[/]", str(len(result.records)), examples)
    if result.first_frame:  # trained on one image of several: the user may have meant the others
        shown = "; ".join(f"{name} ({what})" for name, what in result.first_frame[:3])
        more = f"; +{len(result.first_frame) - 3} more" if len(result.first_frame) > 3 else ""
        table.add_row("[yellow]kept, first frame only[/]", str(len(result.first_frame)), shown + more)
    by_reason: dict[str, list] = {}
    for s in result.skipped:
        by_reason.setdefault(s.reason, []).append(s)
    for reason, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        examples = "; ".join(f"{s.name} ({s.detail})" if s.detail else s.name for s in items[:3])
        more = f"; +{len(items) - 3} more" if len(items) > 3 else ""
        table.add_row(f"[yellow]skipped: {reason}[/]", str(len(items)), examples + more)
    if result.masks:
        masked = [r for r in result.records if r.mask]
        examples = f"made {result.masks_made}, reused {result.masks_reused}; under masks/"
        table.add_row(f"[green]masks ({result.masks})[/]", str(len(masked)), examples)
        for label, items in (
            ("kept, no mask (whole frame)", result.unmasked),
            ("mask looks wrong", result.mask_problems),
        ):
            if items:
                shown = "; ".join(f"{name} ({why})" for name, why in items[:3])
                more = f"; +{len(items) - 3} more" if len(items) > 3 else ""
                table.add_row(f"[yellow]{label}[/]", str(len(items)), shown + more)
    if result.removed:
        table.add_row("removed (gone from the source)", str(result.removed), "")
    console.print(table)
    if result.keep_aspect and result.records:
        sizes = ", ".join(f"{w}x{h} x{n}" for (w, h), n in result.size_counts())
        console.print(f"sizes: {sizes}", highlight=False)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if result.records and len(result.records) < 10:
        err_console.print(
            f"[yellow]warning:[/] only {len(result.records)} usable photos; 20 or more from varied angles train better",
            highlight=False,
        )
