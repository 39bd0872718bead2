"""A sweep: plan it (every check before any training), run its trials on an executor, pick the winner.

runs/<tune>/
  tune.json          space, objective, scoring, every trial (settings, status, points, error), the
                     base model's scores, the winner; rewritten atomically after each trial
  <trial>/           ordinary run folders (`sdlora.tune.trial`)
  .trials/           one record per trial (what tune.json is assembled from; resume reads them)
  best/              the winner: config.yaml (its config, max_steps = the chosen step, so
                     `sdlora train --config runs/<tune>/best/config.yaml` repeats it), lora/ (the
                     LoRA at that step), scores.json, and `trial` -> ../<trial>
  report.html        the trials compared (`sdlora.tune.report`)
"""

from __future__ import annotations

import datetime
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sdlora import config as config_mod
from sdlora.errors import ConfigError, RunError
from sdlora.fsutil import write_json
from sdlora.run import CONFIG, LORA_DIR, SCORES_JSON
from sdlora.tune import objective as objective_mod
from sdlora.tune.space import Space
from sdlora.tune.trial import (
    DONE,
    FAILED,
    STOPPED,
    TRIALS_DIR,
    Scoring,
    TrialJob,
    read_record,
    record_path,
    stop_on_signals,
)

TUNE_JSON = "tune.json"
BEST = "best"
SCHEMA_VERSION = 1
# 4 of the DreamBooth paper's object prompts (a scene, a texture, a colour, a landmark) + the plain photo.
PAPER_PROMPT_INDICES = (0, 4, 20, 12)
_LAST_STEP_SCHEDULES = ("constant", "constant_with_warmup")


def default_prompts() -> list[str]:
    from sdlora.evaluate.paper_prompts import OBJECT_PROMPTS
    from sdlora.prompts import DEFAULT_PROMPT

    return [OBJECT_PROMPTS[i] for i in PAPER_PROMPT_INDICES] + [DEFAULT_PROMPT]


@dataclass
class Sweep:
    tune_dir: Path
    space: Space
    objective: objective_mod.Objective
    scoring: Scoring
    jobs: list[TrialJob]
    executor: str = "local"
    parallel: int = 1
    warnings: list[str] = field(default_factory=list)
    created: str = ""

    @property
    def name(self) -> str:
        return self.tune_dir.name


def _given(layers: list[dict[str, Any]], section: str, key: str) -> Any:
    found = None
    for layer in layers:
        if key in ((layer or {}).get(section) or {}):
            found = layer[section][key]
    return found


def trial_count(space: Space) -> int:
    """How many trials the space makes (without listing them: a huge grid is counted at once)."""
    import math

    return space.random or math.prod(len(v) for v in space.grid.values())  # type: ignore[arg-type]


def plan_sweep(
    layers: list[dict[str, Any]],
    sources: tuple[str, ...],
    space: Space,
    objective: objective_mod.Objective,
    scoring: Scoring,
    tune_dir: Path,
    *,
    executor: str = "local",
    parallel: int = 1,
) -> Sweep:
    """The sweep's trials as checked configs; a one-line error for anything wrong, before any training.

    `layers` are the train options (YAML file, flags, dotted overrides) that apply to every trial.
    """
    from sdlora.evaluate.score import val_photos

    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: must be at least 1")
    base = config_mod.build_config(*layers, sources=sources)  # the train options alone, checked once
    last = space.steps[-1]
    dataset = Path(base.data.dataset).expanduser().resolve()
    val_photos(dataset)  # DataError: a dataset without val photos has nothing to score against
    warnings = []
    if base.train.lr_scheduler not in _LAST_STEP_SCHEDULES and len(space.steps) > 1:
        warnings.append(
            f"--lr-scheduler {base.train.lr_scheduler}: each scored step is a resumed segment whose schedule spans "
            "only up to that step, so the points differ from one straight run of that many steps "
            "(constant repeats exactly)"
        )
    if tune_dir.exists():
        raise RunError(f"{tune_dir}: exists; choose another --name, or continue it with --resume {tune_dir}")
    fixed = {
        "data": {"dataset": str(dataset)},
        "run": {"runs_dir": str(tune_dir.resolve())},
        "train": {"max_steps": last},
    }
    if base.checkpoint.checkpoint_every == 0:  # every segment must end in a checkpoint to be continued
        fixed["checkpoint"] = {"checkpoint_every": last}
    points = space.points()
    width = max(2, len(str(len(points) - 1)))
    jobs, problems = [], []
    for i, settings in enumerate(points):
        name = f"trial-{i:0{width}d}"
        layer = config_mod.flat_to_nested(settings)
        try:
            cfg = config_mod.build_config(
                *layers, layer, fixed, {"run": {"name": name}}, sources=(*sources, f"{name} settings", "tune", "tune")
            )
        except ConfigError as exc:
            problems.append(f"{name} ({_describe(settings)}): {exc}")
            continue
        jobs.append(
            TrialJob(
                name=name,
                tune_dir=str(tune_dir.resolve()),
                config=cfg.to_dict(),
                settings=settings,
                steps=list(space.steps),
                scoring=scoring.__dict__.copy(),
                baseline=i == 0,
            )
        )
    if problems:
        raise ConfigError("; ".join(problems))
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return Sweep(tune_dir, space, objective, scoring, jobs, executor, parallel, warnings, now)


def _describe(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def load_sweep(tune_dir: Path) -> Sweep:
    """An interrupted sweep from its tune.json (`--resume`)."""
    from sdlora.tune.space import parse_range

    path = Path(tune_dir) / TUNE_JSON
    data = read_record(path)
    if data is None or data.get("schema_version") != SCHEMA_VERSION:
        raise RunError(f"{path}: missing or not written by `sdlora tune` (give the tune folder to --resume)")
    s = data["space"]
    grid = {k: v if isinstance(v, list) else parse_range(v, str(path)) for k, v in s["grid"].items()}
    space = Space(grid=grid, steps=s["steps"], random=s.get("random", 0), seed=s.get("seed", 0))
    o = data["objective"]
    objective = objective_mod.Objective(o["kind"], objective_mod.parse_weights(o.get("weights")), o["margin"])
    jobs = [TrialJob(**t["job"]) for t in data["trials"]]
    return Sweep(
        Path(tune_dir).resolve(),
        space,
        objective,
        Scoring(**data["scoring"]),
        jobs,
        data.get("executor", "local"),
        data.get("parallel", 1),
        created=data.get("created", ""),
    )


def pending(sweep: Sweep) -> list[TrialJob]:
    """The trials still to run: not finished and not stopped early (a failed one is tried again). The
    first of them samples the base model unless a finished trial already has its scores."""
    records = records_of(sweep)
    have_base = any(r.get("base") for r in records.values())
    todo = [j for j in sweep.jobs if (records.get(j.name) or {}).get("status") not in (DONE, STOPPED)]
    for i, job in enumerate(todo):
        job.baseline = not have_base and i == 0
    return todo


def records_of(sweep: Sweep) -> dict[str, dict[str, Any]]:
    return {j.name: read_record(record_path(sweep.tune_dir, j.name)) or {} for j in sweep.jobs}


def base_scores(records: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    return next((r["base"] for r in records.values() if r.get("base")), None)


def summary(sweep: Sweep) -> dict[str, Any]:
    """tune.json's content from the trials' records as they are now."""
    records = records_of(sweep)
    trials = []
    for job in sweep.jobs:
        record = records.get(job.name) or {}
        trials.append(
            {
                "name": job.name,
                "settings": job.settings,
                "status": record.get("status", "pending"),
                "error": record.get("error"),
                "points": record.get("points") or [],
                "train_calls": record.get("train_calls", 0),
                "timings": record.get("timings") or {},
                "job": job.to_dict(),
            }
        )
    base = base_scores(records)
    ranked = objective_mod.rank_points(trials, sweep.objective, base)
    for trial in trials:
        for point in trial["points"]:
            row = next(r for r in ranked if r["trial"] == trial["name"] and r["step"] == point["step"])
            point["objective"], point["eligible"] = row["objective"], row["eligible"]
    winner = objective_mod.choose(trials, sweep.objective, base)
    return {
        "schema_version": SCHEMA_VERSION,
        "name": sweep.name,
        "created": sweep.created,
        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "space": sweep.space.to_dict(),
        "objective": {**sweep.objective.to_dict(), "floor": sweep.objective.floor(base)},
        "scoring": sweep.scoring.__dict__,
        "base": base,
        "executor": sweep.executor,
        "parallel": sweep.parallel,
        "trials": trials,
        "leaderboard": ranked,
        "winner": winner,
        "failures": [{"trial": t["name"], "error": t["error"]} for t in trials if t["status"] == FAILED],
    }


def write_summary(sweep: Sweep) -> dict[str, Any]:
    data = summary(sweep)
    write_json(sweep.tune_dir / TUNE_JSON, data)
    return data


def write_best(sweep: Sweep, data: dict[str, Any]) -> Path | None:
    """runs/<tune>/best: the winner's config with max_steps = the chosen step, that step's LoRA and scores."""
    from sdlora import yamlfile

    winner = data.get("winner")
    if not winner:
        return None
    trial_dir = sweep.tune_dir / winner["trial"]
    step_dir = trial_dir / "tune" / f"step-{winner['step']:06d}"
    saved = yamlfile.read(trial_dir / CONFIG) or {}
    saved.setdefault("train", {})["max_steps"] = winner["step"]
    saved.setdefault("run", {}).update({"name": None, "runs_dir": str(sweep.tune_dir.parent)})
    cfg = config_mod.build_config(saved, sources=(str(trial_dir / CONFIG),))
    best, tmp = sweep.tune_dir / BEST, sweep.tune_dir / f".{BEST}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    config_mod.save_config(cfg, tmp / CONFIG)
    if (step_dir / LORA_DIR).is_dir():
        shutil.copytree(step_dir / LORA_DIR, tmp / LORA_DIR)
    if (step_dir / SCORES_JSON).is_file():
        shutil.copy2(step_dir / SCORES_JSON, tmp / SCORES_JSON)
    (tmp / "trial").symlink_to(Path("..") / winner["trial"], target_is_directory=True)
    if best.is_symlink() or best.is_file():
        best.unlink()
    shutil.rmtree(best, ignore_errors=True)
    tmp.rename(best)
    # the config names its own path in its header: rewrite it where it now lives
    config_mod.save_config(cfg, best / CONFIG)
    return best


def run_sweep(
    sweep: Sweep,
    jobs: list[TrialJob],
    *,
    on_trial: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
    ray_address: str | None = None,
    early_stop: bool = False,
    on_event: Callable[[TrialJob], Any] | None = None,
) -> dict[str, Any]:
    """Run `jobs` on the sweep's executor, rewriting tune.json after each trial; then best/ and the report.

    Ctrl-C or SIGTERM stops the sweep: the running trial saves (as `sdlora train` does) and is recorded
    `interrupted`, tune.json is rewritten, and `SweepStopped` (a KeyboardInterrupt) is raised;
    `sdlora tune --resume` continues where it stopped.
    """
    from sdlora.locks import folder_lock
    from sdlora.tune import executors

    sweep.tune_dir.mkdir(parents=True, exist_ok=True)
    (sweep.tune_dir / TRIALS_DIR).mkdir(exist_ok=True)
    with folder_lock(sweep.tune_dir, "tune"), stop_on_signals():
        write_summary(sweep)

        def done(record: dict[str, Any]) -> None:
            data = write_summary(sweep)
            if on_trial is not None:
                on_trial(record, data)

        warm = jobs[0] if jobs and len(jobs) > 1 and (sweep.executor == "ray" or sweep.parallel > 1) else None
        try:
            if sweep.executor == "ray":
                executors.run_ray(
                    jobs,
                    done,
                    tune_dir=sweep.tune_dir,
                    address=ray_address,
                    parallel=sweep.parallel if sweep.parallel > 1 else None,
                    early_stop=early_stop,
                    warm=warm,
                )
            elif sweep.parallel > 1:
                executors.run_parallel(jobs, sweep.parallel, done, warm=warm)
            else:
                executors.run_local(jobs, done, on_event)
        except KeyboardInterrupt:
            write_summary(sweep)  # the interrupted trial shows as such; no best/ or report for a stopped sweep
            raise
        data = write_summary(sweep)
        write_best(sweep, data)
        from sdlora.tune.report import write_tune_report

        write_tune_report(sweep.tune_dir, data)
    return data
