"""Where `sdlora train`'s peak memory comes from: resident memory per phase of one run.

Run by hand, under the heavy-process lock on shared machines (a minute or two; ~6 GB of RAM):

    flock /tmp/sdlora-heavy.lock .venv/bin/python benchmarks/memory.py
    flock /tmp/sdlora-heavy.lock .venv/bin/python benchmarks/memory.py --steps 8 --train-args="--checkpoint-every 2"

It trains on the random-weight SD 1.5-size model folder and the dataset that benchmarks/train_speed.py
builds (its helpers, reused), by default at the settings of the README's peak-RSS comparison with the
diffusers example: 256 px, fp32 (`--mixed-precision no`), batch 1, rank 16, `--no-train-token-embedding`,
the default validation prompt sampled at the end with `--validation-steps 1`, no checkpoints.

The run is one process (`sdlora train`, under `/usr/bin/time -v` for the whole-process peak, as
../shared/PERFORMANCE.md says). Inside it a thread reads /proc/self/status every 50 ms: VmRSS, and its
anonymous (heap: model copies, activations) and file-backed (touched pages of mmapped files such as
safetensors) parts. Each sample is filed under the phase running then, known by wrapping the
functions of the recipe (loading, encoding, releasing the encoders, the LoRA, each step, validation,
checkpoint, export); a function this version does not have is skipped. Printed: each phase's peak and
time, the whole-run peak, and the median step time of the steps right after a checkpoint against the
others (step_time_s in runs/<run>/metrics.jsonl).

The load peak of a bf16 or fp8 base (the README's per-precision rows; one cold run and one step are enough):

    flock /tmp/sdlora-heavy.lock .venv/bin/python benchmarks/memory.py --cold-only --steps 1 --train-args="--mixed-precision bf16"
    flock /tmp/sdlora-heavy.lock .venv/bin/python benchmarks/memory.py --cold-only --steps 1 \
        --train-args="--mixed-precision bf16 --base-precision fp8"

`PYTHONPATH=/other/src` measures another checkout's sdlora with this same script.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402  (the model folder, dataset and command helpers)

DEFAULT_ARGS = "--mixed-precision no --no-train-token-embedding"

# (module, function, phase): the recipe's stages, innermost wins. Missing ones are skipped.
PHASES = [
    ("sdlora.train.loop", "setup", "setup (other)"),
    ("sdlora.train.lora", "load_base", "load base"),
    ("sdlora.train.lora", "load_unet", "load UNet"),
    ("sdlora.models.streaming", "load_model", "load denoiser (tensor by tensor)"),
    ("sdlora.models.precision", "quantize_fp8", "quantize denoiser (fp8)"),
    ("sdlora.train.encode", "class_examples", "class images"),
    ("sdlora.train.encode", "encode_examples", "encode (latents, text)"),
    ("sdlora.train.encode", "release_encoders", "release encoders"),
    ("sdlora.train.lora", "inject_lora", "inject LoRA"),
    ("sdlora.train.loop", "_train_step", "step"),
    ("sdlora.train.validation", "validate", "validation"),
    ("sdlora.train.checkpoint", "save_checkpoint", "checkpoint"),
    ("sdlora.train.loop", "export_lora", "export"),
    ("sdlora.train.loop", "cleanup", "cleanup"),
    ("sdlora.cli.train", "refresh_report", "report"),
]
FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


# ----------------------------------------------------------------------------- inside the run
class Sampler:
    """Samples this process's memory every `interval` s, each sample filed under the current phase."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.stack: list[str] = []
        self.before = "start-up (imports, config)"
        self.steps = 0
        self.samples: list[tuple[float, str, int, int, int, int]] = []  # (t, phase, rss, anon, file, hwm) in kB
        self.spans: list[tuple[str, float, float]] = []  # (phase, start, end) of each wrapped call
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def phase(self) -> str:
        return self.stack[-1] if self.stack else self.before

    def sample(self) -> None:
        values = dict.fromkeys(FIELDS, 0)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0])
        self.samples.append((time.perf_counter() - self.t0, self.phase(), *(values[k] for k in FIELDS)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def wrap(self, module: str, name: str, label: str) -> None:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            return
        func = getattr(mod, name, None)
        if func is None:
            return

        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            phase = label
            if label == "step":
                self.steps += 1
                phase = "step 1" if self.steps == 1 else "steps 2+"
            self.sample()
            self.stack.append(phase)
            start = time.perf_counter() - self.t0
            try:
                return func(*args, **kwargs)
            finally:
                self.sample()
                self.stack.pop()
                self.spans.append((phase, start, time.perf_counter() - self.t0))
                if not self.stack and label == "setup (other)":
                    self.before = "loop (other: logging, events)"
                elif not self.stack and label == "cleanup":
                    self.before = "end"

        setattr(mod, name, wrapped)


def worker(out: Path, argv: list[str]) -> None:
    """Run `sdlora <argv>` in this process with the sampler on; write the samples to `out`."""
    sampler = Sampler()
    sampler.start()
    for module, name, label in PHASES:
        sampler.wrap(module, name, label)
    from sdlora.cli import main

    sys.argv = ["sdlora", *argv]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sampler.sample()
        sampler.stop()
        out.write_text(json.dumps({"samples": sampler.samples, "spans": sampler.spans, "code": code}))
    sys.exit(code)


# ----------------------------------------------------------------------------- the report
def phase_table(samples: list[list], spans: list[list]) -> list[tuple[str, float, float, float, float, float]]:
    """(phase, seconds, peak RSS, peak anon, peak file, high-water mark at its end) in GB, phases in the
    order they first ran. The high-water mark (VmHWM, the kernel's own peak, which no sampling misses)
    reaches its final value in the phase that holds the whole run's peak."""
    order: list[str] = []
    peaks: dict[str, list[int]] = {}
    for _, phase, *values in samples:
        if phase not in peaks:
            order.append(phase)
            peaks[phase] = [0, 0, 0, 0]
        peaks[phase] = [max(a, b) for a, b in zip(peaks[phase], values)]
    seconds: dict[str, float] = {}
    for phase, start, end in spans:
        if phase != "setup (other)":  # the outer span: its time includes the inner ones
            seconds[phase] = seconds.get(phase, 0.0) + end - start
    return [(p, seconds.get(p, float("nan")), *(v / 1e6 for v in peaks[p])) for p in order]


def step_times(spans: list[list]) -> tuple[list[float], list[float]]:
    """Seconds of the steps right after a checkpoint, and of the other steps after the first (from the
    wrapped calls, in the order they ran)."""
    after, others, checkpointed = [], [], False
    for phase, start, end in sorted(spans, key=lambda span: span[2]):
        if phase == "checkpoint":
            checkpointed = True
        elif phase == "steps 2+":
            (after if checkpointed else others).append(end - start)
            checkpointed = False
        elif phase == "step 1":
            checkpointed = False
    return after, others


def checkpoint_every(train_args: str) -> int:
    import shlex

    words = shlex.split(train_args)
    value = 0
    for i, word in enumerate(words):
        if word == "--checkpoint-every" and i + 1 < len(words):
            value = int(words[i + 1])
        elif word.startswith("--checkpoint-every="):
            value = int(word.split("=", 1)[1])
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="model folder (built once if missing)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="training steps")
    parser.add_argument(
        "--train-args", default="", help=f"`sdlora train` options after the defaults ({DEFAULT_ARGS}), one string"
    )
    parser.add_argument("--photos", type=Path, default=train_speed.DREAMBENCH, help="photo folder for `sdlora prepare`")
    parser.add_argument("--cold-only", action="store_true", help="only the first run (empty caches)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dataset and run")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.worker, rest[1:] if rest[:1] == ["--"] else rest)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model_dir or train_speed.default_cache()
    if str(model) not in ("tiny-sd", "tiny-sdxl"):  # the tiny models: a quick check of this script
        model.parent.mkdir(parents=True, exist_ok=True)
        train_speed.build_sd15_random(model)
    train_args = f"{DEFAULT_ARGS} {args.train_args}"
    print(
        f"model {model}; {args.resolution} px, batch 1, rank {args.rank}, {args.steps} steps; "
        f"sdlora train {train_args}; {os.cpu_count()} CPUs",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="sdlora-bench-memory-"))
    try:
        dataset = train_speed.prepare_dataset(work, args.resolution, args.photos)
        help_text = train_speed.sdlora_help("train")
        if help_text is None:
            raise SystemExit("`sdlora train` does not exist in this checkout")
        cwd = work / "run"
        cwd.mkdir()
        (cwd / "dataset").symlink_to(dataset)
        # The first run fills the dataset's caches (latents, text embeddings), the second starts warm,
        # like every later run on that dataset (train_speed.py's peak RSS is the larger of the two).
        for name in ("cold", "warm")[: 1 if args.cold_only else 2]:
            cmd = train_speed.train_cmd(help_text, model, args, args.steps, f"{train_args} --name {name}")
            out = work / f"{name}.json"
            cmd = [sys.executable, __file__, "--worker", str(out), "--", *cmd[3:]]  # cmd[:3]: python -m sdlora
            run = train_speed.timed(cmd, cwd=cwd)
            report(name, run, json.loads(out.read_text()), checkpoint_every(train_args))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


def report(name: str, run: dict, data: dict, every: int) -> None:
    print(f"\n{name} run (caches {'empty' if name == 'cold' else 'filled'}):")
    print(f"| {'phase':<30} | time s | peak RSS GB | anon GB | file GB | high-water GB |")
    print(f"|{'-' * 32}|--------|-------------|---------|---------|---------------|")
    for phase, seconds, rss, anon, file, hwm in phase_table(data["samples"], data["spans"]):
        print(f"| {phase:<30} | {seconds:6.1f} | {rss:11.2f} | {anon:7.2f} | {file:7.2f} | {hwm:13.2f} |")
    peak = max(s[2] for s in data["samples"]) / 1e6
    print(
        f"whole run: peak RSS {run['rss_gb']:.2f} GB (/usr/bin/time -v), {peak:.2f} GB sampled; {run['wall_s']:.1f} s"
    )
    after, others = step_times(data["spans"])
    if every:
        print(
            f"step time after a checkpoint: median {statistics.median(after):.2f} s ({len(after)} steps); "
            f"other steps after the first: median {statistics.median(others):.2f} s ({len(others)} steps)"
            if after and others
            else "step times: too few steps for a comparison"
        )
    elif others:
        print(f"step time (steps 2+): median {statistics.median(others):.2f} s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
