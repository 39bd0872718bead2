"""`sdlora score`: DINO, CLIP-I and CLIP-T of a run's samples vs the real val photos, LoRA vs baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from sdlora.cli._common import DeviceOpt, RunOpt, at_least_1, console, err_console, progress_bar, refresh_report

EPILOG = """\
Examples (the run defaults to ./runs/latest; prompts without images are sampled first):

  sdlora score

  sdlora score --prompts dreambench     # the paper's 25 prompts, 4 images each

  sdlora score --dino-model tiny-dino --clip-model tiny-clip     # offline check
"""


def score(
    run: RunOpt = Path("runs/latest"),
    prompts: Annotated[
        Optional[list[str]],
        typer.Option(
            "--prompts",
            "-p",
            metavar="PROMPT",
            help="Score only these prompts (repeatable), sampling LoRA and baseline "
            "images first for any that have none; 'dreambench' = the paper's 25 object prompts, 4 images each. "
            "Default: every image in samples.json (the run's validation prompts if there is none).",
        ),
    ] = None,
    samples: Annotated[
        Optional[Path],
        typer.Option("--samples", metavar="FILE", help="samples.json to score (default: RUN/samples/samples.json)."),
    ] = None,
    dino_model: Annotated[
        str,
        typer.Option(
            "--dino-model",
            metavar="MODEL",
            help="DINO model: hub id or folder (ViT or DINOv2, e.g. "
            "facebook/dinov2-small), or tiny-dino (random, offline).",
        ),
    ] = "facebook/dino-vits16",
    clip_model: Annotated[
        str,
        typer.Option(
            "--clip-model",
            metavar="MODEL",
            help="open_clip model name (ViT-B-32, ViT-L-14, hf-hub:org/repo) or tiny-clip (random, offline).",
        ),
    ] = "ViT-B-32",
    clip_pretrained: Annotated[
        str,
        typer.Option("--clip-pretrained", metavar="TAG", help="open_clip weights tag or file for --clip-model."),
    ] = "openai",
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", help="Images per scorer forward pass.")] = 32,
    num_images: Annotated[
        int,
        typer.Option(
            "--num-images",
            metavar="N",
            help="Images per prompt when images must be sampled (and what dreambench needs).",
        ),
    ] = 4,
    seed: Annotated[int, typer.Option("--seed", metavar="INT", help="First seed when images must be sampled.")] = 0,
    steps: Annotated[
        Optional[int], typer.Option("--steps", metavar="N", help="Inference steps when images must be sampled.")
    ] = None,
    sample_missing: Annotated[
        bool,
        typer.Option(
            "--sample",
            metavar="",
            show_default=False,
            help="Run `sdlora sample` first for prompts without images (on by default; "
            "--no-sample: fail and name the command).",
        ),
    ] = True,
    no_sample: Annotated[bool, typer.Option("--no-sample", hidden=True)] = False,  # named in --sample's help
    device: DeviceOpt = None,
) -> None:
    """Score generated images against the dataset's real val photos (DINO, CLIP-I, CLIP-T), LoRA vs base."""
    from sdlora.evaluate.clip import load_clip
    from sdlora.evaluate.dino import load_dino
    from sdlora.evaluate.score import missing_prompts, plan_scoring, score_run, val_photos
    from sdlora.run import SCORES_JSON, load_run

    at_least_1(batch_size=batch_size, num_images=num_images, steps=steps)
    sample_missing = sample_missing and not no_sample
    info = load_run(run)
    plan = plan_scoring(info, prompts, samples, num_images)
    info.lora_dir()  # the cheap checks and the scorers before minutes of sampling
    val_photos(info.dataset)
    load_dino(dino_model, device)
    load_clip(clip_model, clip_pretrained, device)
    missing = missing_prompts(info, plan)
    if missing and sample_missing:
        from sdlora.generate import generate_samples

        err_console.print(
            f"no samples for {len(missing)} prompt(s): running `sdlora sample` first", highlight=False, soft_wrap=True
        )
        options: dict[str, Any] = {"steps": steps} if steps is not None else {}
        with progress_bar() as on_progress:
            plan.samples_json = generate_samples(
                info,
                missing,
                out_dir=plan.samples_json.parent,
                num_images=num_images,
                seed=seed,
                baseline=True,
                device=device,
                on_progress=on_progress,
                **options,
            )
    with progress_bar(transient=True) as on_progress:
        scores = score_run(
            info,
            plan=plan,
            dino_model=dino_model,
            clip_model=clip_model,
            clip_pretrained=clip_pretrained,
            device=device,
            batch_size=batch_size,
            on_progress=on_progress,
        )
    refresh_report(info.path)
    _render(scores)
    console.print(f"scores: {info.path / SCORES_JSON}", highlight=False)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _render(scores: dict[str, Any]) -> None:
    scorers = scores["scorers"]
    clip = scorers["clip"]
    title = (
        f"{scores['real']['count']} real val photos; DINO {scorers['dino']['model']}, "
        f"CLIP {clip['model']}{' (' + clip['pretrained'] + ')' if clip.get('pretrained') else ''}"
    )
    table = Table(
        title=title,
        title_justify="left",
        caption="cosine similarity as is (1 = identical embeddings); "
        "CLIP-T: token removed from the prompt; +token: prompt as generated",
        caption_justify="left",
    )
    table.add_column("prompt", overflow="fold", max_width=48)
    table.add_column("variant")
    for name in ("DINO", "CLIP-I", "CLIP-T", "CLIP-T +token", "images"):
        table.add_column(name, justify="right")

    def add(label: str, variant: str, row: dict[str, Any] | None, **style: Any) -> None:
        if row is None:
            table.add_row(label, variant, "-", "-", "-", "-", "0", **style)
            return
        table.add_row(
            label,
            variant,
            _fmt(row["dino"]),
            _fmt(row["clip_i"]),
            _fmt(row["clip_t"]),
            _fmt(row["clip_t_with_token"]),
            str(row["images"]),
            **style,
        )

    for entry in scores["prompts"]:
        add(entry["prompt"], "LoRA", entry["lora"])
        add("", "baseline", entry["baseline"], end_section=True)
    add(f"overall ({len(scores['prompts'])} prompts)", "LoRA", scores["overall"]["lora"], style="bold")
    add("", "baseline", scores["overall"]["baseline"], style="bold")
    console.print(table)
    embedded, cached = scores["embedded"], scores["cached"]
    err_console.print(
        "embedded now: " + ", ".join(f"{kind} {embedded[kind]} (cached {cached[kind]})" for kind in embedded),
        highlight=False,
    )
    if any(scorers[k]["model"].startswith("tiny-") for k in scorers):
        err_console.print("[yellow]tiny random scorer models: these numbers check the plumbing, not the LoRA[/]")
