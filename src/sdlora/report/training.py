"""The report's training sections: curves from metrics.jsonl (`sdlora.run.read_metrics`, keys in
`sdlora.run.Metric`) and the validation samples of each step (samples/step-N/)."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from sdlora.report.parts import Section, Unreadable, figure, fmt_number, not_yet, number, read_json, step_of, thumbnail
from sdlora.report.plots import Series, line_plot
from sdlora.run import METRICS, SAMPLES_DIR, Metric, read_metrics

MAX_VALIDATION_STEPS = 8  # validation steps shown (evenly spaced, first and last included)
VALIDATION_THUMB_PX = 128


def _series(records: list[dict[str, Any]], key: str, label: str | None = None, **style: Any) -> Series:
    rows = [r for r in records if key in r and number(r.get(Metric.STEP)) is not None]
    return Series(label or key, [r[Metric.STEP] for r in rows], [number(r[key]) for r in rows], **style)


def _keys(records: list[dict[str, Any]], prefix: str) -> list[str]:
    return list(dict.fromkeys(k for r in records for k in r if k.startswith(prefix)))


def training_section(run_dir: Path, section: Section) -> Section:
    path = run_dir / METRICS
    if not path.is_file():
        section.body, section.status = not_yet(f"no {METRICS} (written by `sdlora train` while it runs)"), "missing"
        return section
    problems: list[str] = []  # bad lines: shown above the curves, the rest still plotted
    records = read_metrics(path, on_warning=problems.append)
    warn = "".join(f'<p class="warn">{escape(p)}</p>' for p in problems)
    steps = [r for r in records if Metric.LOSS in r]
    vals = [r for r in records if Metric.VAL_LOSS in r]
    if not records:
        section.body, section.status = warn + not_yet(f"{METRICS} has no records yet"), "missing"
        return section
    plots = []
    loss = [
        _series(steps, Metric.LOSS, "loss", color="#1f77b4", width=1, opacity=0.35),
        _series(steps, Metric.LOSS_MEAN, "running mean", color="#1f77b4", width=2.2),
        _series(vals, Metric.VAL_LOSS, "validation loss", color="#d62728", width=2, markers=True),
    ]
    loss += [
        _series(steps, k, k.split("/", 1)[1] + " loss", width=1, dash="4 3") for k in _keys(steps, Metric.LOSS_PREFIX)
    ]
    plots.append(line_plot(loss, title="Loss", ylabel="MSE"))
    grads = _keys(steps, Metric.GRAD_NORM_PREFIX)
    if len(grads) == 2 and Metric.GRAD_NORM_TOTAL in grads:
        grads.remove(Metric.GRAD_NORM_TOTAL)  # one group: its norm is the total
    grads.sort(key=lambda k: (k == Metric.GRAD_NORM_TOTAL, k))  # groups first, the total last (dashed)
    plots.append(
        line_plot(
            [_series(steps, k, k.split("/", 1)[1], dash="5 3" if k == Metric.GRAD_NORM_TOTAL else None) for k in grads],
            title="Gradient norm (before clipping)",
            ylabel="L2 norm",
        )
    )
    lrs = [Metric.LR, *_keys(steps, Metric.LR_PREFIX)]
    effective = _keys(steps, Metric.LR_EFFECTIVE_PREFIX)  # Prodigy: the step size it found, per group
    plots.append(
        line_plot(
            [_series(steps, k, "unet" if k == Metric.LR else k.split("/", 1)[1]) for k in lrs]
            + [_series(steps, k, k.split("/", 1)[1] + " (effective)", dash="4 3") for k in effective],
            title="Learning rate",
            ylabel="lr",
            y_from_zero=True,
        )
    )
    percent = [
        (Metric.CPU_PERCENT, "process CPU"),
        (Metric.SYSTEM_CPU_PERCENT, "system CPU"),
        (Metric.CUDA_UTILIZATION, "GPU utilisation"),
    ]
    plots.append(
        line_plot(
            [_series(records, k, label) for k, label in percent if any(k in r for r in records)],
            title="Machine load",
            ylabel="%",
            y_from_zero=True,
        )
    )
    memory = [(Metric.RSS_GB, "process RAM (RSS)")] + [
        (k, k.removesuffix("_gb").replace("_", " ").replace("cuda", "CUDA"))
        for k in _keys(records, Metric.CUDA_PREFIX)
        if k.endswith("_gb")
    ]
    plots.append(
        line_plot([_series(records, k, label) for k, label in memory], title="Memory", ylabel="GiB", y_from_zero=True)
    )
    if any(Metric.IMAGES_PER_S in r for r in steps):
        plots.append(
            line_plot(
                [_series(steps, Metric.IMAGES_PER_S, "images/s")],
                title="Throughput",
                ylabel="images/s",
                y_from_zero=True,
            )
        )
    norms = _keys(steps, Metric.EMBEDDING_NORM_PREFIX)  # the token's own embedding (pivotal tuning)
    if norms:
        plots.append(
            line_plot(
                [_series(steps, k, k.split("/", 1)[1]) for k in norms], title="Token embedding norm", ylabel="L2 norm"
            )
        )
    dino = [r for r in records if Metric.DINO in r]  # `sdlora train --score-every`
    if dino:
        plots.append(
            line_plot(
                [_series(dino, Metric.DINO, "DINO vs val photos", color="#2ca02c", width=2, markers=True)],
                title="DINO of the validation samples",
                ylabel="cosine",
            )
        )
    section.body = warn + _training_summary(steps, vals, records) + '<div class="plots">' + "".join(plots) + "</div>"
    return section


def _training_summary(steps: list[dict], vals: list[dict], records: list[dict]) -> str:
    items = []
    if steps:
        last = steps[-1]
        items.append(("steps logged", f"{len(steps)} (last step {last.get(Metric.STEP)})"))
        items.append(
            (
                "last loss / running mean",
                f"{fmt_number(last.get(Metric.LOSS), 4)} / {fmt_number(last.get(Metric.LOSS_MEAN), 4)}",
            )
        )
    finite_vals = [v for v in vals if number(v.get(Metric.VAL_LOSS)) is not None]
    if finite_vals:
        best = min(finite_vals, key=lambda v: v[Metric.VAL_LOSS])
        items.append(
            ("best validation loss", f"{fmt_number(best[Metric.VAL_LOSS], 4)} at step {best.get(Metric.STEP)}")
        )
    speeds = sorted(x for x in (number(r.get(Metric.IMAGES_PER_S)) for r in steps) if x is not None)
    if speeds:
        items.append(("median throughput", f"{speeds[len(speeds) // 2]:.2f} images/s"))
    for key, label in ((Metric.RSS_GB, "peak process RAM"), (Metric.CUDA_PEAK_GB, "peak CUDA memory")):
        values = [x for x in (number(r.get(key)) for r in records) if x is not None]
        if values:
            items.append((label, f"{max(values):.2f} GiB"))
    if not items:
        return ""
    return '<dl class="summary">' + "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def validation_section(run_dir: Path, section: Section) -> Section:
    root = run_dir / SAMPLES_DIR
    folders = (
        sorted((f for f in root.glob("step-*") if f.is_dir() and step_of(f) is not None), key=step_of)
        if root.is_dir()
        else []
    )
    if not folders:
        section.body, section.status = not_yet("no samples/step-N folders (train with validation prompts)"), "missing"
        return section
    shown = _evenly(folders, MAX_VALIDATION_STEPS)
    parts = ['<p class="muted">One row per validation step (fixed seeds), so the rows show what training changed.</p>']
    if len(shown) < len(folders):
        parts.append(f'<p class="muted">Showing {len(shown)} of {len(folders)} validation steps.</p>')
    steps = [(folder, _validation_entries(folder)) for folder in shown]
    prompts = list(dict.fromkeys(str(e.get("prompt") or "") for _, entries in steps for e in entries))
    head = "".join(f"<th>{escape(p) or 'images'}</th>" for p in prompts)
    rows = []
    for folder, entries in steps:
        cells = []
        for prompt in prompts:
            figures = "".join(
                figure(
                    thumbnail(folder / e["file"], VALIDATION_THUMB_PX),
                    f"step {step_of(folder)}: {prompt} (seed {e.get('seed')})",
                    f"seed {e['seed']}" if "seed" in e else Path(e["file"]).stem,
                )
                for e in entries
                if str(e.get("prompt") or "") == prompt
            )
            cells.append(f'<td><div class="thumbs">{figures}</div></td>')
        rows.append(f"<tr><th>step {step_of(folder)}</th>{''.join(cells)}</tr>")
    parts.append(f'<table class="val-steps"><tr><th></th>{head}</tr>{"".join(rows)}</table>')
    section.body = "".join(parts)
    return section


def _evenly(items: list[Any], limit: int) -> list[Any]:
    if len(items) <= limit:
        return items
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


def _validation_entries(folder: Path) -> list[dict[str, Any]]:
    """validation.json's images when it lists them, else every PNG in the folder."""
    meta = folder / "validation.json"
    if meta.is_file():
        try:
            data = read_json(meta)
            entries = [e for e in data.get("images", []) if isinstance(e, dict) and "file" in e]
            if entries:
                return entries
        except (Unreadable, AttributeError):
            pass
    return [{"file": p.name} for p in sorted(folder.glob("*.png"))]
