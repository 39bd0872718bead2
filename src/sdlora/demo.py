"""The offline demo: the whole pipeline on rendered example photos and tiny random models.

prepare -> caption check -> train (tiny-sd) -> sample (LoRA and baseline) -> score (tiny
scorers); the `sdlora demo` command then refreshes the report (`sdlora.cli._common.refresh_report`,
as after every verb). It needs no network and about a minute of a laptop CPU. The numbers it
prints show that every stage works, not quality: tiny random models draw noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sdlora.errors import DataError

DEMO_PROMPTS = ("sksToy on a beach", "sksToy in the snow")


@dataclass
class DemoResult:
    photos: Path
    dataset: Path
    run_dir: Path
    samples_json: Path
    scores: dict[str, Any]


def run_demo(
    out_dir: str | Path = "sdlora-demo",
    *,
    photos: str | Path | None = None,
    model: str = "tiny-sd",
    steps: int = 30,
    on_phase: Callable[[str], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> DemoResult:
    """Run every stage into `out_dir`: photos/, dataset/, runs/<demo>/ (the caller writes report.html)."""
    from sdlora import config as config_mod
    from sdlora.data.captions import check_captions
    from sdlora.data.ingest import prepare_dataset
    from sdlora.evaluate.score import score_run
    from sdlora.example_photos import write_example_photos
    from sdlora.generate import generate_samples
    from sdlora.run import load_run
    from sdlora.train.loop import run_training

    phase = on_phase or (lambda name: None)
    out_dir = Path(out_dir).resolve()
    if photos is None:
        phase("render example photos")
        photos = out_dir / "photos"
        write_example_photos(photos)

    phase("prepare")
    dataset = out_dir / "dataset"
    prepare_dataset(str(photos), dataset, resolution=64, on_progress=on_progress)

    phase("caption check")
    check = check_captions(dataset)
    if not check.ok:
        raise DataError(
            f"{dataset / 'captions.txt'}: {len(check.problems)} caption problem(s); run `sdlora caption --check {dataset}`"
        )

    phase("train")
    cfg = config_mod.load_config(
        "tiny",
        {
            "model.name": model,
            "data.dataset": str(dataset),
            "train.max_steps": steps,
            "validation.validate_every": max(1, steps // 2),
            "checkpoint.checkpoint_every": steps,
            "run.runs_dir": str(out_dir / "runs"),
        },
    )
    result = run_training(cfg, on_event=on_event)
    run = load_run(result.run_dir)

    phase("sample")
    samples_json = generate_samples(run, list(DEMO_PROMPTS), num_images=2, steps=10, on_progress=on_progress)

    phase("score")
    scores = score_run(
        run,
        samples_json=samples_json,
        dino_model="tiny-dino",
        clip_model="tiny-clip",
        clip_pretrained=None,
        on_progress=on_progress,
    )
    return DemoResult(Path(photos), dataset, run.path, samples_json, scores)
