"""The offline demo: the whole pipeline in the miniature world (sdlora/world/), where learning is real.

render photos of a novel world object -> prepare -> caption check -> train (world-sd) -> sample
(LoRA and baseline) -> score (world-dino, world-clip); the `sdlora demo` command then refreshes the
report (`sdlora.cli._common.refresh_report`, as after every verb). world-sd is an SD 1.x pipeline
trained on the world's scenes and shipped with sdlora; it never saw the demo's object, so the
baseline cannot draw sksToy and the LoRA learns it. It needs no network and a couple of minutes
of a 2-core CPU. With `--model tiny-sd` / `tiny-sdxl` (random weights) it only shows that every
stage runs: their images are noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sdlora.errors import DataError
from sdlora.world import vocab
from sdlora.world.shipped import BASE, BASE_FLUX, BASE_XL, CLIP, DINO

DEMO_OBJECT = 60  # a novel world object of class toy: "orange toy with blue dots, wheels and a handle"
DEMO_PHOTOS = 24
SUBJECT = "sksToy toy"
DEMO_BACKGROUNDS = ("beach", "snow")
DEMO_PROMPTS = tuple(f"a photo of {SUBJECT} {vocab.BACKGROUNDS[b].phrase}" for b in DEMO_BACKGROUNDS)
SHEET = "demo.png"  # under the demo's folder
# The demo's models and the preset each trains with: the world's, or the tiny one (random weights).
PRESET = {BASE: "world", BASE_XL: "world", BASE_FLUX: "world", "tiny-sd": "tiny", "tiny-sdxl": "tiny"}
WORLD_MODELS = (BASE, BASE_XL, BASE_FLUX)  # the models that learn: the world's photos and scorers go with them
DEMO_MODELS = tuple(PRESET)


@dataclass
class DemoResult:
    photos: Path
    dataset: Path
    run_dir: Path
    samples_json: Path
    scores: dict[str, Any]
    sheet: Path


def run_demo(
    out_dir: str | Path = "sdlora-demo",
    *,
    photos: str | Path | None = None,
    model: str = BASE,
    steps: int | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> DemoResult:
    """Run every stage into `out_dir`: photos/, dataset/, runs/<demo>/ (the caller writes report.html).
    `steps` None: the preset's."""
    from sdlora import config as config_mod
    from sdlora.data.captions import check_captions
    from sdlora.data.ingest import prepare_dataset
    from sdlora.evaluate.score import score_run
    from sdlora.generate import generate_samples
    from sdlora.run import load_run
    from sdlora.train.loop import run_training

    phase = on_phase or (lambda name: None)
    out_dir = Path(out_dir).resolve()
    flags: dict[str, Any] = {"model.name": model, "data.dataset": str(out_dir / "dataset")}
    flags["run.runs_dir"] = str(out_dir / "runs")
    if steps is not None:
        flags |= {"train.max_steps": steps, "validation.validate_every": max(1, steps // 2)}
        flags["checkpoint.checkpoint_every"] = steps
    cfg = config_mod.load_config(PRESET[model], flags)
    if photos is None:
        phase("render photos of a novel object")
        photos = out_dir / "photos"
        _render_photos(photos, model)

    phase("prepare")
    dataset = Path(cfg.data.dataset)
    prepare_dataset(str(photos), dataset, resolution=cfg.data.resolution, on_progress=on_progress)

    phase("caption check")
    check = check_captions(dataset)
    if not check.ok:
        raise DataError(
            f"{dataset / 'captions.txt'}: {len(check.problems)} caption problem(s); run `sdlora caption --check {dataset}`"
        )

    phase("train")
    result = run_training(cfg, on_event=on_event)
    run = load_run(result.run_dir)

    phase("sample")
    samples_json = generate_samples(run, list(DEMO_PROMPTS), num_images=2, on_progress=on_progress)

    phase("score")
    world = model in WORLD_MODELS
    scores = score_run(
        run,
        samples_json=samples_json,
        dino_model=DINO if world else "tiny-dino",
        clip_model=CLIP if world else "tiny-clip",
        clip_pretrained=None,
        on_progress=on_progress,
    )
    sheet = write_sheet(out_dir / SHEET, dataset, samples_json)
    return DemoResult(Path(photos), dataset, run.path, samples_json, scores, sheet)


def write_sheet(path: Path, dataset: Path, samples_json: Path, zoom: int = 3) -> Path:
    """One PNG to look at: four training photos, the base model's images and the LoRA's, prompt after
    prompt (the README's first picture is one of these)."""
    from PIL import Image, ImageDraw

    from sdlora.data.manifest import IMAGES, load_manifest
    from sdlora.evaluate.score import load_samples
    from sdlora.fsutil import atomic_path

    samples = load_samples(samples_json)  # in the order sampled: image 0, 1, ... of each prompt
    prompts = list(dict.fromkeys(sample.prompt for sample in samples))
    rows = [("training photos", [dataset / IMAGES / name for name in load_manifest(dataset).train[:4]])]
    for variant, label in (("baseline", "base model"), ("lora", "with the LoRA")):
        shown = sorted((s for s in samples if s.variant == variant), key=lambda s: prompts.index(s.prompt))
        rows.append((f"{label}: " + " | ".join(prompts), [sample.file for sample in shown]))
    with Image.open(samples[0].file) as first:
        side = first.height * zoom
    columns = max(len(files) for _, files in rows)
    sheet = Image.new("RGB", (columns * (side + 4) + 4, len(rows) * (side + 18) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, files) in enumerate(rows):
        top = 4 + r * (side + 18)
        draw.text((4, top), label, fill="black")
        for c, file in enumerate(files):
            with Image.open(file) as image:
                sheet.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (4 + c * (side + 4), top + 14))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _render_photos(folder: Path, model: str) -> None:
    """The world's phone photos of the demo object; the tiny models get the example toy car."""
    if model in WORLD_MODELS:
        from sdlora.world.photos import write_photos

        write_photos(folder, DEMO_OBJECT, DEMO_PHOTOS)
    else:
        from sdlora.example_photos import write_example_photos

        write_example_photos(folder)
