"""Every quality lever in one table, measured in the miniature world (issue 19; figures from the world, not SD).

Run by hand (the world models must be built: `python -m sdlora.world build`):

    PYTHONPATH=src python benchmarks/world_levers.py --jobs 2 --json world_levers.json
    PYTHONPATH=src python benchmarks/world_levers.py --rows defaults,dop --steps-scale 0.05  # a quick check
    PYTHONPATH=src python benchmarks/world_levers.py --list                                   # the rows

Each row trains a LoRA on novel object K (--objects: 60, a toy, then the next of other classes)
with the world preset (rank 8, lr 1e-3, 150 steps, 32 px) and one lever changed, for each of
--seeds seeds S (photo seed and training seed), samples "a photo of sksToy <class> <background>"
on 4 backgrounds and "a photo of a <class>", 2 images each, with the LoRA and without, and scores
them against 12 held-out photos of the object (world_common.py says exactly how). The defaults
row always runs: every other row is compared with it run by run (same object, same seed).
Rows that train the same settings share one training run ("no embedding" and the guidance rows
reuse "defaults").

Columns (mean ±std over the runs of a row):
  DINO        world-DINO of the LoRA's images to the held-out photos (higher: more the object)
  dDINO       minus the defaults row's, paired by object and seed
  CLIP-T      world-CLIP cosine of image and prompt, token removed (does the prompt still steer?)
  dCLIP-T     minus the defaults row's, paired
  drift       class drift: world-DINO of "a photo of a <class>" images to the held-out photos,
              with the LoRA minus without (how much the object leaks into its plain class; 0 is none)
  bg acc      share of the LoRA's images whose background world-CLIP names, zero-shot among the
              world's 8, as the prompt's (beach, snow, grass, night: never the cluttered room)
  train s     wall seconds of training, model load included (one thread per run)
The "base model" line is the baseline of the defaults runs (no LoRA, same prompts and seeds).
Below the table: the ceiling, world-DINO of the held-out photos to the training photos.

Rows (--rows, comma-separated; `--list` prints them): rank 4 / 16 (alpha = rank, as the preset's
8/8), learning rate x0.3 / x3, steps x0.5 / x2, pivotal tuning off (embedding.train false),
sampling at guidance 3 and 5 instead of 7.5 (same LoRA as the defaults row),
sampling without the trained token embedding (`sdlora sample --no-embedding`), cluttered photos without and with masks (photos of one cluttered room,
`write_photos(clutter=True)`, prepared with `--masks DIR` of their true masks, then
data.masked_loss; does the LoRA still draw the room when asked for the beach? see bg acc), DOP
(prior.preservation dop), Prodigy (lr 1.0), LoKr, LoHa, EMA (lora.ema_decay 0.995) and caption
dropout 0.1, captions that name each photo's background ("a photo of sksToy toy on the beach", imported as
`sdlora caption --from` does), and the `sdlora tune` winner: a sweep (TUNE_GRID x TUNE_STEPS, scored on the world
prompts against the dataset's val photos, which are the training seed's) on each run's own photos,
whose winning settings and step are then trained and measured as every other row.

Time: the estimate is printed before starting. Default settings (19 rows, 16 training runs x 2
seeds x 1 object = 32 runs) with --jobs 2 on the 2-core machine: about 20-25 min (1 min of it
rendering photos); beside a busy neighbour 2-5 times as long (a check of 6 rows at --steps-scale
0.05 took 10 min beside the world build and a test suite).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world_common as wc  # noqa: E402  (benchmarks/ is a folder of scripts)

PHOTOS = ("plain", "clutter", "clutter+masks")


@dataclass(frozen=True)
class Lever:
    key: str  # what --rows names
    label: str  # what the table shows
    flags: tuple[tuple[str, Any], ...] = ()  # dotted config flags on top of the world preset
    lr: float = 1.0  # times the preset's learning rate
    steps: float = 1.0  # times the preset's steps
    photos: str = "plain"  # one of PHOTOS
    background_captions: bool = False  # each photo's caption names its background (world_common.caption_backgrounds)
    embedding: bool = True  # sample with the trained token embedding
    guidance: float = wc.GUIDANCE  # sampling's classifier-free guidance
    tune: bool = False  # the settings come from an `sdlora tune` sweep on the run's photos (tune_winner)

    @property
    def training(self) -> tuple:
        """What the trained LoRA depends on: rows with the same share a run."""
        return (self.flags, self.lr, self.steps, self.photos, self.background_captions, self.tune)


LEVERS = (
    Lever("defaults", "defaults (world preset)"),
    Lever("rank4", "rank 4", (("lora.rank", 4), ("lora.alpha", 4))),
    Lever("rank16", "rank 16", (("lora.rank", 16), ("lora.alpha", 16))),
    Lever("lr0.3", "learning rate x0.3", lr=0.3),
    Lever("lr3", "learning rate x3", lr=3.0),
    Lever("steps0.5", "steps x0.5", steps=0.5),
    Lever("steps2", "steps x2", steps=2.0),
    Lever("pivotal-off", "pivotal tuning off", (("embedding.train", False),)),
    Lever("no-embedding", "sampled without the token embedding", embedding=False),
    Lever("guidance3", "sampled at guidance 3 (not 7.5)", guidance=3.0),
    Lever("guidance5", "sampled at guidance 5", guidance=5.0),
    Lever("clutter", "cluttered room, no masks", photos="clutter"),
    Lever(
        "clutter-masks", "cluttered room, masks + masked loss", (("data.masked_loss", True),), photos="clutter+masks"
    ),
    Lever("dop", "DOP (prior.preservation dop)", (("prior.preservation", "dop"),)),
    Lever("prodigy", "Prodigy (lr 1.0)", (("train.optimizer", "prodigy"), ("train.learning_rate", 1.0))),
    Lever("lokr", "LoKr", (("lora.lora_type", "lokr"),)),
    Lever("loha", "LoHa", (("lora.lora_type", "loha"),)),
    Lever("ema", "EMA 0.995", (("lora.ema_decay", 0.995),)),
    Lever("caption-dropout", "caption dropout 0.1", (("data.caption_dropout", 0.1),)),
    Lever("bg-captions", "captions name the background", background_captions=True),
    Lever("tune", "`sdlora tune` winner", tune=True),
)
BY_KEY = {lever.key: lever for lever in LEVERS}
DEFAULTS = LEVERS[0]
FIGURES = ("dino_lora", "clip_t_lora", "drift", "bg_lora", "train_s")
HEADER = ("lever", "runs", "DINO", "dDINO", "CLIP-T", "dCLIP-T", "drift", "bg acc", "train s")


def photos_of(work: Path, k: int, seed: int, kind: str) -> tuple[Path, Path | None]:
    """(photos, masks or None) of object k for seed `seed`: rendered once, shared by every row."""
    clutter = kind != "plain"
    photos, masks = wc.render(
        work / "photos" / f"k{k}-s{seed}-{'clutter' if clutter else 'plain'}", k, seed, wc.TRAIN_PHOTOS, clutter
    )
    return photos, masks if kind == "clutter+masks" else None


# The tune row's sweep: the preset's learning rate and rank, each with a neighbour, at half, all and twice
# the preset's 150 steps: 4 trials x 300 steps, about 5 minutes a run on one core.
TUNE_GRID = ("lr=3e-4,1e-3", "rank=8,16")
TUNE_STEPS = "75,150,300"
TUNE_KEYS = ("train.learning_rate", "lora.rank")


def tune_winner(dataset: Path, here: Path, name: str, seed: int, steps_scale: float) -> dict[str, Any]:
    """`sdlora tune` over TUNE_GRID x TUNE_STEPS on `dataset`, scored as world_common measures (the world
    prompts, 2 images each, world-DINO and world-CLIP) but against the dataset's val photos, as a user's
    sweep is: the winner's settings with its step as train.max_steps."""
    import subprocess

    from sdlora.world.shipped import CLIP, DINO

    steps = ",".join(str(max(1, round(int(n) * steps_scale))) for n in TUNE_STEPS.split(","))
    prompts = list(wc.subject_prompts("{class}", "{token}"))
    args = [sys.executable, "-m", "sdlora", "tune", "--config", wc.PRESET, "--dataset", str(dataset)]
    args += ["--runs-dir", str(here / "tune"), "--name", name, "--steps", steps, f"train.seed={seed}"]
    args += [f"train.max_steps={steps.split(',')[-1]}"]  # the preset's 150 would refuse a later scored step
    args += [part for grid in TUNE_GRID for part in ("--grid", grid)]
    args += [part for prompt in prompts for part in ("--prompt", prompt)]
    args += ["--seeds", str(wc.IMAGES_PER_PROMPT), "--sample-steps", str(wc.SAMPLE_STEPS)]
    args += ["--dino-model", DINO, "--clip-model", CLIP, "--clip-pretrained", "", "validation.prompts=[]"]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    winner = json.loads((here / "tune" / name / "tune.json").read_text(encoding="utf-8"))["winner"]
    flags = {key: winner["settings"][key] for key in TUNE_KEYS}
    flags["lora.alpha"] = flags["lora.rank"]  # as the rank rows: alpha = rank
    # wc.train multiplies the steps by --steps-scale again: the sweep's steps were scaled already.
    flags["train.max_steps"] = max(1, round(winner["step"] / steps_scale))
    return flags


def train_flags(lever: Lever, preset_lr: float) -> dict[str, Any]:
    flags: dict[str, Any] = {"train.learning_rate": preset_lr * lever.lr} if lever.lr != 1.0 else {}
    return flags | dict(lever.flags)


def run_levers(levers: list[Lever], k: int, seed: int, work: Path, here: Path, steps_scale: float) -> list[dict]:
    """One training run (the settings `levers` share) on object k, seed `seed`; each lever's figures (a pool worker)."""
    from sdlora.config import load_config

    first = levers[0]
    cls = wc.object_class(k)
    name = f"k{k}-s{seed}-{first.key}"
    photos, masks = photos_of(work, k, seed, first.photos)
    heldout = wc.heldout_photos(work, k, seed)
    dataset = wc.prepare(photos, here / "datasets" / name, cls, masks=masks)
    if first.background_captions:
        wc.caption_backgrounds(dataset, k, seed, wc.TRAIN_PHOTOS)
    flags = train_flags(first, load_config(wc.PRESET).train.learning_rate)
    if first.tune:
        flags |= tune_winner(dataset, here, name, seed, steps_scale)
    run, train_s = wc.train(dataset, here / "runs", name, seed, flags, first.steps * steps_scale)
    ceiling = wc.ceiling(wc.dataset_images(dataset, "train"), heldout)
    results = []
    for lever in levers:
        figures = wc.measure(
            run,
            heldout,
            run.path / f"bench-{lever.key}",
            drift=True,
            embedding=lever.embedding,
            guidance=lever.guidance,
        )
        figures |= {"lever": lever.key, "object": k, "seed": seed, "train_s": train_s, "ceiling": ceiling}
        figures["photos"] = lever.photos
        if lever.tune:
            figures["settings"] = {key: flags[key] for key in (*TUNE_KEYS, "train.max_steps")}
        results.append(figures)
    return results


def estimate_s(levers: list[Lever], steps_scale: float) -> float:
    from sdlora.config import load_config

    steps = load_config(wc.PRESET).train.max_steps * steps_scale
    images = 2 * (len(wc.SAMPLE_BACKGROUNDS) + 1) * wc.IMAGES_PER_PROMPT
    cost = 1.6 if any(flag == ("prior.preservation", "dop") for flag in levers[0].flags) else 1.0  # DOP: a forward more
    estimate = wc.estimate_run_s(steps * levers[0].steps * cost, images * len(levers))
    if levers[0].tune:  # the sweep: its trials' steps, then each point's images (and the base model's once)
        trials, scored = 4, [int(n) * steps_scale for n in TUNE_STEPS.split(",")]
        estimate += wc.estimate_run_s(trials * max(scored), (trials * len(scored) + 1) * 8) + trials * wc.RUN_OVERHEAD_S
    return estimate


def summary(runs: list[dict], levers: list[Lever]) -> str:
    defaults = {(r["object"], r["seed"]): r for r in runs if r["lever"] == DEFAULTS.key}

    def paired(rs: list[dict], figure: str) -> wc.Spread:
        return wc.Spread([r[figure] - defaults[(r["object"], r["seed"])][figure] for r in rs])

    base = list(defaults.values())
    rows = [
        ["base model (no LoRA)", str(len(base))]
        + [str(wc.Spread([r["dino_base"] for r in base])), "", str(wc.Spread([r["clip_t_base"] for r in base]))]
        + ["", "0", str(wc.Spread([r["bg_base"] for r in base])), ""]
    ]
    for lever in levers:
        rs = [r for r in runs if r["lever"] == lever.key]
        spread = {f: str(wc.Spread.of(f, [r[f] for r in rs])) for f in FIGURES}
        delta = {f: "" if lever is DEFAULTS else str(paired(rs, f)) for f in ("dino_lora", "clip_t_lora")}
        rows.append(
            [lever.label, str(len(rs)), spread["dino_lora"], delta["dino_lora"], spread["clip_t_lora"]]
            + [delta["clip_t_lora"], spread["drift"], spread["bg_lora"], spread["train_s"]]
        )
    once = {(r["object"], r["seed"], r["photos"]): r["ceiling"] for r in runs}  # rows share photos
    ceilings = {kind: wc.Spread([c for (_, _, p), c in once.items() if p == kind]) for kind in PHOTOS}
    footer = ", ".join(f"{kind} photos {spread}" for kind, spread in ceilings.items() if spread.values)
    winners = [
        f"object {r['object']} seed {r['seed']}: " + ", ".join(f"{k} {v}" for k, v in r["settings"].items())
        for r in runs
        if "settings" in r
    ]
    tuned = "".join(f"\ntune winner, {line}" for line in winners)
    return wc.table(HEADER, rows) + f"\nceiling (world-DINO of held-out to training photos): {footer}" + tuned


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows", default=",".join(BY_KEY), help="comma-separated lever keys (--list); defaults always runs"
    )
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    parser.add_argument("--objects", type=int, default=1, help="novel objects: 60 and the next of other classes")
    parser.add_argument("--object", type=int, action="append", help="a novel object to use (repeatable)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every row's steps (quick checks)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one thread each (2 on 2 cores)")
    parser.add_argument("--work", type=Path, help="folder for photos (reused) and runs (default: a new temp folder)")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{lever.key:16} {lever.label}" for lever in LEVERS))
        return
    unknown = [key for key in args.rows.split(",") if key not in BY_KEY]
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)} (see --list)")
    keys = set(args.rows.split(",")) | {DEFAULTS.key}
    levers = [lever for lever in LEVERS if lever.key in keys]
    objects = args.object or wc.default_objects(args.objects)
    seeds = list(range(args.seeds))
    wc.one_thread()
    work = args.work or Path(tempfile.mkdtemp(prefix="world-levers-"))
    print(f"work folder: {work}", file=sys.stderr)

    groups: dict[tuple, list[Lever]] = {}
    for lever in levers:
        groups.setdefault(lever.training, []).append(lever)
    here = wc.session(work)
    jobs = [(group, k, s, work, here, args.steps_scale) for group in groups.values() for k in objects for s in seeds]
    jobs.sort(key=lambda job: -estimate_s(job[0], args.steps_scale))  # longest first: the two workers end together
    total = sum(estimate_s(job[0], args.steps_scale) for job in jobs) / max(1, min(args.jobs, len(jobs)))
    rooms = len({lever.photos == "plain" for lever in levers})  # plain photos, the cluttered room's, or both
    photos = len(objects) * len(seeds) * (wc.HELDOUT_PHOTOS + rooms * wc.TRAIN_PHOTOS)
    print(f"{len(levers)} rows, objects {objects}, seeds {seeds}, steps x{args.steps_scale}", file=sys.stderr)
    print(
        f"rendering {photos} photos first (none already in --work): about {photos * wc.PHOTO_S / 60:.0f} min",
        file=sys.stderr,
    )
    start = time.perf_counter()
    for k in objects:  # render and prepare the shared photos once, before the workers race for them
        for s in seeds:
            wc.heldout_photos(work, k, s)
            for kind in {lever.photos for lever in levers}:
                photos_of(work, k, s, kind)
    runs: list[dict] = []
    for results in wc.run_jobs(run_levers, jobs, args.jobs, total):
        for r in results:
            print(
                f"  {r['lever']} object {r['object']} seed {r['seed']}: DINO {r['dino_lora']:.3f} "
                f"(base {r['dino_base']:.3f}), CLIP-T {r['clip_t_lora']:.3f}, drift {r['drift']:+.3f}, "
                f"bg {r['bg_lora']:.2f}, train {r['train_s']:.0f} s",
                flush=True,
            )
        runs += results
    print(
        f"\nQuality levers in the world: objects {objects} x seeds {seeds} ({(time.perf_counter() - start) / 60:.1f} min)"
    )
    print(summary(runs, levers))
    if args.json:
        args.json.write_text(
            json.dumps({"steps_scale": args.steps_scale, "runs": runs}, indent=1) + "\n", encoding="utf-8"
        )


if __name__ == "__main__":
    main()
