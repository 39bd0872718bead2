"""One trial of a sweep: an ordinary `sdlora train` run, scored at each scored step.

    runs/<tune>/<trial>/               the run folder (`sdlora.run`): config.yaml, metrics.jsonl, lora/, ...
    runs/<tune>/<trial>/tune/step-NNNNNN/   per scored step: samples/ (images, samples.json), lora/ (that
                                       step's LoRA), scores.json (as `sdlora score` writes it)
    runs/<tune>/.trials/<trial>.json   the trial's record: settings, status, scored points, error, timings

A trial trains to its first scored step (`sdlora.train.loop.run_training`), samples the held-out
prompts with `sdlora.generate.generate_samples` (the same seeds in every trial), scores them with
`sdlora.evaluate.score.score_run` (the code of `sdlora score`), then continues with `resume=` the same
run folder and the next step as max_steps; resume is bit-exact, so a constant learning rate gives
the same weights as one straight run. A schedule that depends on max_steps (cosine, linear) is built
per segment, so there it differs from one straight run: the sweep warns.

`run_trial(job)` is what every executor runs (in this process, in a worker process, in a Ray actor):
it picks up where the record and the run folder's newest checkpoint left off, so an interrupted
trial resumes and a finished point is never trained or scored again. An exception (out of memory, a
NaN loss) is caught and recorded as the trial's one-line error. Ctrl-C or SIGTERM is not a failure: the
training saves as `sdlora train` does, the trial is recorded `interrupted` (it continues on `sdlora tune
--resume`) and `SweepStopped` stops the sweep (`stop_on_signals` raises it outside training).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sdlora.events import OnEvent
from sdlora.fsutil import write_json

TRIALS_DIR = ".trials"
TUNE_SUBDIR = "tune"
DONE, FAILED, RUNNING, STOPPED, PENDING = "done", "failed", "running", "stopped", "pending"
INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM: saved, continues on `sdlora tune --resume` (STOPPED: by ASHA)


class SweepStopped(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM during a sweep: the sweep stops; the exit code is 128 + `signum`."""

    def __init__(self, signum: int, trial: str | None = None, step: int | None = None):
        self.signum, self.trial, self.step = int(signum), trial, step
        super().__init__(signal.Signals(self.signum).name)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled by worker processes and Ray
        return (SweepStopped, (self.signum, self.trial, self.step))


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While a sweep runs, SIGINT and SIGTERM raise `SweepStopped` (SIGTERM would otherwise kill the
    process before it records anything). While a trial trains, the loop's own handlers take over
    (stop after the step and save) and put these back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        raise SweepStopped(signum)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class Scoring:
    """How each scored point is sampled and scored (the same for every trial)."""

    prompts: list[str]  # templates with {token} / {class}
    seeds: int = 2  # images per prompt: seeds seed, seed+1, ...
    seed: int = 0
    sample_steps: int | None = None  # None: the loaded model's (Family.sample_steps)
    guidance: float | None = None  # None: the loaded model's (Family.guidance_for)
    dino_model: str = "facebook/dino-vits16"
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    device: str | None = None


@dataclass
class TrialJob:
    """Everything a worker needs to run one trial: plain data (JSON for worker processes and Ray)."""

    name: str
    tune_dir: str
    config: dict[str, Any]  # the trial's nested config: train options + its settings, its run name
    settings: dict[str, Any]
    steps: list[int]
    scoring: dict[str, Any]
    baseline: bool = False  # also sample the base model alone at the first point (once per sweep)

    @property
    def run_dir(self) -> Path:
        return Path(self.tune_dir) / self.name

    @property
    def record_path(self) -> Path:
        return record_path(Path(self.tune_dir), self.name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Record:
    name: str
    settings: dict[str, Any]
    status: str = PENDING
    points: list[dict[str, Any]] = field(default_factory=list)
    base: dict[str, Any] | None = None  # the base model's scores, from the trial that sampled them
    error: str | None = None
    train_calls: int = 0  # run_training calls, over every attempt
    timings: dict[str, float] = field(default_factory=dict)  # seconds: train, score


def record_path(tune_dir: Path, name: str) -> Path:
    return Path(tune_dir) / TRIALS_DIR / f"{name}.json"


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _train_to(job: TrialJob, step: int, on_event: OnEvent | None) -> None:
    """Train the trial's run to `step`: a new run, or its run folder resumed from the newest checkpoint."""
    from sdlora import config as config_mod
    from sdlora.train import loop, resolve
    from sdlora.train.checkpoint import list_checkpoints

    run_dir = job.run_dir
    resume = None
    if run_dir.exists() and not list_checkpoints(run_dir):
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to keep, start it again
    if run_dir.exists():
        resume, cfg, _ = resolve.resume_run(run_dir, [{"train": {"max_steps": step}}], ("tune",))
    else:
        cfg = config_mod.build_config(job.config, {"train": {"max_steps": step}}, sources=("tune", "tune"))
    stopping: list[int] = []  # the signal the loop's handler took (also one during the last step's save)

    def events(event: dict[str, Any]) -> None:
        if event.get("event") == "stopping":
            stopping.append(int(signal.Signals[event["signal"]]))
        if on_event is not None:
            on_event(event)

    result = loop.run_training(cfg, resume=resume, on_event=events)
    if result.interrupted or stopping:  # saved as `train` saves: the sweep stops, the trial resumes later
        raise SweepStopped(result.stop_signal or stopping[0], job.name, result.steps)


def _score(job: TrialJob, step: int, baseline: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Sample and score the trial's current LoRA (trained to `step`): its point, and the base model's scores."""
    from sdlora.evaluate.score import ScorePlan, score_run
    from sdlora.generate import generate_samples
    from sdlora.prompts import fill_prompt
    from sdlora.run import DIFFUSERS_LORA, EMBEDDINGS, LORA_DIR, load_run

    scoring = Scoring(**job.scoring)
    info = load_run(job.run_dir)
    folder = job.run_dir / TUNE_SUBDIR / f"step-{step:06d}"
    prompts = [fill_prompt(p, info.token, info.class_word) for p in scoring.prompts]
    samples_json = generate_samples(
        info,
        prompts,
        out_dir=folder / "samples",
        num_images=scoring.seeds,
        seed=scoring.seed,
        steps=scoring.sample_steps,
        guidance=scoring.guidance,
        baseline=baseline,
        device=scoring.device,
    )
    scores = score_run(
        info,
        plan=ScorePlan(samples_json, None, "tune", 1),
        dino_model=scoring.dino_model,
        clip_model=scoring.clip_model,
        clip_pretrained=scoring.clip_pretrained,
        device=scoring.device,
    )
    write_json(folder / "scores.json", scores)
    (folder / LORA_DIR).mkdir(parents=True, exist_ok=True)
    for name in (DIFFUSERS_LORA, EMBEDDINGS):  # this step's LoRA, for best/ (the kohya copy is left out)
        if (info.path / LORA_DIR / name).is_file():
            shutil.copy2(info.path / LORA_DIR / name, folder / LORA_DIR / name)
    lora = scores["overall"]["lora"] or {}
    point = {
        "step": step,
        **{k: lora.get(k) for k in ("dino", "clip_i", "clip_t", "clip_t_with_token")},
        "images": lora.get("images", 0),
        "folder": str(folder.relative_to(job.run_dir.parent)),
    }
    return point, scores["overall"].get("baseline") if baseline else None


def run_trial(
    job: TrialJob | dict[str, Any],
    *,
    on_event: OnEvent | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
    max_points: int | None = None,
) -> dict[str, Any]:
    """Run (or continue) one trial; returns its record (also written to `.trials/<name>.json`).

    `report(point)` is called for each point in step order, those done on an earlier attempt (or by the
    sweep's warm-up) included: Ray Tune needs every trial to report, and its early stopping counts
    points (it may end the trial at any report). `max_points` stops after that many points (the
    sweep's cache warm-up).
    """
    if isinstance(job, dict):
        job = TrialJob(**job)
    saved = read_record(job.record_path) or {}
    record = Record(name=job.name, settings=job.settings)
    for key in ("points", "base", "train_calls", "timings"):
        if saved.get(key) is not None:
            setattr(record, key, saved[key])
    done = {p["step"]: p for p in record.points}
    # a finished trial stays done while it reports its points again (Ray may end it at any report)
    record.status, record.error = DONE if set(done) >= set(job.steps) else RUNNING, None
    write_json(job.record_path, asdict(record))
    try:
        for step in job.steps:
            if step in done:
                if report is not None:
                    report(done[step])
                continue
            if max_points is not None and len(record.points) >= max_points:
                break
            t0 = time.perf_counter()
            record.train_calls += 1
            _train_to(job, step, on_event)
            t1 = time.perf_counter()
            point, base = _score(job, step, baseline=job.baseline and record.base is None)
            t2 = time.perf_counter()
            record.timings["train"] = record.timings.get("train", 0.0) + t1 - t0
            record.timings["score"] = record.timings.get("score", 0.0) + t2 - t1
            record.points.append(point)
            if base is not None:
                record.base = base
            if {p["step"] for p in record.points} >= set(job.steps):
                record.status = DONE  # before `report`: Ray may end the trial there, after its last point
            write_json(job.record_path, asdict(record))
            if report is not None:
                report(point)
        complete = {p["step"] for p in record.points} >= set(job.steps)
        record.status = DONE if complete else RUNNING
    except Exception as exc:  # a failed trial is recorded and the sweep goes on
        record.status, record.error = FAILED, one_line(exc)
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM (also a second one, mid-save): not a failure; the sweep stops
        record.status = INTERRUPTED
        write_json(job.record_path, asdict(record))
        raise
    write_json(job.record_path, asdict(record))
    return asdict(record)
