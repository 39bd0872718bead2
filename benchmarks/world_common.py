"""Shared by world_learning.py and world_levers.py: one LoRA run in the miniature world, measured.

A run: photos of novel world object K (`sdlora.world.photos.write_photos`, photo seed S) ->
`prepare_dataset` (class word: the object's class) -> `run_training` with the world preset (seed S,
plus the row's flags) -> `generate_samples` of "a photo of sksToy <class> <background>" over
SAMPLE_BACKGROUNDS (and "a photo of a <class>" for class drift), with the LoRA and without (same
seeds) -> sdlora's own `score_samples` against HELD-OUT photos: the same object rendered with
another photo seed and prepared the same way, never trained on (score_run would compare against
the dataset's val split, which comes from the training seed's photos).

Figures (cosines as score reports them, -1..1):
  dino_lora / dino_base    world-DINO, mean over (generated image, held-out photo) pairs
  clip_t_lora / clip_t_base  world-CLIP cos(image, prompt with the token removed), as `score` does
  ceiling                  world-DINO between the held-out photos and the training photos
  drift                    world-DINO of "a photo of a <class>" images to the held-out photos,
                           with the LoRA minus without (how much the object leaks into the class)
  bg_lora / bg_base        share of images whose background world-CLIP names zero-shot as the prompt's
  train_s                  wall seconds of run_training (model load included)

Threads: every run, in this process or a pool worker, gets ONE thread and OMP_WAIT_POLICY=PASSIVE
(which `import sdlora` now sets too), set here before torch is imported. Beside a busy neighbour, sampling two 32 px images took
85 s with torch's 2 threads spinning at their barriers (OMP_WAIT_POLICY unset), 1.6 s with PASSIVE
and 1.0 s with one thread (measured 2026-12-06 beside the world build). Two runs side by side
(--jobs 2) use both cores.

Not a script: the two benchmarks import it (benchmarks/ is a folder of scripts).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (module docstring)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the world's models are local: no hub probes

import functools  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterable, Sequence  # noqa: E402

from sdlora.world import vocab  # noqa: E402
from sdlora.world.objects import novel_object  # noqa: E402
from sdlora.world.shipped import CLIP, DINO  # noqa: E402

PRESET = "world"
TRAIN_PHOTOS = 24  # prepare splits them 19 train / 5 val (its default --val-fraction 0.2)
HELDOUT_PHOTOS = 12
HELDOUT_SEED = 1000  # held-out photos use photo seed HELDOUT_SEED + S: other poses, backgrounds, noise
SAMPLE_BACKGROUNDS = ("beach", "snow", "grass", "night")  # not "table": the cluttered room is one
IMAGES_PER_PROMPT = 2
SAMPLE_STEPS = 20
GUIDANCE = 7.5  # sdlora sample's default for SD 1.x; world_levers.py's guidance rows change it


def sampling(model: str) -> tuple[int, float]:
    """(steps, guidance) the benchmarks sample `model` with: SAMPLE_STEPS at classifier-free GUIDANCE for the
    UNet models; FLUX.1 [dev]'s own for world-flux (28 steps at the distilled guidance 3.5, its family's
    defaults, what `sdlora sample` uses)."""
    from sdlora.models.families.flux import DEV_STEPS, FLUX1
    from sdlora.world.shipped import BASE_FLUX

    return (DEV_STEPS, FLUX1.sample_guidance) if model == BASE_FLUX else (SAMPLE_STEPS, GUIDANCE)


FIRST_OBJECT = 60  # the demo's object (a toy)


# ---- the world's objects and prompts -----------------------------------------------------------


def object_class(k: int) -> str:
    return novel_object(k).composition.cls


def default_objects(n: int, first: int = FIRST_OBJECT) -> list[int]:
    """`first` and the next novel objects of classes not taken yet (60 toy, 61 car, 63 ball)."""
    chosen, k = [first], first
    while len(chosen) < n:
        k += 1
        if object_class(k) not in {object_class(c) for c in chosen} or k > first + 1000:
            chosen.append(k)
    return chosen


def subject_prompts(class_word: str, token: str) -> dict[str, str]:
    """prompt -> background key: "a photo of sksToy toy on the beach" over SAMPLE_BACKGROUNDS."""
    prompts = vocab.prompts(f"{token} {class_word}")  # in vocab.BACKGROUNDS order
    return {prompts[list(vocab.BACKGROUNDS).index(b)]: b for b in SAMPLE_BACKGROUNDS}


def class_prompt(class_word: str) -> str:
    return f"a photo of {vocab.article(class_word)} {class_word}"


# ---- photos and datasets -----------------------------------------------------------------------


def render(folder: Path, k: int, seed: int, count: int, clutter: bool = False) -> tuple[Path, Path]:
    """Photos of object k (photo seed `seed`) in folder/photos and their true masks in folder/masks;
    rendered once (deterministic), then reused."""
    from sdlora.world.photos import write_photos

    photos, masks, done = folder / "photos", folder / "masks", folder / ".done"
    if not done.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        write_photos(photos, k, count, seed=seed, clutter=clutter, masks=masks)
        done.touch()
    return photos, masks


def prepare(photos: Path, out: Path, class_word: str, *, masks: Path | None = None, val_fraction: float = 0.2) -> Path:
    from sdlora.config import load_config
    from sdlora.data.ingest import prepare_dataset

    resolution = load_config(PRESET).data.resolution
    prepare_dataset(
        str(photos),
        out,
        resolution=resolution,
        class_word=class_word,
        masks=str(masks) if masks else None,
        val_fraction=val_fraction,
        workers=1,
    )
    return out


def caption_backgrounds(dataset: Path, k: int, seed: int, count: int) -> None:
    """Name each photo's background in its caption ("a photo of sksToy toy on the beach", not "... toy"), as a
    user would write them and import them (`sdlora caption --from`): the world knows every photo's background."""
    from sdlora.data.captioning import caption_dataset
    from sdlora.data.manifest import load_manifest
    from sdlora.world.photos import render_photos

    manifest = load_manifest(dataset)
    subject = f"{manifest.token} {manifest.class_word}"
    lines = [
        f"{Path(photo.name).stem}|a photo of {subject} {vocab.BACKGROUNDS[photo.scene.background].phrase}"
        for photo in render_photos(k, count, seed)
    ]
    source = dataset.parent / f"{dataset.name}-captions.txt"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    caption_dataset(dataset, source=source, overwrite=True)


def dataset_images(dataset: Path, split: str) -> list[Path]:
    from sdlora.data.manifest import IMAGES, load_manifest

    manifest = load_manifest(dataset)
    names = {"train": manifest.train, "val": manifest.val, "all": manifest.train + manifest.val}[split]
    return [dataset / IMAGES / name for name in names]


def heldout_photos(work: Path, k: int, seed: int) -> list[Path]:
    """The held-out photos of object k for training seed `seed`, prepared (every one, no val split)."""
    folder = work / "photos" / f"k{k}-s{HELDOUT_SEED + seed}"
    photos, _ = render(folder, k, HELDOUT_SEED + seed, HELDOUT_PHOTOS)
    dataset = folder / "dataset"
    if not (dataset / "manifest.json").is_file():
        prepare(photos, dataset, object_class(k), val_fraction=0.0)
    return dataset_images(dataset, "all")


# ---- scorers -----------------------------------------------------------------------------------


@functools.cache
def scorers() -> tuple[Any, Any]:
    """(world-DINO, world-CLIP), loaded once per process."""
    from sdlora.evaluate.clip import load_clip
    from sdlora.evaluate.dino import load_dino

    return load_dino(DINO), load_clip(CLIP, None)


def embed(scorer: Any, images: Sequence[Any], batch: int = 32) -> Any:
    """Embeddings of PIL images or image paths, a row each."""
    import torch
    from PIL import Image

    def rgb(im: Any) -> Any:
        if isinstance(im, (str, Path)):
            with Image.open(im) as opened:
                return opened.convert("RGB")
        return im.convert("RGB")

    return torch.cat([scorer.embed([rgb(im) for im in images[i : i + batch]]) for i in range(0, len(images), batch)])


def zero_shot(images: Sequence[Any], labels: Sequence[str]) -> list[int]:
    """world-CLIP's zero-shot choice among `labels` for each image (index into labels)."""
    import torch

    _, clip = scorers()
    image = torch.nn.functional.normalize(embed(clip, images).float(), dim=-1)
    text = torch.nn.functional.normalize(clip.embed_text(list(labels)).float(), dim=-1)
    return (image @ text.T).argmax(dim=1).tolist()


def ceiling(train: Sequence[Path], heldout: Sequence[Path]) -> float:
    """Mean world-DINO over (held-out photo, training photo) pairs: what a perfect copy would score."""
    from sdlora.evaluate.score import pairwise_mean

    dino, _ = scorers()
    return pairwise_mean(embed(dino, heldout), embed(dino, train))


# ---- training, sampling, measuring -------------------------------------------------------------


def train(dataset: Path, runs: Path, name: str, seed: int, flags: dict[str, Any], steps_scale: float = 1.0):
    """`run_training` with the world preset, seed `seed`, `flags` on top and its steps times
    `steps_scale`; no sample images or checkpoints on the way (they change no weight). Returns
    (RunInfo, wall seconds)."""
    from sdlora.config import load_config
    from sdlora.run import load_run
    from sdlora.train.loop import run_training

    base = load_config(PRESET, flags)
    steps = max(1, round(base.train.max_steps * steps_scale))
    all_flags = {
        **flags,
        "data.dataset": str(dataset),
        "run.runs_dir": str(runs),
        "run.name": name,
        "train.seed": seed,
        "train.max_steps": steps,
        "validation.prompts": [],
        "validation.validate_every": 0,
        "checkpoint.checkpoint_every": 0,
    }
    start = time.perf_counter()
    result = run_training(load_config(PRESET, all_flags))
    return load_run(result.run_dir), time.perf_counter() - start


def _pooled(entries: Iterable[dict[str, Any]], key: str) -> float:
    entries = [e for e in entries if e is not None]
    return sum(e[key] * e["images"] for e in entries) / sum(e["images"] for e in entries)


def measure(
    run: Any,
    heldout: Sequence[Path],
    out_dir: Path,
    *,
    drift: bool = False,
    embedding: bool = True,
    guidance: float | None = None,
) -> dict[str, float]:
    """Sample the run (LoRA and baseline, same seeds, `guidance` (None: the model's, `sampling`); `embedding` False:
    without the token's trained embedding, as `sdlora sample --no-embedding`) and score it against
    `heldout` (module docstring)."""
    from sdlora.evaluate.score import load_samples, score_samples
    from sdlora.generate import generate_samples

    steps, default_guidance = sampling(run.model)
    backgrounds = subject_prompts(run.class_word, run.token)
    prompts = list(backgrounds) + ([class_prompt(run.class_word)] if drift else [])
    samples_json = generate_samples(
        run,
        prompts,
        out_dir=out_dir,
        num_images=IMAGES_PER_PROMPT,
        steps=steps,
        guidance=default_guidance if guidance is None else guidance,
        embedding=embedding,
    )
    samples = load_samples(samples_json)
    dino, clip = scorers()
    scored = score_samples(
        samples, list(heldout), token=run.token, dino=dino, clip=clip, cache_dir=out_dir / "embeddings"
    )
    per_prompt = {e["prompt"]: e for e in scored["prompts"]}
    figures: dict[str, float] = {}
    for variant, short in (("lora", "lora"), ("baseline", "base")):
        subject = [per_prompt[p][variant] for p in backgrounds]
        figures[f"dino_{short}"] = _pooled(subject, "dino")
        figures[f"clip_t_{short}"] = _pooled(subject, "clip_t")
        shown = [s for s in samples if s.variant == variant and s.prompt in backgrounds]
        labels = list(vocab.BACKGROUNDS)
        chosen = zero_shot([s.file for s in shown], vocab.background_labels())
        figures[f"bg_{short}"] = sum(labels[c] == backgrounds[s.prompt] for c, s in zip(chosen, shown)) / len(shown)
    if drift:
        entry = per_prompt[class_prompt(run.class_word)]
        figures["drift"] = entry["lora"]["dino"] - entry["baseline"]["dino"]
    return figures


# ---- running jobs and printing -----------------------------------------------------------------


def one_thread() -> None:
    """One torch thread in this process (module docstring), and no loading bars or library chatter
    between the figures; pool workers run it first."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(1)
    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int, estimate_s: float) -> Iterable[Any]:
    """fn(*job) for each job, `workers` processes at a time (1: in this process), yielding results as
    they finish, with the elapsed time and the projected end on stderr."""
    start = time.perf_counter()

    def progress(done: int) -> None:
        elapsed = time.perf_counter() - start
        left = elapsed / done * (len(jobs) - done)
        print(f"[{done}/{len(jobs)}] {elapsed / 60:.1f} min so far, about {left / 60:.1f} min left", file=sys.stderr)

    print(f"{len(jobs)} runs, {workers} at a time: about {estimate_s / 60:.0f} min in all", file=sys.stderr)
    if workers <= 1:
        for i, job in enumerate(jobs):
            yield fn(*job)
            progress(i + 1)
        return
    import multiprocessing  # spawned workers inherit the environment set at the top of this module

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=one_thread) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for i, future in enumerate(as_completed(futures)):
            yield future.result()
            progress(i + 1)


@dataclass
class Spread:
    """Mean and spread of one figure over runs: printed "mean ±std" (sample std); min and max kept."""

    values: list[float] = field(default_factory=list)
    digits: int = 3

    @classmethod
    def of(cls, figure: str, values: list[float]) -> "Spread":
        """Seconds (figures named *_s) as whole numbers, cosines and shares to 3 decimals."""
        return cls(values, 0 if figure.endswith("_s") else 3)

    def __str__(self) -> str:
        if not self.values:
            return "-"
        mean, d = statistics.fmean(self.values), self.digits
        return f"{mean:.{d}f}" if len(self.values) == 1 else f"{mean:.{d}f} ±{self.std:.{d}f}"

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# Rough wall seconds on one core of the 2-core machine, to print an estimate before starting (seen
# on 2026-12-06 with the build's mini weights, same architecture): per training step of world-sd at
# 32 px (batch 1, token embedding trained), per sampled image (20 steps, both CFG halves), per photo
# rendered (640x480, then HEIC/JPEG) and per run's fixed cost (model loads, prepare, scoring).
STEP_S = 0.15
IMAGE_S = 0.6
PHOTO_S = 0.5
RUN_OVERHEAD_S = 15.0


def estimate_run_s(steps: float, images: int, photos: int = 0) -> float:
    return RUN_OVERHEAD_S + steps * STEP_S + images * IMAGE_S + photos * PHOTO_S


def session(work: Path) -> Path:
    """This invocation's folder for datasets and runs under `work` (photos there are shared and reused)."""
    return work / time.strftime("session-%Y%m%d-%H%M%S")
