"""Who runs the trials: this process one after another, N worker processes, or Ray Tune.

Every executor runs the same `trial.run_trial` on the same jobs and leaves the same files (run folders,
`.trials/<name>.json`); the sweep reads the records from there, so the scores, run folders and
tune.json do not depend on the executor. `on_done(record)` is called as each trial ends (the sweep
rewrites tune.json then).

- `run_local`: in this process, one trial after another.
- `run_parallel`: N worker processes (`python -m sdlora.tune.worker JOB.json`), each pinned to one GPU
  through CUDA_VISIBLE_DEVICES when GPUs exist (on a CPU they share it).
- `run_ray`: Ray Tune on a local Ray instance, or a cluster (`address`); one GPU per trial on GPUs,
  one CPU per trial otherwise; ASHA stops trials whose first point is in the bottom half
  (`early_stop`). Ray is an optional extra: `pip install 'sdlora[ray]'`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from sdlora.errors import ConfigError, RunError, SdloraError
from sdlora.events import OnEvent
from sdlora.tune.trial import FAILED, INTERRUPTED, RUNNING, STOPPED, TrialJob, one_line, read_record, run_trial

OnDone = Callable[[dict[str, Any]], None]
EXECUTORS = ("local", "ray")
RAY_EXTRA = "--executor ray needs Ray: pip install 'sdlora[ray]'"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_local(
    jobs: list[TrialJob], on_done: OnDone, on_event: Callable[[TrialJob], OnEvent | None] | None = None
) -> None:
    """One trial after another in this process; while no trial has sampled the base model (the first
    failed before it could), the next one does."""
    have_base = not any(job.baseline for job in jobs)  # resumed with the base scored already
    for job in jobs:
        job.baseline = not have_base
        record = run_trial(job, on_event=on_event(job) if on_event else None)
        have_base = have_base or bool(record.get("base"))
        on_done(record)


class _Workers:
    """The live worker processes. Each has its own session, so a terminal's Ctrl-C reaches only this
    process, which passes each signal on once (`stop`): the first has them save as `train` does, a second
    stops their save. A worker that starts after the first gets it at once."""

    def __init__(self) -> None:
        self.procs: set[subprocess.Popen[str]] = set()
        self.signum: int | None = None
        self.lock = threading.Lock()

    def add(self, proc: subprocess.Popen[str]) -> None:
        with self.lock:
            self.procs.add(proc)
            if self.signum is not None:
                _signal(proc, self.signum)

    def discard(self, proc: subprocess.Popen[str]) -> None:
        with self.lock:
            self.procs.discard(proc)

    def stop(self, signum: int) -> None:
        with self.lock:
            self.signum = signum
            for proc in self.procs:
                _signal(proc, signum)


def _signal(proc: subprocess.Popen[str], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)


def _worker(
    job: TrialJob, env: dict[str, str], max_points: int | None = None, workers: _Workers | None = None
) -> dict[str, Any]:
    """One trial in a worker process; a worker that dies (killed, out of memory) is a failed trial."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
        json.dump({"job": job.to_dict(), "max_points": max_points}, f)
    workers = workers or _Workers()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sdlora.tune.worker", f.name],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        workers.add(proc)
        try:
            _, stderr = proc.communicate()
        finally:
            workers.discard(proc)
    finally:
        Path(f.name).unlink(missing_ok=True)
    record = read_record(job.record_path) or {"name": job.name, "settings": job.settings, "points": []}
    if proc.returncode != 0 and record.get("status") in (None, RUNNING, "pending"):
        tail = [line for line in (stderr or "").strip().splitlines() if line.strip()]
        record["status"] = FAILED
        record["error"] = f"worker exited with {proc.returncode}" + (f": {tail[-1][:300]}" if tail else "")
        from sdlora.fsutil import write_json

        write_json(job.record_path, record)
    return record


def run_parallel(jobs: list[TrialJob], parallel: int, on_done: OnDone, warm: TrialJob | None = None) -> None:
    """`parallel` worker processes, one GPU each when GPUs exist; `warm` first runs alone to one point
    (it fills the dataset's latent and text caches, so no two workers encode the same images).

    Ctrl-C / SIGTERM (`SweepStopped` here): no new trial starts, the running ones get the signal and
    save, and it is raised again once they have exited."""
    gpus = gpu_count()
    if gpus and parallel > gpus:
        raise ConfigError(f"--parallel {parallel}: this machine has {gpus} GPU(s); give --parallel {gpus} or fewer")
    free: queue.Queue[str | None] = queue.Queue()
    for i in range(parallel):
        free.put(str(i) if gpus else None)
    lock = threading.Lock()
    workers = _Workers()

    def env_for(device: str | None) -> dict[str, str]:
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        return env

    def one(job: TrialJob) -> None:
        if workers.signum is not None:
            return
        device = free.get()
        try:
            record = _worker(job, env_for(device), workers=workers)
        finally:
            free.put(device)
        if workers.signum is None:
            with lock:
                on_done(record)

    pool = ThreadPoolExecutor(max_workers=parallel)
    try:
        if warm is not None:  # in the pool too: this thread only waits, so a Ctrl-C here waits for its save
            pool.submit(_worker, warm, env_for(free.queue[0]), 1, workers).result()
        for future in [pool.submit(one, job) for job in jobs]:
            future.result()
    except KeyboardInterrupt as exc:
        workers.stop(getattr(exc, "signum", signal.SIGINT))
        while True:  # wait for the workers to save; a second Ctrl-C is passed on (they stop saving)
            try:
                pool.shutdown(wait=True, cancel_futures=True)
                break
            except KeyboardInterrupt as again:
                workers.stop(getattr(again, "signum", signal.SIGINT))
        raise
    pool.shutdown(wait=True)


def import_ray() -> Any:
    """Ray and Ray Tune, or the one-line error naming the extra."""
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise ConfigError(RAY_EXTRA) from None
    return ray


def _ray_trainable(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: the sweep's trial function, reporting each point."""
    from ray import tune

    def report(point: dict[str, Any]) -> None:
        tune.report({"dino": point.get("dino") or 0.0, "clip_t": point.get("clip_t") or 0.0, "step": point["step"]})

    record = run_trial(config["job"], report=report)
    if record["status"] == FAILED:
        raise RuntimeError(record["error"])  # Ray shows the trial as errored; the record already holds it


def run_ray(
    jobs: list[TrialJob],
    on_done: OnDone,
    *,
    tune_dir: Path,
    address: str | None = None,
    parallel: int | None = None,
    early_stop: bool = False,
    warm: TrialJob | None = None,
) -> None:
    """Ray Tune over the jobs (a grid search over the job list, so Ray only schedules)."""
    ray = import_ray()
    from ray import tune

    if warm is not None:
        run_trial(warm, max_points=1)  # here, before any actor starts: the caches are filled once
    env = {k: v for k, v in os.environ.items() if k.startswith(("HF_", "SDLORA_", "TRANSFORMERS_", "DIFFUSERS_"))}
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    init: dict[str, Any] = {"runtime_env": {"env_vars": env}, "ignore_reinit_error": True, "log_to_driver": False}
    if address:
        init["address"] = address
    else:  # a local instance: on this machine only, no dashboard
        init.update(_node_ip_address="127.0.0.1", include_dashboard=False)
        if parallel:
            init["num_cpus"] = parallel
    started = not ray.is_initialized()
    try:
        ray.init(**init)
    except Exception as exc:  # a cluster that is not there, a version mismatch: one line
        raise RunError(f"Ray: {ray_error_line(exc)}") from exc
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        resources = {"gpu": 1, "cpu": 1} if gpus else {"cpu": 1}
        scheduler = None
        if early_stop:
            from ray.tune.schedulers import ASHAScheduler

            # rung 1 = the first scored point: the bottom half of trials stop there
            scheduler = ASHAScheduler(
                time_attr="training_iteration", grace_period=1, reduction_factor=2, max_t=len(jobs[0].steps)
            )

        class Done(tune.Callback):
            """Rewrites tune.json as each trial ends (on the driver)."""

            def __init__(self, fn: OnDone | None) -> None:
                self.fn = fn

            def __getstate__(self) -> dict[str, Any]:
                return {}  # Ray pickles the tuner's settings; the driver's callback stays out of them

            def __setstate__(self, state: dict[str, Any]) -> None:
                self.fn = None

            def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
                if self.fn is not None:
                    self.fn(_reconcile(trial.config["job"], None))

            def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
                if self.fn is not None:
                    self.fn(_reconcile(trial.config["job"], getattr(trial, "error_file", None) or "Ray trial error"))

        tuner = tune.Tuner(
            tune.with_resources(_ray_trainable, resources),
            param_space={"job": tune.grid_search([job.to_dict() for job in jobs])},
            tune_config=tune.TuneConfig(
                metric="dino", mode="max", scheduler=scheduler, max_concurrent_trials=parallel or None
            ),
            run_config=tune.RunConfig(
                name="ray", storage_path=str(Path(tune_dir).resolve() / ".ray"), callbacks=[Done(on_done)], verbose=0
            ),
        )
        # Ctrl-C raises SweepStopped here (`trial.stop_on_signals`), not Ray's own graceful stop: its actors
        # are stopped without a save, so their trials continue from their last checkpoints.
        quiet = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        try:
            tuner.fit()
        except KeyboardInterrupt:
            for job in jobs:
                _reconcile(job.to_dict(), None, status=INTERRUPTED)
            raise
        except SdloraError:
            raise
        except Exception as exc:  # Ray's errors carry a whole traceback in their message: its last line
            raise RunError(f"Ray: {ray_error_line(exc)}") from exc
        finally:
            if quiet is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = quiet
    finally:
        if started:
            ray.shutdown()


def _reconcile(job: dict[str, Any], error: str | None, status: str | None = None) -> dict[str, Any]:
    """The trial's record after Ray is done with it: a trial ASHA stopped early is `stopped`; one whose
    actor died before it could record anything is `failed` with Ray's error; `status` (interrupted: the
    sweep was stopped) for a trial left running."""
    job_ = TrialJob(**job)
    if status is not None and not job_.record_path.is_file():
        return {}  # never started: stays pending
    record = read_record(job_.record_path) or {"name": job_.name, "settings": job_.settings, "points": []}
    if record.get("status") in (None, RUNNING, "pending"):
        record["status"] = status or (FAILED if error else STOPPED)
        if error:
            record["error"] = record.get("error") or _error_line(error)
        from sdlora.fsutil import write_json

        write_json(job_.record_path, record)
    return record


def ray_error_line(exc: BaseException) -> str:
    """The line of a Ray exception that says what went wrong: its message's last `SomeError: ...` line
    (Ray wraps the trial's traceback into the message), else its first line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*?: ", line)]
    line = errors[-1] if errors else one_line(exc)
    return line[:300] + ("..." if len(line) > 300 else "")


def _error_line(error: str) -> str:
    path = Path(error)
    if path.is_file():
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        return lines[-1][:300] if lines else "Ray trial error"
    return one_line(RuntimeError(error))
