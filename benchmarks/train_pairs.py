"""diffusers' DreamBooth LoRA example against `sdlora train`, in interleaved pairs, with the load beside each.

Run by hand (tens of minutes on 2 shared cores; the SD 1.5-size model folder of train_speed.py, ~5 GB):

    .venv/bin/python benchmarks/train_pairs.py --pairs 3 \
        --diffusers-script /path/to/diffusers/examples/dreambooth/train_dreambooth_lora.py

On a shared machine one sitting of A-then-B says little: a neighbour that starts halfway slows
whichever side runs then. So each pair runs the example, then `sdlora train`, then the bare UNet
floor (train_speed.py's worker), one right after the other, and the pairs repeat; every figure is
quoted pair by pair with the 1-minute load average sampled while it ran, then the median of the
pairs and their spread (min-max). Each side's s/step is the marginal between runs of `--steps`
counts (../shared/PERFORMANCE.md); beside it stands the in-loop step: sdlora's median `step_time_s`
from its metrics.jsonl (steps after the first), the example's last rate on its tqdm bar. Under load
the in-loop figures are the ones to read: a run's start-up (model load, page faults) then varies by
more than two or three steps cost, which the marginal takes as steps.

Threads: accelerate's launcher gives the example OMP_NUM_THREADS=1 unless it is set or `--cpu` is
passed; `--threads N` sets OMP_NUM_THREADS=N for all three processes (equal settings), and without
it each runs with its own default (the table says which).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402  (benchmarks/ is a folder of scripts)

SIDES = ("example", "sdlora", "floor")  # the order within a pair
DEFAULT_TRAIN_ARGS = "--mixed-precision no --no-train-token-embedding"  # the example's settings: fp32, no embedding


# ----------------------------------------------------------------------------- pairing (no model: tested)
def schedule(pairs: int, sides: Sequence[str] = SIDES) -> list[tuple[int, str]]:
    """The run order: every side once per pair, pair after pair (A B A B ...)."""
    return [(pair, side) for pair in range(pairs) for side in sides]


@dataclass
class Spread:
    """The median of figures taken pair by pair, and their min and max."""

    values: list[float]
    median: float = field(init=False)
    low: float = field(init=False)
    high: float = field(init=False)

    def __post_init__(self) -> None:
        self.median = statistics.median(self.values) if self.values else float("nan")
        self.low = min(self.values, default=float("nan"))
        self.high = max(self.values, default=float("nan"))

    def __str__(self) -> str:
        return f"{self.median:.2f} ({self.low:.2f}-{self.high:.2f})"


def pair_ratios(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> Spread:
    """numerator / denominator within each pair (a pair missing either side is left out)."""
    return Spread([n / d for n, d in zip(numerators, denominators) if n is not None and d])


def marginal(small: tuple[int, float], large: tuple[int, float]) -> tuple[float, float]:
    """(s/step, start-up s) from (steps, wall s) of two runs: the difference cancels start-up."""
    (n1, t1), (n2, t2) = small, large
    per_step = (t2 - t1) / (n2 - n1)
    return per_step, t1 - n1 * per_step


def in_loop_median(metrics: Path, skip_first: int = 1) -> float | None:
    """The median `step_time_s` of a run's metrics.jsonl, after its first `skip_first` steps (warm-up)."""
    from sdlora.run import Metric, read_metrics

    times = [r[Metric.STEP_TIME] for r in read_metrics(metrics) if r.get(Metric.STEP_TIME) is not None]
    times = times[skip_first:]
    return statistics.median(times) if times else None


def tqdm_step_s(output: str) -> float | None:
    """The step time of the last rate a tqdm progress bar printed (the diffusers example's), or None.
    tqdm shows an exponential mean of the recent steps' rates, as `6.71s/it` or `1.52it/s`."""
    rates = re.findall(r"(\d+(?:\.\d+)?)(s/it|it/s)", output)
    if not rates:
        return None
    value, unit = rates[-1]
    return float(value) if unit == "s/it" else 1.0 / float(value) if float(value) else None


class LoadSampler:
    """The 1-minute load average, sampled every `every` s while a block runs: its mean, min and max."""

    def __init__(self, every: float = 1.0, read: Callable[[], float] = lambda: os.getloadavg()[0]):
        self.every, self.read, self.samples = every, read, []
        self._stop = threading.Event()

    def _run(self) -> None:
        while True:
            self.samples.append(self.read())
            if self._stop.wait(self.every):
                return

    @contextmanager
    def sampling(self) -> Iterator["LoadSampler"]:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else float("nan")

    def __str__(self) -> str:
        if not self.samples:
            return "-"
        return f"{self.mean:.1f} ({min(self.samples):.1f}-{max(self.samples):.1f})"


# ----------------------------------------------------------------------------- one side of a pair
# The environment of each side beyond --threads: the floor worker is a plain Python process, so it gets
# the passive OpenMP wait that sdlora's CLI sets; "sdlora-spin" is sdlora as it ran before that (libgomp's
# default spinning wait: an empty OMP_WAIT_POLICY is ignored by libgomp and kept by sdlora) on all 2 threads.
SIDE_ENV = {
    "floor": {"OMP_WAIT_POLICY": "PASSIVE"},
    "sdlora-spin": {"OMP_WAIT_POLICY": "", "OMP_NUM_THREADS": str(os.cpu_count() or 1)},
    "sdlora-1thread": {"OMP_NUM_THREADS": "1"},  # the example's thread count (accelerate's launcher gives it 1)
}


def side_env(side: str, threads: int | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment one side runs in: `base` (this one's), OMP_NUM_THREADS=`threads` if given, the side's own."""
    env = dict(os.environ if base is None else base)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return {**env, **SIDE_ENV.get(side, {})}


def run_example(args: argparse.Namespace, model: Path, photos: Path, work: Path) -> dict:
    walls, in_loop = [], None
    for steps in args.steps:
        out = work / f"out-{steps}"
        cmd = train_speed.diffusers_cmd(args.diffusers_script, model, photos, out, args, steps, "no")
        run = train_speed.timed(cmd, env=side_env("example", args.threads))
        walls.append((steps, run["wall_s"]))
        in_loop = tqdm_step_s(run["stderr"])  # the larger run's, the last one read
        shutil.rmtree(out, ignore_errors=True)
    per_step, startup = marginal(*walls)
    return {"s_per_step": per_step, "startup_s": startup, "in_loop_s": in_loop}


def run_sdlora(args: argparse.Namespace, model: Path, dataset: Path, work: Path, help_text: str, side: str) -> dict:
    walls, in_loop = [], None
    for steps in args.steps:
        cwd = Path(tempfile.mkdtemp(prefix=f"sdlora-{steps}-", dir=work))
        (cwd / "dataset").symlink_to(dataset)
        cmd = train_speed.train_cmd(help_text, model, args, steps, args.train_args)
        run = train_speed.timed(cmd, cwd=cwd, env=side_env(side, args.threads))
        walls.append((steps, run["wall_s"]))
        metrics = next(cwd.rglob("metrics.jsonl"), None)
        if metrics is not None:  # the larger run's, the last one read
            in_loop = in_loop_median(metrics)
        shutil.rmtree(cwd, ignore_errors=True)
    per_step, startup = marginal(*walls)
    return {"s_per_step": per_step, "startup_s": startup, "in_loop_s": in_loop}


def run_floor(args: argparse.Namespace, model: Path) -> dict:
    cmd = train_speed.unet_cmd(model, args, "fp32")
    run = train_speed.timed(cmd, env=side_env("floor", args.threads))
    return json.loads(run["stdout"].strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report
def report(results: dict[tuple[int, str], dict], pairs: int, sides: Sequence[str]) -> None:
    """The pair-by-pair table, then each ratio's median and spread over the pairs."""

    def fig(pair: int, side: str, key: str = "s_per_step") -> float | None:
        return results.get((pair, side), {}).get(key)

    trainers = [s for s in sides if s.startswith("sdlora")]
    head = [f"{side} s/step @ load" for side in sides] + [f"{t} in-loop" for t in trainers]
    head += [f"x example ({t})" for t in trainers if "example" in sides]
    if "example" in sides:
        head.insert(len(sides), "example in-loop (tqdm)")
    print()
    print("| pair | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for p in range(pairs):
        cells = [f"{r['s_per_step']:.2f} @ {r['load']}" if (r := results.get((p, side))) else "-" for side in sides]
        looped = ["example"] if "example" in sides else []
        cells += [f"{v:.2f}" if (v := fig(p, t, "in_loop_s")) else "-" for t in looped + trainers]
        if "example" in sides:
            for t in trainers:
                ratio = pair_ratios([fig(p, "example")], [fig(p, t)])
                cells.append(f"{ratio.median:.2f}" if ratio.values else "-")
        print(f"| {p + 1} | " + " | ".join(cells) + " |")
    column = {side: [fig(p, side) for p in range(pairs)] for side in sides}
    print()
    print("pair by pair, median (min-max):")
    for t in trainers:
        loop = [fig(p, t, "in_loop_s") for p in range(pairs)]
        if "example" in sides:
            print(f"  example / {t} (x the example's steps/s), marginal: {pair_ratios(column['example'], column[t])}")
            ex_loop = [fig(p, "example", "in_loop_s") for p in range(pairs)]
            print(f"  example / {t}, in-loop (tqdm's / the median step_time_s): {pair_ratios(ex_loop, loop)}")
        if "floor" in sides:
            print(f"  {t} / floor, marginal: {pair_ratios(column[t], column['floor'])}")
            print(f"  {t} / floor, in-loop:  {pair_ratios(loop, column['floor'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--diffusers-script", type=Path, required=True, help="examples/dreambooth/train_dreambooth_lora.py"
    )
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs=2, default=[2, 5], help="the two step counts of each side")
    parser.add_argument("--train-args", default=DEFAULT_TRAIN_ARGS, help="extra `sdlora train` options, one string")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every process (equal threads)")
    parser.add_argument("--iters", type=int, default=3, help="timed UNet floor steps after one warm-up")
    parser.add_argument("--no-floor", action="store_true", help="leave the bare UNet floor out of the pairs")
    parser.add_argument(
        "--with-one-thread", action="store_true", help="also sdlora on one thread, as the example runs (sdlora-1thread)"
    )
    parser.add_argument(
        "--with-spin",
        action="store_true",
        help="also sdlora as before issue 22: libgomp's spinning wait, all cores' threads (side sdlora-spin)",
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="model folder (built once if missing)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    if args.steps[1] <= args.steps[0]:
        parser.error("--steps needs two counts, the second larger")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.arch = "sd15"
    model = train_speed.build_random("sd15", args.model_dir or train_speed.default_cache("sd15"))
    help_text = train_speed.sdlora_help("train")
    sides = [s for s in SIDES if not (args.no_floor and s == "floor")]
    for flag, side in ((args.with_one_thread, "sdlora-1thread"), (args.with_spin, "sdlora-spin")):
        if flag:
            sides.insert(sides.index("sdlora") + 1, side)
    work = Path(tempfile.mkdtemp(prefix="sdlora-bench-pairs-"))
    threads = f"OMP_NUM_THREADS={args.threads} for all" if args.threads else "each its own default threads"
    print(f"{args.pairs} pairs of {', '.join(sides)}; steps {args.steps}; {threads}; {os.cpu_count()} CPUs", flush=True)
    print(f"sdlora train {args.train_args}", flush=True)
    try:
        dataset = train_speed.prepare_dataset(work, args.resolution)
        # One untimed run fills sdlora's latent/text caches, so every timed run starts equally warm.
        prime = work / "prime"
        prime.mkdir()
        (prime / "dataset").symlink_to(dataset)
        train_speed.timed(train_speed.train_cmd(help_text, model, args, 1, args.train_args), cwd=prime)
        results: dict[tuple[int, str], dict] = {}
        for pair, side in schedule(args.pairs, sides):
            sampler = LoadSampler()
            with sampler.sampling():
                if side == "example":
                    r = run_example(args, model, dataset / "images", work)
                elif side.startswith("sdlora"):
                    r = run_sdlora(args, model, dataset, work, help_text, side)
                else:
                    r = run_floor(args, model)
            r["load"] = str(sampler)
            results[(pair, side)] = r
            extra = f", in-loop {r['in_loop_s']:.2f} s" if r.get("in_loop_s") else ""
            print(f"  pair {pair + 1} {side}: {r['s_per_step']:.2f} s/step{extra}; load {r['load']}", flush=True)
        report(results, args.pairs, sides)
        print(f"\ncommand: {shlex.join(sys.argv)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
