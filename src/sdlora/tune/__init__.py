"""`sdlora tune`'s core: which settings learn these photos best, by held-out scores.

space.py      the search space (grid, random points, ranges), the scored steps, the `tune:` section
objective.py  one number per scored point (DINO by default) and the CLIP-T floor
trial.py      one trial: an ordinary training run, scored at each scored step, resumable
executors.py  who runs the trials: this process, N worker processes (one GPU each), Ray Tune
worker.py     a trial in its own process
sweep.py      plan (every check before training), run, tune.json, best/
report.py     runs/<tune>/report.html
"""

from sdlora.tune.objective import OBJECTIVES, Objective, choose, rank_points
from sdlora.tune.space import DEFAULT_GRID, DEFAULT_STEPS, Space, build_space
from sdlora.tune.sweep import TUNE_JSON, Sweep, load_sweep, plan_sweep, run_sweep
from sdlora.tune.trial import Scoring, SweepStopped, TrialJob, run_trial

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_STEPS",
    "OBJECTIVES",
    "TUNE_JSON",
    "Objective",
    "Scoring",
    "Space",
    "Sweep",
    "SweepStopped",
    "TrialJob",
    "build_space",
    "choose",
    "load_sweep",
    "plan_sweep",
    "rank_points",
    "run_sweep",
    "run_trial",
]
