"""runs/<tune>/report.html: the trials compared, one self-contained page like a run's report.

The leaderboard (every scored point, best first), the scores per step as plots (one line per trial;
the CLIP-T floor dashed), and the same prompt and seed side by side across the top trials at their
chosen steps. Plots, thumbnails and the style sheet are `sdlora.report`'s.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from sdlora.fsutil import write_text
from sdlora.report.page import CSS
from sdlora.report.parts import figure, fmt_number, thumbnail
from sdlora.report.plots import Series, line_plot

REPORT = "report.html"
TOP = 4  # trials shown side by side


def _settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def _leaderboard(data: dict[str, Any]) -> str:
    winner = data.get("winner") or {}
    rows = []
    for r in data.get("leaderboard") or []:
        mark = " &#9733;" if (r["trial"], r["step"]) == (winner.get("trial"), winner.get("step")) else ""
        cls = "" if r["eligible"] else ' class="baseline"'
        rows.append(
            f"<tr{cls}><td>{escape(r['trial'])}{mark}</td><td>{escape(_settings(r['settings']))}</td>"
            f"<td>{r['step']}</td><td>{fmt_number(r['dino'])}</td><td>{fmt_number(r['clip_i'])}</td>"
            f"<td>{fmt_number(r['clip_t'])}</td><td>{fmt_number(r['objective'])}</td></tr>"
        )
    for f in data.get("failures") or []:
        rows.append(
            f'<tr><td>{escape(f["trial"])}</td><td colspan="6" class="error">{escape(str(f["error"]))}</td></tr>'
        )
    objective = data["objective"]
    floor = objective.get("floor")
    note = f"objective {escape(objective['kind'])}" + (
        f"; CLIP-T floor {floor:.3f} (base model's CLIP-T - {objective['margin']}); greyed rows are below it"
        if floor is not None
        else "; no CLIP-T floor"
    )
    return (
        f'<p class="muted">{note}</p><table><tr><th>trial</th><th>settings</th><th>step</th><th>DINO</th>'
        f"<th>CLIP-I</th><th>CLIP-T</th><th>objective</th></tr>{''.join(rows)}</table>"
    )


def _plots(data: dict[str, Any]) -> str:
    plots = []
    floor = data["objective"].get("floor")
    for key, label in (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T")):
        series = [
            Series(t["name"], [p["step"] for p in t["points"]], [p.get(key) for p in t["points"]], markers=True)
            for t in data["trials"]
            if t["points"]
        ]
        if key == "clip_t" and floor is not None and series:
            steps = [p["step"] for t in data["trials"] for p in t["points"]]
            series.append(Series("floor", [min(steps), max(steps)], [floor, floor], color="#7f7f7f", dash="4 3"))
        plots.append(line_plot(series, title=f"{label} per scored step", ylabel=label))
    return f'<div class="plots">{"".join(plots)}</div>'


def _side_by_side(tune_dir: Path, data: dict[str, Any]) -> str:
    """Each prompt and seed as a row, the top trials (at their best points) as columns."""
    from sdlora.run import read_samples

    best_points: dict[str, dict[str, Any]] = {}
    for r in data.get("leaderboard") or []:
        if r["objective"] is not None and r["trial"] not in best_points:
            best_points[r["trial"]] = r
    top = list(best_points.values())[:TOP]
    if not top:
        return '<p class="not-yet">Not yet: no trial has been scored.</p>'
    images: dict[str, dict[tuple[str, int], Path]] = {}
    for r in top:
        trial = next(t for t in data["trials"] if t["name"] == r["trial"])
        point = next(p for p in trial["points"] if p["step"] == r["step"])
        samples = tune_dir / point["folder"] / "samples"
        entries = read_samples(samples / "samples.json", missing_ok=True)["images"]
        images[r["trial"]] = {(e["prompt"], e["seed"]): samples / e["file"] for e in entries if e["variant"] == "lora"}
    keys = list(dict.fromkeys(k for found in images.values() for k in found))
    head = "".join(
        f"<th>{escape(r['trial'])} @ {r['step']}<br><small>{escape(_settings(r['settings']))}</small></th>" for r in top
    )
    rows = []
    for prompt, seed in keys:
        cells = "".join(
            f"<td>{figure(thumbnail(images[r['trial']][(prompt, seed)]) if (prompt, seed) in images[r['trial']] else None, prompt, '')}</td>"
            for r in top
        )
        rows.append(f"<tr><th>{escape(prompt)}<br><small>seed {seed}</small></th>{cells}</tr>")
    return f'<table class="val-steps"><tr><th>prompt</th>{head}</tr>{"".join(rows)}</table>'


def render_tune_report(tune_dir: Path, data: dict[str, Any]) -> str:
    winner = data.get("winner")
    headline = (
        f"winner {escape(winner['trial'])} at step {winner['step']} ({escape(_settings(winner['settings']))})"
        if winner
        else "no winner yet"
    )
    sections = [
        ("leaderboard", "Leaderboard", _leaderboard(data)),
        ("plots", "Scores per step", _plots(data)),
        ("images", "Same prompt and seed, top trials", _side_by_side(Path(tune_dir), data)),
    ]
    body = "".join(f'<section id="{i}"><h2>{escape(t)}</h2>{b}</section>' for i, t, b in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>sdlora tune: {escape(data['name'])}</title><style>{CSS}</style></head><body>"
        f'<header><h1>sdlora tune {escape(data["name"])}</h1><div class="meta">{headline} &middot; '
        f"{len(data['trials'])} trials x {len(data['space']['steps'])} scored steps</div></header>"
        f"<main>{body}</main></body></html>\n"
    )


def write_tune_report(tune_dir: Path, data: dict[str, Any]) -> Path:
    path = Path(tune_dir) / REPORT
    write_text(path, render_tune_report(Path(tune_dir), data))
    return path
