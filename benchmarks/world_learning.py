"""Whether learning is real in the miniature world (issue 19, "What it must show, measured").

Run by hand (the world models must be built: `python -m sdlora.world build`):

    PYTHONPATH=src python benchmarks/world_learning.py --jobs 2 --json world_learning.json
    PYTHONPATH=src python benchmarks/world_learning.py --part lora --objects 1 --seeds 1 --steps-scale 0.05  # a quick check
    PYTHONPATH=src python benchmarks/world_learning.py --model world-sdxl --jobs 2   # the SDXL-architecture world model
    PYTHONPATH=src python benchmarks/world_learning.py --model world-flux --jobs 2   # FLUX.1's architecture
    PYTHONPATH=src python benchmarks/world_learning.py --model world-flux --part lora --set embedding.train=true

--model is the base model: world-sd (SD 1.x architecture, the default), world-sdxl (SDXL's) or world-flux
(FLUX.1 [dev]'s: sampled in 28 steps at its distilled guidance 3.5, the others in 20 at CFG 7.5).

Part `base` -- the base model draws what it is asked. The base model alone (no LoRA) samples world
captions "a photo of a red toy on the beach" over a --grid of (class, colour, background), each
value equally often, 2 images each (20 steps, seed 0); world-CLIP names each image's class, colour
and background zero-shot among `vocab.class_labels()`, `colour_labels()`, `background_labels()`.
Columns: `base model` = share of samples named as prompted; `real scenes` = the same for rendered
scenes of the same captions (what world-CLIP itself gets right: the most a sample can show);
`chance` = 1 / number of labels.

Part `lora` -- a LoRA learns the object. For each of --objects novel objects (60, a toy, and the
next ones of other classes; the class word is the object's class) and each of --seeds seeds S: 24
photos (photo seed S) -> prepare -> train with the world preset (seed S) -> sample "a photo of
sksToy <class> <background>" on 4 backgrounds, 2 images each, with the LoRA and without -> score
against 12 held-out photos of the object (photo seed 1000 + S, never trained on). Columns (mean
±std over runs; world_common.py says exactly how each is computed):
  DINO lora / base   world-DINO of the LoRA's / the base model's images to the held-out photos
  DINO described     the same for the base model's images of the object described in the world's words
                     ("an orange toy with blue dots, wheels and a handle"): a prompt alone, no LoRA
  ceiling            world-DINO of the held-out photos to the training photos
  CLIP-T lora / base world-CLIP image-prompt cosine, token removed (the LoRA should stay close to base)
  bg lora            share of LoRA images whose background world-CLIP names as the prompt's
  train s / run s    wall seconds of training / of the whole run (prepare, train, sample, score)
Every run is printed as it finishes; then the table per object and over all runs.

Time (--jobs 2 on the 2-core machine, one thread per run; the estimate is printed before starting):
about 1.5 min a run (36 photos rendered, 300 steps, 16 images), so ~8 min for the 9 runs, plus 1-2
min for part `base`. Beside a busy neighbour it takes 2-5 times as long.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world_common as wc  # noqa: E402  (benchmarks/ is a folder of scripts)
from sdlora.world import vocab  # noqa: E402
from sdlora.world.shipped import BASE, BASE_FLUX, BASE_XL  # noqa: E402

FIGURES = (
    "dino_lora",
    "dino_base",
    "described",
    "ceiling",
    "clip_t_lora",
    "clip_t_base",
    "bg_lora",
    "train_s",
    "run_s",
)
HEADER = (
    "object",
    "runs",
    "DINO lora",
    "DINO base",
    "DINO described",
    "ceiling",
    "CLIP-T lora",
    "CLIP-T base",
    "bg lora",
    "train s",
    "run s",
)


# ---- part base ---------------------------------------------------------------------------------


def grid(n: int) -> list[tuple[str, str, str]]:
    """n (class, colour, background) triples, each value cycling in turn (all distinct up to 120)."""
    colours, backgrounds = list(vocab.COLOURS), list(vocab.BACKGROUNDS)
    return [
        (vocab.CLASSES[i % len(vocab.CLASSES)], colours[i % len(colours)], backgrounds[i % len(backgrounds)])
        for i in range(n)
    ]


def caption(cls: str, colour: str, background: str) -> str:
    return vocab.caption(vocab.object_phrase(cls, colour, "plain", None, ()), background)


def base_samples(model: str, prompts: list[str], seed: int, batch: int = 8) -> list:
    """The base model's images of each prompt, IMAGES_PER_PROMPT each, in order."""
    import torch

    from sdlora.config import load_config
    from sdlora.models import load_pipeline

    pipe, family = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    size = load_config(wc.PRESET).data.resolution
    steps, guidance = wc.sampling(model)
    images = []
    for start in range(0, len(prompts), batch):
        out = pipe(
            prompt=prompts[start : start + batch],
            num_images_per_prompt=wc.IMAGES_PER_PROMPT,
            num_inference_steps=steps,
            guidance_scale=guidance,  # as `sdlora sample` (SDXL's pipeline defaults to 5)
            height=size,
            width=size,
            generator=torch.Generator("cpu").manual_seed(seed + start),
            **family.prompt_kwargs(pipe),  # as `sdlora sample` (world-flux's T5 window)
        )
        images += out.images
    return images


def real_scenes(triples: list[tuple[str, str, str]], seed: int) -> list:
    """Rendered scenes of the same captions (plain objects, random pose), IMAGES_PER_PROMPT each."""
    import numpy as np

    from sdlora.config import load_config
    from sdlora.world.objects import Composition, Details, WorldObject
    from sdlora.world.scenes import random_scene, render

    rng = np.random.default_rng(seed)
    size = load_config(wc.PRESET).data.resolution
    images = []
    for cls, colour, background in triples:
        obj = WorldObject(Composition(cls, colour, "plain", None, ()), Details())
        for _ in range(wc.IMAGES_PER_PROMPT):
            images.append(render(random_scene(rng, obj=obj, background=background), size)[0])
    return images


def part_base(model: str, n: int, seed: int) -> dict:
    triples = grid(n)
    attributes = {
        "class": (vocab.class_labels(), list(vocab.CLASSES), 0),
        "colour": (vocab.colour_labels(), list(vocab.COLOURS), 1),
        "background": (vocab.background_labels(), list(vocab.BACKGROUNDS), 2),
    }
    truth = [t for t in triples for _ in range(wc.IMAGES_PER_PROMPT)]
    start = time.perf_counter()
    captions = [caption(*t) for t in triples]
    sets = {"base model": base_samples(model, captions, seed), "real scenes": real_scenes(triples, seed)}
    results: dict = {"prompts": n, "images": len(truth)}
    for name, images in sets.items():
        for attribute, (labels, values, i) in attributes.items():
            chosen = wc.zero_shot(images, labels)
            results.setdefault(attribute, {})[name] = sum(values[c] == t[i] for c, t in zip(chosen, truth)) / len(truth)
    for attribute, (labels, _, _) in attributes.items():
        results[attribute]["chance"] = 1 / len(labels)
    results["seconds"] = time.perf_counter() - start
    rows = [[a, *(f"{results[a][c]:.0%}" for c in ("base model", "real scenes", "chance"))] for a in attributes]
    print(f"\n{model} draws what it is asked: world-CLIP zero-shot accuracy, {len(truth)} images of {n} prompts")
    print(wc.table(("attribute", "base model", "real scenes", "chance"), rows))
    print(f"({results['seconds']:.0f} s)")
    return results


# ---- part lora ---------------------------------------------------------------------------------


def learn(model: str, k: int, seed: int, work: Path, here: Path, steps_scale: float, flags: dict) -> dict:
    """One run of part lora (a pool worker): its figures."""
    start = time.perf_counter()
    cls = wc.object_class(k)
    folder = work / "photos" / f"k{k}-s{seed}"
    photos, _ = wc.render(folder, k, seed, wc.TRAIN_PHOTOS)
    heldout = wc.heldout_photos(work, k, seed)
    name = f"k{k}-s{seed}"
    dataset = wc.prepare(photos, here / "datasets" / name, cls)
    run, train_s = wc.train(dataset, here / "runs", name, seed, {"model.name": model, **flags}, steps_scale)
    figures = wc.measure(run, heldout, run.path / "bench-samples")
    figures["ceiling"] = wc.ceiling(wc.dataset_images(dataset, "train"), heldout)
    figures["described"] = described(model, k, seed, heldout)
    figures |= {"train_s": train_s, "run_s": time.perf_counter() - start, "object": k, "class": cls, "seed": seed}
    return figures


def described(model: str, k: int, seed: int, heldout: list[Path]) -> float:
    """world-DINO to the held-out photos of the base model's images of object k described in the world's words
    ("a photo of an orange toy with blue dots, wheels and a handle on the beach", over SAMPLE_BACKGROUNDS):
    what a prompt alone gets, with no LoRA. Every word is one the model learned; only the combination is new."""
    from sdlora.evaluate.score import pairwise_mean
    from sdlora.world.objects import novel_object

    comp = novel_object(k).composition
    phrase = vocab.object_phrase(comp.cls, comp.colour, comp.pattern, comp.pattern_colour, comp.features)
    images = base_samples(model, [vocab.caption(phrase, b) for b in wc.SAMPLE_BACKGROUNDS], seed)
    dino, _ = wc.scorers()
    return pairwise_mean(wc.embed(dino, images), wc.embed(dino, heldout))


def part_lora(
    model: str, objects: list[int], seeds: list[int], work: Path, steps_scale: float, jobs: int, flags: dict
) -> list[dict]:
    from sdlora.config import load_config

    here = wc.session(work)
    steps = load_config(wc.PRESET).train.max_steps * steps_scale
    prompts = len(wc.SAMPLE_BACKGROUNDS)
    per_run = wc.estimate_run_s(steps, 2 * prompts * wc.IMAGES_PER_PROMPT, wc.TRAIN_PHOTOS + wc.HELDOUT_PHOTOS)
    n = len(objects) * len(seeds)
    estimate = per_run * -(-n // jobs)
    print(
        f"\nA LoRA of {model} learns the object: objects {objects}, seeds {seeds}, {steps:.0f} steps {flags or ''}; "
        f"~{per_run:.0f} s a run"
    )
    runs, start = [], time.perf_counter()
    for figures in wc.run_jobs(
        learn, [(model, k, s, work, here, steps_scale, flags) for k in objects for s in seeds], jobs, estimate
    ):
        runs.append(figures)
        print(
            f"  object {figures['object']} ({figures['class']}) seed {figures['seed']}: "
            + ", ".join(f"{f} {figures[f]:.3f}" for f in FIGURES if not f.endswith("_s"))
            + f", train {figures['train_s']:.0f} s, run {figures['run_s']:.0f} s",
            flush=True,
        )
    groups = [(f"{k} {wc.object_class(k)}", [r for r in runs if r["object"] == k]) for k in objects]
    rows = [[label, str(len(rs)), *(str(wc.Spread.of(f, [r[f] for r in rs])) for f in FIGURES)] for label, rs in groups]
    rows.append(["all", str(len(runs)), *(str(wc.Spread.of(f, [r[f] for r in runs])) for f in FIGURES)])
    took = (time.perf_counter() - start) / 60
    print(
        f"\nA LoRA learns the object (mean ±std over runs; world-DINO to {wc.HELDOUT_PHOTOS} held-out photos; {took:.1f} min)"
    )
    print(wc.table(HEADER, rows))
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("base", "lora", "both"), default="both")
    parser.add_argument("--model", choices=(BASE, BASE_XL, BASE_FLUX), default=BASE, help="the world's base model")
    parser.add_argument("--grid", type=int, default=120, help="prompts of part base (120: every value equally often)")
    parser.add_argument("--objects", type=int, default=3, help="novel objects: 60 and the next of other classes")
    parser.add_argument("--object", type=int, action="append", help="a novel object to use (repeatable)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiplies the preset's steps (quick checks)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one thread each (2 on 2 cores)")
    parser.add_argument("--work", type=Path, help="folder for photos (reused) and runs (default: a new temp folder)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override of the LoRA runs (repeatable)",
    )
    args = parser.parse_args(argv)
    flags = {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in args.set)}
    wc.one_thread()
    work = args.work or Path(tempfile.mkdtemp(prefix="world-learning-"))
    print(f"work folder: {work}", file=sys.stderr)
    results: dict = {"model": args.model, "steps_scale": args.steps_scale, "flags": flags}
    if args.part in ("base", "both"):
        results["base"] = part_base(args.model, args.grid, seed=0)
    if args.part in ("lora", "both"):
        objects = args.object or wc.default_objects(args.objects)
        results["lora"] = part_lora(
            args.model, objects, list(range(args.seeds)), work, args.steps_scale, args.jobs, flags
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
