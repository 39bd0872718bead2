"""`sdlora tune`: train several settings, score each at several steps on the held-out photos, pick the best.

Every train option (the same generated flags as `sdlora train`, from the config fields) applies to all
trials; the space varies the rest. The core is `sdlora.tune`.
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from sdlora import config as config_mod
from sdlora.cli import train as train_cli
from sdlora.cli._common import at_least_1, console, err_console
from sdlora.errors import ConfigError

EPILOG = """\
Examples (the dataset defaults to ./dataset; the sweep goes to ./runs/<name>):

  sdlora tune                         # lr 5e-5,1e-4,2e-4 x rank 8,16

  sdlora tune --grid lr=1e-4,2e-4 --grid rank=16,32 --steps 500,1000

  sdlora train --config runs/tune-20260101-120000/best/config.yaml
"""

TUNE = "Tune"
SCORING = "Scoring"
ASK_ABOVE = 50  # trials: a bigger sweep runs only after --max-trials, --yes or a yes at the prompt


def _scoring_option(flag: str, metavar: str, help_text: str) -> Any:
    return typer.Option(flag, metavar=metavar, rich_help_panel=SCORING, show_default=False, help=help_text)


def _options(
    space: Annotated[
        Optional[Path],
        typer.Option(
            "--space", metavar="FILE", rich_help_panel=TUNE, show_default=False, help="YAML file with a tune: section."
        ),
    ] = None,
    grid: Annotated[
        Optional[list[str]],
        typer.Option(
            "--grid",
            metavar="KEY=V1,V2",
            rich_help_panel=TUNE,
            show_default=False,
            help="A dimension (repeatable): lr=1e-4,2e-4, rank=8,16; with --random also a range lr=log:2e-5..5e-4. "
            "(default: lr 5e-5,1e-4,2e-4 x rank 8,16)",
        ),
    ] = None,
    random: Annotated[
        Optional[int],
        typer.Option(
            "--random",
            metavar="N",
            rich_help_panel=TUNE,
            show_default=False,
            help="N random points of the space instead of the whole grid.",
        ),
    ] = None,
    steps: Annotated[
        Optional[str],
        typer.Option(
            "--steps",
            metavar="A,B",
            rich_help_panel=TUNE,
            show_default=False,
            help="Scored steps inside each trial (default: 250,500,1000,1500, or those up to --max-steps).",
        ),
    ] = None,
    objective: Annotated[
        Optional[str],
        typer.Option(
            "--objective",
            metavar="NAME",
            rich_help_panel=TUNE,
            show_default=False,
            help="dino (default: among points with CLIP-T >= the base model's - 0.02), clip-i, clip-t or weighted.",
        ),
    ] = None,
    weights: Annotated[
        Optional[str],
        typer.Option(
            "--weights",
            metavar="W",
            rich_help_panel=TUNE,
            show_default=False,
            help="Weights of --objective weighted (default: dino=1,clip-t=1).",
        ),
    ] = None,
    executor: Annotated[
        Optional[str],
        typer.Option(
            "--executor",
            metavar="NAME",
            rich_help_panel=TUNE,
            show_default=False,
            help="local (default; a resumed sweep: its own) or ray (pip install 'sdlora\\[ray]').",
        ),
    ] = None,
    parallel: Annotated[
        Optional[int],
        typer.Option(
            "--parallel",
            metavar="N",
            rich_help_panel=TUNE,
            show_default=False,
            help="Trials at once (one GPU each; default 1).",
        ),
    ] = None,
    ray_address: Annotated[
        Optional[str],
        typer.Option(
            "--ray-address",
            metavar="ADDR",
            rich_help_panel=TUNE,
            show_default=False,
            help="Ray cluster to use (auto, or host:port); default: a local Ray instance.",
        ),
    ] = None,
    early_stop: Annotated[
        bool,
        typer.Option(
            "--early-stop",
            metavar="",
            rich_help_panel=TUNE,
            show_default=False,
            help="Ray: stop trials whose first scored point is in the bottom half (ASHA).",
        ),
    ] = False,
    max_trials: Annotated[
        Optional[int],
        typer.Option(
            "--max-trials",
            metavar="N",
            rich_help_panel=TUNE,
            show_default=False,
            help=f"The most trials this sweep may have (above {ASK_ABOVE} it asks first; default: ask).",
        ),
    ] = None,
    yes: Annotated[
        bool,
        typer.Option(
            "--yes",
            "-y",
            metavar="",
            rich_help_panel=TUNE,
            show_default=False,
            help=f"Start a sweep of more than {ASK_ABOVE} trials without asking.",
        ),
    ] = False,
    resume: Annotated[
        Optional[Path],
        typer.Option(
            "--resume",
            metavar="DIR",
            rich_help_panel=TUNE,
            show_default=False,
            help="Continue an interrupted sweep (runs/<name>): finished trials are kept.",
        ),
    ] = None,
    name: Annotated[
        Optional[str],
        typer.Option(
            "--name",
            metavar="NAME",
            rich_help_panel=TUNE,
            show_default=False,
            help="Sweep folder name (default: tune-<time>).",
        ),
    ] = None,
    prompts: Annotated[
        Optional[list[str]],
        typer.Option(
            "--prompt",
            metavar="PROMPT",
            rich_help_panel=SCORING,
            show_default=False,
            help="Held-out prompt (repeatable; {token} {class} filled in). Default: 4 DreamBooth prompts + "
            "'a photo of {token} {class}'.",
        ),
    ] = None,
    seeds: Annotated[int, _scoring_option("--seeds", "N", "Images (seeds 0, 1, ...) per prompt. (default: 2)")] = 2,
    sample_steps: Annotated[
        Optional[int], _scoring_option("--sample-steps", "N", "Denoising steps per image. (default: the model's)")
    ] = None,
    clip_model: Annotated[
        str, _scoring_option("--clip-model", "NAME", "open_clip scorer; tiny-clip offline. (default: ViT-B-32)")
    ] = "ViT-B-32",
    clip_pretrained: Annotated[
        str, _scoring_option("--clip-pretrained", "TAG", "open_clip weights of --clip-model. (default: openai)")
    ] = "openai",
) -> None:
    """The options of `sdlora tune` that are not config fields."""


_NOT_TUNE = ("run.name",)  # the sweep names its trials; --name is the sweep's


def _signature() -> inspect.Signature:
    """Tune's own options, train's --config and KEY=VALUE, then every train config field (not run.name)."""
    own = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(_options, eval_str=True).parameters.values()
    ]
    train_own = inspect.signature(train_cli.verb_options, eval_str=True).parameters
    shared = [train_own[n].replace(kind=inspect.Parameter.KEYWORD_ONLY) for n in ("overrides", "config")]
    fields = [p for o in train_cli.FIELDS if o.key not in _NOT_TUNE for p in train_cli.field_parameters(o)]
    return inspect.Signature([*shared, *own, *fields])


def _layers(params: dict[str, Any]) -> tuple[list[dict[str, Any]], tuple[str, ...], dict[str, Any]]:
    """The train options as config layers (YAML file without its tune: section, flags, overrides), and
    the tune section (from --space, else the --config file)."""
    from sdlora.tune.space import parse_section

    layers, sources, section = [], [], {}
    if params["config"] is not None:
        data = dict(config_mod.read_yaml(params["config"]))
        raw = data.pop("tune", None)
        section = parse_section(raw, f"--config {params['config']}") if raw is not None else {}
        layers.append(data)
        sources.append(str(params["config"]))
    if params["space"] is not None:
        if not Path(params["space"]).is_file():
            raise ConfigError(f"--space {params['space']}: no such file")
        data = config_mod.read_yaml(params["space"])
        section = parse_section(data.get("tune", data), f"--space {params['space']}")
    layers += [
        config_mod.flat_to_nested(train_cli.flags_given(params)),
        config_mod.parse_dotted(list(params["overrides"] or [])),
    ]
    sources += ["command line", "overrides"]
    return layers, tuple(sources), section


def tune(**params: Any) -> None:
    """Find the best settings for these photos: train several, score each at several steps on the val photos.

    Train options apply to every trial; --grid / --space vary the rest. Writes runs/<name>/tune.json, report.html and best/ (sdlora train --config runs/<name>/best/config.yaml repeats the winner).
    """
    from sdlora.tune import executors
    from sdlora.tune import objective as objective_mod
    from sdlora.tune import space as space_mod
    from sdlora.tune import sweep as sweep_mod
    from sdlora.tune.trial import Scoring

    executor = params["executor"]
    if executor is None:
        saved = sweep_mod.read_record(Path(params["resume"]) / sweep_mod.TUNE_JSON) if params["resume"] else None
        executor = (saved or {}).get("executor") or "local"
    if executor not in executors.EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: choose local or ray")
    if executor == "ray":
        executors.import_ray()
    if params["early_stop"] and executor != "ray":
        raise ConfigError("--early-stop needs --executor ray (ASHA schedules the trials there)")
    at_least_1(seeds=params["seeds"], sample_steps=params["sample_steps"])
    if params["resume"] is not None:
        sweep = sweep_mod.load_sweep(params["resume"])
        sweep.executor = executor
        sweep.parallel = params["parallel"] or sweep.parallel
        jobs = sweep_mod.pending(sweep)
    else:
        layers, sources, section = _layers(params)
        grid = space_mod.parse_grid_options(params["grid"] or []) or section.get("grid") or {}
        steps = space_mod.parse_steps(params["steps"]) if params["steps"] is not None else section.get("steps")
        space = space_mod.build_space(
            grid,
            steps,
            params["random"] if params["random"] is not None else int(section.get("random") or 0),
            int(section.get("seed") or 0),
            max_steps=sweep_mod._given(layers, "train", "max_steps"),
        )
        objective = objective_mod.Objective(
            params["objective"] or section.get("objective") or "dino",
            objective_mod.parse_weights(params["weights"] or section.get("weights")),
        )
        scoring = Scoring(
            prompts=list(params["prompts"] or sweep_mod.default_prompts()),
            seeds=params["seeds"],
            sample_steps=params["sample_steps"],
            dino_model=config_mod.build_config(*layers, sources=sources).validation.dino_model,  # --dino-model
            clip_model=params["clip_model"],
            clip_pretrained=params["clip_pretrained"],
        )
        _check_count(sweep_mod.trial_count(space), params["max_trials"], params["yes"])
        runs_dir = Path(config_mod.build_config(*layers, sources=sources).run.runs_dir).expanduser()
        name = params["name"] or time.strftime("tune-%Y%m%d-%H%M%S")
        if not name.strip() or "/" in name or name in (".", "..", "latest"):
            raise ConfigError(f"--name {name!r}: give a plain folder name (not 'latest', no '/')")
        sweep = sweep_mod.plan_sweep(
            layers,
            sources,
            space,
            objective,
            scoring,
            runs_dir / name,
            executor=executor,
            parallel=params["parallel"] or 1,
        )
        jobs = sweep.jobs
    if sweep.executor == "local" and sweep.parallel == 1:
        from sdlora.evaluate.clip import load_clip
        from sdlora.evaluate.dino import load_dino

        load_dino(sweep.scoring.dino_model, sweep.scoring.device)  # a bad scorer fails before any training
        load_clip(sweep.scoring.clip_model, sweep.scoring.clip_pretrained, sweep.scoring.device)
    for warning in sweep.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    steps = sweep.space.steps
    where = sweep.executor + (f", {sweep.parallel} at once" if sweep.parallel > 1 else "")
    console.print(
        f"tune {sweep.name}: {len(sweep.jobs)} trials x {len(steps)} scored steps ({','.join(map(str, steps))}); "
        f"{len(jobs)} to run on {where} -> {sweep.tune_dir}",
        highlight=False,
        soft_wrap=True,
    )
    left, estimated = [len(jobs)], []  # trials still to run; whether the estimate was printed

    def on_trial(record: dict[str, Any], data: dict[str, Any]) -> None:
        left[0] -= 1
        if record.get("status") == "failed":
            err_console.print(
                f"[red]{record['name']} failed:[/] {record.get('error')}", highlight=False, soft_wrap=True
            )
            return
        seconds = sum((record.get("timings") or {}).values())
        estimate = ""
        if left[0] > 0 and not estimated and seconds > 0:  # once, from the first trial that ran
            estimated.append(True)
            estimate = f"; the other {left[0]}: about {_duration(seconds * left[0] / sweep.parallel)}"
        console.print(
            f"{record['name']}: {record.get('status')}, {len(record.get('points') or [])} points "
            f"in {_duration(seconds)}{estimate}",
            highlight=False,
        )

    renderers: list[Any] = []

    def renderer(job: Any) -> Any:
        renderers.append(train_cli.TrainRenderer())
        return renderers[-1]

    try:
        data = sweep_mod.run_sweep(
            sweep,
            jobs,
            on_trial=on_trial,
            ray_address=params["ray_address"],
            early_stop=params["early_stop"],
            on_event=renderer,
        )
    except KeyboardInterrupt as stop:  # Ctrl-C / SIGTERM: SweepStopped, or StopNow (a second one, mid-save)
        for r in renderers:
            r.close()
        _stopped(stop, sweep.tune_dir)
    finally:
        for r in renderers:
            r.close()
    _render(data)
    winner = data.get("winner")
    if winner:
        console.print(
            f"[green]best:[/] {winner['trial']} at step {winner['step']}"
            + ("" if winner["eligible"] else " [yellow](no point passed the CLIP-T floor)[/]")
            + f"\n  repeat it: sdlora train --config {sweep.tune_dir / 'best' / 'config.yaml'}"
            f"\n  report:    {sweep.tune_dir / 'report.html'}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        err_console.print("[red]no trial was scored[/]: see the failures above", highlight=False)
        raise typer.Exit(1)


tune.__signature__ = _signature()  # type: ignore[attr-defined]


def _check_count(count: int, max_trials: int | None, yes: bool) -> None:
    """A sweep of more than ASK_ABOVE trials (or --max-trials) runs only when asked for: --max-trials N
    at least its size, --yes, or a yes at the prompt; without a terminal to ask, one line naming the flags."""
    if max_trials is not None:
        if max_trials < 1:
            raise ConfigError(f"--max-trials {max_trials}: must be at least 1")
        if count > max_trials:
            raise ConfigError(
                f"the space has {count} trials, more than --max-trials {max_trials}: "
                "give fewer --grid values, or --random N for N random points of it"
            )
        return
    if count <= ASK_ABOVE or yes:
        return
    hint = f"give --max-trials {count} (or --yes) to run them all, or --random N for N random points"
    if not sys.stdin.isatty():
        raise ConfigError(f"the space has {count} trials (more than {ASK_ABOVE}): {hint}")
    if not typer.confirm(f"The space has {count} trials (more than {ASK_ABOVE}); run them all?", default=False):
        raise ConfigError(f"not started: {hint}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _stopped(stop: KeyboardInterrupt, tune_dir: Path) -> None:
    """The line after Ctrl-C / SIGTERM, and the exit: 128 + the signal (130, 143)."""
    from sdlora.train.runtime import StopNow

    signum = getattr(stop, "signum", 2)
    resume = f"continue with: sdlora tune --resume {tune_dir}"
    trial = getattr(stop, "trial", None)
    if isinstance(stop, StopNow):
        what = "stopped without saving: the trial continues from its last checkpoint"
    elif trial is not None:
        what = f"stopped: {trial} saved at step {stop.step} (it continues from there)"  # type: ignore[attr-defined]
    else:
        what = "stopped: the trials continue from their last checkpoints"
    err_console.print(f"[yellow]{what}[/]; {resume}", highlight=False, soft_wrap=True)
    raise typer.Exit(128 + signum)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _short(key: str) -> str:
    """A setting's shortest long flag without dashes (train.learning_rate -> lr)."""
    try:
        flags = [f for f in config_mod.GROUPS[key.split(".")[0]].flags(key.split(".", 1)[1]) if f.startswith("--")]
    except (KeyError, IndexError):
        return key
    return min(flags, key=len)[2:] if flags else key


def _render(data: dict[str, Any]) -> None:
    objective = data["objective"]
    floor = objective.get("floor")
    table = Table(
        title=f"tune {data['name']}: objective {objective['kind']}"
        + (f", CLIP-T floor {floor:.3f}" if floor is not None else ""),
        title_justify="left",
        caption="dim rows: below the CLIP-T floor (base model's CLIP-T - margin)" if floor is not None else None,
        caption_justify="left",
    )
    for column in ("trial", "settings", "step", "DINO", "CLIP-I", "CLIP-T", "objective"):
        left = column in ("trial", "settings")
        table.add_column(column, justify="left" if left else "right", no_wrap=left)
    winner = data.get("winner") or {}
    for r in data["leaderboard"]:
        settings = ", ".join(
            f"{_short(k)}={v:.3g}" if isinstance(v, float) else f"{_short(k)}={v}" for k, v in r["settings"].items()
        )
        best = (r["trial"], r["step"]) == (winner.get("trial"), winner.get("step"))
        table.add_row(
            r["trial"] + (" *" if best else ""),
            settings,
            str(r["step"]),
            _fmt(r["dino"]),
            _fmt(r["clip_i"]),
            _fmt(r["clip_t"]),
            _fmt(r["objective"]),
            style="bold" if best else (None if r["eligible"] else "dim"),
        )
    for f in data["failures"]:
        table.add_row(f["trial"], f"[red]failed: {escape(str(f['error']))}[/]", "", "", "", "", "")
    console.print(table)
