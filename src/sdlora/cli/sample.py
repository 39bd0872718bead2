"""`sdlora sample`: images from a run's LoRA beside the base model alone, same prompts and seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from sdlora.cli._common import DeviceOpt, RunOpt, at_least_1, console, err_console, progress_bar, refresh_report

EPILOG = """\
Examples (the run defaults to ./runs/latest; the class word is added after the token):

  sdlora sample "sksToy on a beach" "a red sksToy toy" --num-images 8 --seed 42

  sdlora sample --prompts-file prompts.txt --lora best --no-baseline

  sdlora sample "sksToy on a beach" --dtype fp16 --cpu-offload    # small GPUs
"""


def _flag(name: str, help_text: str) -> Any:
    """An on/off option with no `<bool>` beside it (metavar="")."""
    return typer.Option(name, metavar="", help=help_text)


def sample(
    prompts: Annotated[
        Optional[list[str]],
        typer.Argument(metavar="PROMPT", hidden=True, show_default=False),  # in the verb's help text
    ] = None,
    run: RunOpt = Path("runs/latest"),
    prompts_file: Annotated[
        Optional[Path],
        typer.Option("--prompts-file", metavar="FILE", help="Text file with one prompt per line (# comments)."),
    ] = None,
    lora: Annotated[
        str,
        typer.Option(
            "--lora",
            metavar="NAME",
            help="Which LoRA: lora (final), best (best validation), a LoRA folder, or a .safetensors file "
            "(sdlora's, or a kohya-format LoRA from another trainer).",
        ),
    ] = "lora",
    num_images: Annotated[int, typer.Option("--num-images", "-n", metavar="N", help="Images per prompt.")] = 4,
    seed: Annotated[
        int, typer.Option("--seed", metavar="INT", help="Seed of the first image; image i gets seed + i.")
    ] = 0,
    steps: Annotated[
        Optional[int],
        typer.Option(
            "--steps",
            metavar="N",
            help=escape(
                "Denoising steps (default: the model's: SD 30, FLUX.1 [dev] 28, [schnell] 4, FLUX.2 [klein] 50, distilled 4, Z-Image-Turbo 8, Z-Image 50)."
            ),
        ),
    ] = None,
    guidance: Annotated[
        Optional[float],
        typer.Option(
            "--guidance",
            metavar="FLOAT",
            help=escape(
                "Guidance scale (default: the model's: 7.5 classifier-free for SD, 3.5 FLUX.1 [dev]'s distilled, 4.0 FLUX.2 [klein], 0 Z-Image-Turbo, 5.0 Z-Image)."
            ),
        ),
    ] = None,
    scheduler: Annotated[
        Optional[str],
        typer.Option(
            "--scheduler",
            metavar="NAME",
            help="euler, euler_a, dpm++, dpm++_karras, dpm++_sde, unipc, ddim, pndm, "
            "lms, heun, dpm2, dpm2_a (default: the model's own).",
        ),
    ] = None,
    no_embedding: Annotated[
        bool,
        _flag(
            "--no-embedding",
            "Leave out the token's trained embedding beside the LoRA: the token keeps the base model's "
            "meaning (what the LoRA learned on its own).",
        ),
    ] = False,
    lora_scale: Annotated[
        float,
        typer.Option("--lora-scale", metavar="FLOAT", help="LoRA strength (0 = base model, 1 = as trained)."),
    ] = 1.0,
    negative_prompt: Annotated[
        Optional[str], typer.Option("--negative-prompt", metavar="TEXT", help="Negative prompt.")
    ] = None,
    height: Annotated[
        Optional[int], typer.Option("--height", metavar="INT", help="Image height (default: the run's resolution).")
    ] = None,
    width: Annotated[
        Optional[int], typer.Option("--width", metavar="INT", help="Image width (default: the run's resolution).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", help="Images per pipeline call.")] = 1,
    baseline: Annotated[
        bool,
        typer.Option(
            "--baseline",
            metavar="",
            show_default=False,
            help="Also sample the base model alone with the same seeds (on by default; --no-baseline: off).",
        ),
    ] = True,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", hidden=True)] = False,  # named in --baseline's help
    device: DeviceOpt = None,
    dtype: Annotated[
        str,
        typer.Option("--dtype", metavar="NAME", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16."),
    ] = "auto",
    attention_slicing: Annotated[
        bool, _flag("--attention-slicing", "Compute attention in slices: less GPU memory, slower.")
    ] = False,
    vae_tiling: Annotated[
        bool, _flag("--vae-tiling", "Decode images tile by tile: less GPU memory for large images.")
    ] = False,
    cpu_offload: Annotated[
        bool, _flag("--cpu-offload", "Keep models on the CPU and move each to the GPU only while it runs.")
    ] = False,
) -> None:
    """Generate images with the run's LoRA and, beside them, with the base model alone (same seeds).

    PROMPT: one or more prompts; the token may stand alone ('sksToy on a beach' becomes 'sksToy toy on a beach').
    """
    from sdlora.devices import resolve_device
    from sdlora.generate import (
        check_lora_files,
        check_prompts,
        generate_samples,
        read_prompts_file,
        resolve_dtype,
        resolve_lora,
        scheduler_key,
    )
    from sdlora.models.loading import TINY_WARNING, is_tiny
    from sdlora.run import load_run

    at_least_1(num_images=num_images, steps=steps, batch_size=batch_size)
    given = list(prompts or [])
    if prompts_file is not None:
        given += read_prompts_file(prompts_file)
    given = check_prompts(given)
    info = load_run(run)
    # the cheap checks before the tiny-model warning, so bad input stays one line
    check_lora_files(resolve_lora(info, lora), embedding=not no_embedding)
    if scheduler is not None:
        scheduler_key(scheduler)
    resolve_dtype(dtype, resolve_device(device))
    if is_tiny(info.model):
        err_console.print(f"[yellow]{TINY_WARNING}[/]", highlight=False, soft_wrap=True)
    with progress_bar() as on_progress:
        samples_json = generate_samples(
            info,
            given,
            num_images=num_images,
            seed=seed,
            steps=steps,
            guidance=guidance,
            baseline=baseline and not no_baseline,
            lora_scale=lora_scale,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            batch_size=batch_size,
            scheduler=scheduler,
            device=device,
            lora_dir=lora,
            embedding=not no_embedding,
            dtype=dtype,
            attention_slicing=attention_slicing,
            vae_tiling=vae_tiling,
            cpu_offload=cpu_offload,
            on_progress=on_progress,
            on_warning=lambda line: err_console.print(
                f"[yellow]warning: {escape(line)}[/]", highlight=False, soft_wrap=True
            ),
        )
    report = refresh_report(info.path)
    _summary(samples_json, given, info)
    console.print(f"samples: {samples_json}", highlight=False, soft_wrap=True)
    if report is not None:
        console.print(f"report:  {report}", highlight=False, soft_wrap=True)


def _summary(samples_json: Path, given: list[str], info) -> None:
    """One line per prompt: its grid."""
    from sdlora.generate import expand_prompt
    from sdlora.run import read_samples

    data = read_samples(samples_json)
    wanted = {expand_prompt(p, info.token, info.class_word) for p in given}
    grids = dict.fromkeys(
        str(samples_json.parent / Path(e["file"]).parent / "grid.png") for e in data["images"] if e["prompt"] in wanted
    )
    for grid in grids:
        console.print(f"grid: {grid}", highlight=False, soft_wrap=True)
