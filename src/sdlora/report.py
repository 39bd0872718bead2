"""The run's HTML report: one self-contained file that opens offline in any browser.

`write_report(run_dir)` (re)writes `run_dir/report.html` from whatever the run folder holds:
the resolved config, curves from metrics.jsonl (loss and its running mean, validation loss,
gradient norms per parameter group, learning rates, machine load, throughput), the sample
grids of each validation step, the LoRA-vs-baseline images of samples.json and the score
table of scores.json. Plots are inline SVG drawn here (no plotting dependency); images are
downscaled JPEG thumbnails embedded as data URIs, so the file can be mailed or archived alone.
A part the run does not have yet is shown as "not yet"; a part that cannot be read is named
with the reason. `train`, `sample` and `score` call it at the end; `sdlora report` on demand.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import math
import re
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Callable, Sequence

from sdlora import __version__
from sdlora.fsutil import write_text
from sdlora.run import BEST_DIR, CONFIG, LORA_DIR, METRICS, REPORT, SAMPLES_DIR, SAMPLES_JSON, SCORES_JSON

MAX_VALIDATION_STEPS = 8  # validation steps shown (evenly spaced, first and last included)
MAX_PROMPTS = 40  # LoRA-vs-baseline prompts shown
THUMB_PX = 192  # longest side of an embedded sample image
VALIDATION_THUMB_PX = 128
SCORE_METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("clip_t_with_token", "CLIP-T +token"))


# ============================================================================ SVG line plots

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


@dataclass
class Series:
    """One line: x and y values (a None y breaks the line), drawn with markers when `markers`."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str | None = None
    width: float = 1.5
    markers: bool = False
    opacity: float = 1.0
    dash: str | None = None
    points: list[tuple[float, float]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.points = [
            (float(x), float(y))
            for x, y in zip(self.xs, self.ys)
            if y is not None and x is not None and math.isfinite(y) and math.isfinite(x)
        ]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2, 2.5 or 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def fmt_tick(value: float, step: float) -> str:
    """A tick label precise enough to tell neighbours apart: 0.05, 2.5e-05, 1,200."""
    if value == 0:
        return "0"
    if step < 1e-3 or abs(value) >= 1e6:  # small learning rates, huge counts: 7.5e-05, 1.2e+06
        return f"{value:.1e}"
    exponent = math.floor(math.log10(step)) if step > 0 else -2
    mantissa = round(step / 10**exponent, 6)
    decimals = max(0, -exponent + (1 if mantissa == 2.5 else 0))
    return f"{value:,.{min(decimals, 6)}f}"


def _range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if lo == hi:  # a flat line: give it some room
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def line_plot(
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
    width: int = 560,
    height: int = 280,
    y_from_zero: bool = False,
) -> str:
    """An <svg> element with one line per series; an empty-state message when nothing has points."""
    left, right, top, bottom = 74, 16, 30, 44
    legend_rows = _legend_rows(series, width - left - right)
    top += 16 * len(legend_rows)
    plot_w, plot_h = width - left - right, height - top - bottom
    total_h = height
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" role="img" viewBox="0 0 {width} {total_h}" '
        f'width="{width}" height="{total_h}" aria-label="{escape(title)}">',
        f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" class="plot-title">{escape(title)}</text>',
    ]
    drawn = [s for s in series if s.points]
    if not drawn:
        out.append(
            f'<text x="{width / 2:.1f}" y="{total_h / 2:.1f}" text-anchor="middle" class="plot-empty">'
            f"no data yet</text></svg>"
        )
        return "".join(out)
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    x_lo, x_hi = (min(xs), max(xs)) if min(xs) < max(xs) else (min(xs) - 1, max(xs) + 1)
    y_lo, y_hi = _range(ys + ([0.0] if y_from_zero else []))
    if y_from_zero and min(ys) >= 0:
        y_lo = 0.0

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y_lo) / (y_hi - y_lo) * plot_h

    # axes, grid and ticks
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="plot-frame"/>')
    yticks = nice_ticks(y_lo, y_hi)
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else abs(y_hi - y_lo)
    for t in yticks:
        y = py(t)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="plot-grid"/>')
        out.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="plot-tick">{fmt_tick(t, ystep)}</text>'
        )
    xticks = [t for t in nice_ticks(x_lo, x_hi, 6) if x_lo <= t <= x_hi]
    xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 1.0
    for t in xticks:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" class="plot-axis"/>')
        out.append(
            f'<text x="{x:.1f}" y="{top + plot_h + 17}" text-anchor="middle" class="plot-tick">'
            f"{fmt_tick(t, xstep)}</text>"
        )
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{total_h - 8}" text-anchor="middle" class="plot-label">'
        f"{escape(xlabel)}</text>"
    )
    if ylabel:
        out.append(
            f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
            f'class="plot-label">{escape(ylabel)}</text>'
        )
    # lines
    for i, s in enumerate(series):
        if not s.points:
            continue
        color = s.color or PALETTE[i % len(PALETTE)]
        for segment in _segments(s):
            if (
                len(segment) == 1 and not s.markers
            ):  # a point between gaps: a dot, since a path of one point is invisible
                ((x, y),) = segment
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2" fill="{color}"/>')
                continue
            if len(segment) == 1:
                continue
            path = " ".join(f"{'M' if j == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for j, (x, y) in enumerate(segment))
            dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
            out.append(
                f'<path d="{path}" fill="none" stroke="{color}" stroke-width="{s.width}" '
                f'stroke-opacity="{s.opacity}"{dash}><title>{escape(s.label)}</title></path>'
            )
        if s.markers:
            for x, y in s.points:
                out.append(
                    f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}">'
                    f"<title>{escape(s.label)}: step {x:g}, {y:.4g}</title></circle>"
                )
    # legend
    y = 34
    for row in legend_rows:
        x = left
        for i, s, w in row:
            color = s.color or PALETTE[i % len(PALETTE)]
            out.append(f'<line x1="{x}" x2="{x + 18}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" stroke-width="3"/>')
            out.append(f'<text x="{x + 22}" y="{y}" class="plot-legend">{escape(s.label)}</text>')
            x += w
        y += 16
    out.append("</svg>")
    return "".join(out)


def _segments(s: Series) -> list[list[tuple[float, float]]]:
    """The series' points split where a y is missing (None / NaN), so gaps stay gaps."""
    segments: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(s.xs, s.ys):
        if y is None or x is None or not math.isfinite(y):
            if segments[-1]:
                segments.append([])
            continue
        segments[-1].append((float(x), float(y)))
    return [seg for seg in segments if seg]


def _legend_rows(series: Sequence[Series], avail: int) -> list[list[tuple[int, Series, int]]]:
    rows: list[list[tuple[int, Series, int]]] = [[]]
    used = 0
    for i, s in enumerate(series):
        if not s.points:
            continue
        w = 30 + 7 * len(s.label)  # about 7 px per character at the legend's font size
        if rows[-1] and used + w > avail:
            rows.append([])
            used = 0
        rows[-1].append((i, s, w))
        used += w
    return [row for row in rows if row]


# ============================================================================ reading the run


class Unreadable(Exception):
    """A file of the run that exists but cannot be read (shown in its section, never raised out)."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; lines that are not JSON objects (a line being written, a crash) are skipped."""
    records = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise Unreadable(f"{path.name}: {exc.strerror or exc}") from exc
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Unreadable(f"{path.name}: {exc}") from exc


def thumbnail(path: Path, max_px: int = THUMB_PX) -> str | None:
    """A data URI of the image downscaled to `max_px` (JPEG; PNG for tiny images); None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    if max(im.size) > max_px:
        im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if max(im.size) <= 96:  # tiny images: PNG is small and stays exact
        im.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    else:
        im.save(buf, format="JPEG", quality=82, optimize=True)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any, digits: int = 3) -> str:
    number = _num(value)
    return "&ndash;" if number is None else f"{number:.{digits}f}"


def _step_of(folder: Path) -> int | None:
    match = re.fullmatch(r"step-(\d+)", folder.name)
    return int(match.group(1)) if match else None


# ============================================================================ sections


@dataclass
class Section:
    id: str
    title: str
    body: str = ""
    status: str = "ok"  # ok, missing ("not yet"), error


def _not_yet(text: str) -> str:
    return f'<p class="not-yet">Not yet: {escape(text)}</p>'


def _img(uri: str | None, alt: str, caption: str) -> str:
    if uri is None:
        return f'<figure class="thumb missing"><div>unreadable</div><figcaption>{escape(caption)}</figcaption></figure>'
    return (
        f'<figure class="thumb"><img src="{uri}" alt="{escape(alt)}" title="{escape(alt)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def config_section(run_dir: Path) -> Section:
    section = Section("config", "Configuration")
    path = run_dir / CONFIG
    if not path.is_file():
        section.body, section.status = _not_yet(f"no {CONFIG} in this run folder"), "missing"
        return section
    text = path.read_text(encoding="utf-8", errors="replace")
    section.body = (
        f'<p class="muted">The fully resolved config ({escape(CONFIG)}): '
        f"<code>sdlora train --config {escape(str(path))}</code> repeats the run.</p>"
        f"<pre>{escape(text)}</pre>"
    )
    return section


def _series(records: list[dict[str, Any]], key: str, label: str | None = None, **style: Any) -> Series:
    rows = [r for r in records if key in r and _num(r.get("step")) is not None]
    return Series(label or key, [r["step"] for r in rows], [_num(r[key]) for r in rows], **style)


def _keys(records: list[dict[str, Any]], prefix: str) -> list[str]:
    return list(dict.fromkeys(k for r in records for k in r if k.startswith(prefix)))


def training_section(run_dir: Path) -> Section:
    section = Section("training", "Training curves")
    path = run_dir / METRICS
    if not path.is_file():
        section.body, section.status = _not_yet(f"no {METRICS} (written by `sdlora train` while it runs)"), "missing"
        return section
    records = read_metrics(path)
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    if not records:
        section.body, section.status = _not_yet(f"{METRICS} has no records yet"), "missing"
        return section
    plots = []
    loss = [
        _series(steps, "loss", "loss", color="#1f77b4", width=1, opacity=0.35),
        _series(steps, "loss_mean", "running mean", color="#1f77b4", width=2.2),
        _series(vals, "val_loss", "validation loss", color="#d62728", width=2, markers=True),
    ]
    loss += [_series(steps, k, k.split("/", 1)[1] + " loss", width=1, dash="4 3") for k in _keys(steps, "loss/")]
    plots.append(line_plot(loss, title="Loss", ylabel="MSE"))
    grads = _keys(steps, "grad_norm/")
    if len(grads) == 2 and "grad_norm/total" in grads:
        grads.remove("grad_norm/total")  # one group: its norm is the total
    grads.sort(key=lambda k: (k == "grad_norm/total", k))  # groups first, the total last (dashed)
    plots.append(
        line_plot(
            [_series(steps, k, k.split("/", 1)[1], dash="5 3" if k.endswith("/total") else None) for k in grads],
            title="Gradient norm (before clipping)",
            ylabel="L2 norm",
        )
    )
    lrs = ["lr", *_keys(steps, "lr/")]
    plots.append(
        line_plot(
            [_series(steps, k, "unet" if k == "lr" else k.split("/", 1)[1]) for k in lrs],
            title="Learning rate",
            ylabel="lr",
            y_from_zero=True,
        )
    )
    percent = [
        ("cpu_percent", "process CPU"),
        ("system_cpu_percent", "system CPU"),
        ("cuda_utilization_percent", "GPU utilisation"),
    ]
    plots.append(
        line_plot(
            [_series(records, k, label) for k, label in percent if any(k in r for r in records)],
            title="Machine load",
            ylabel="%",
            y_from_zero=True,
        )
    )
    memory = [("rss_gb", "process RAM (RSS)")] + [
        (k, k.removesuffix("_gb").replace("_", " ").replace("cuda", "CUDA"))
        for k in _keys(records, "cuda_")
        if k.endswith("_gb")
    ]
    plots.append(
        line_plot([_series(records, k, label) for k, label in memory], title="Memory", ylabel="GiB", y_from_zero=True)
    )
    if any("images_per_s" in r for r in steps):
        plots.append(
            line_plot(
                [_series(steps, "images_per_s", "images/s")], title="Throughput", ylabel="images/s", y_from_zero=True
            )
        )
    norms = _keys(steps, "embedding_norm/")  # the token's own embedding (pivotal tuning)
    if norms:
        plots.append(
            line_plot(
                [_series(steps, k, k.split("/", 1)[1]) for k in norms], title="Token embedding norm", ylabel="L2 norm"
            )
        )
    dino = [r for r in records if "dino" in r]  # `sdlora train --score-every`
    if dino:
        plots.append(
            line_plot(
                [_series(dino, "dino", "DINO vs val photos", color="#2ca02c", width=2, markers=True)],
                title="DINO of the validation samples",
                ylabel="cosine",
            )
        )
    section.body = _training_summary(steps, vals, records) + '<div class="plots">' + "".join(plots) + "</div>"
    return section


def _training_summary(steps: list[dict], vals: list[dict], records: list[dict]) -> str:
    items = []
    if steps:
        last = steps[-1]
        items.append(("steps logged", f"{len(steps)} (last step {last.get('step')})"))
        items.append(("last loss / running mean", f"{_fmt(last.get('loss'), 4)} / {_fmt(last.get('loss_mean'), 4)}"))
    finite_vals = [v for v in vals if _num(v.get("val_loss")) is not None]
    if finite_vals:
        best = min(finite_vals, key=lambda v: v["val_loss"])
        items.append(("best validation loss", f"{_fmt(best['val_loss'], 4)} at step {best.get('step')}"))
    speeds = sorted(x for x in (_num(r.get("images_per_s")) for r in steps) if x is not None)
    if speeds:
        items.append(("median throughput", f"{speeds[len(speeds) // 2]:.2f} images/s"))
    for key, label in (("rss_gb", "peak process RAM"), ("cuda_peak_gb", "peak CUDA memory")):
        values = [x for x in (_num(r.get(key)) for r in records) if x is not None]
        if values:
            items.append((label, f"{max(values):.2f} GiB"))
    if not items:
        return ""
    return '<dl class="summary">' + "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def validation_section(run_dir: Path) -> Section:
    section = Section("validation", "Samples during training")
    root = run_dir / SAMPLES_DIR
    folders = (
        sorted((f for f in root.glob("step-*") if f.is_dir() and _step_of(f) is not None), key=_step_of)
        if root.is_dir()
        else []
    )
    if not folders:
        section.body, section.status = _not_yet("no samples/step-N folders (train with validation prompts)"), "missing"
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
                _img(
                    thumbnail(folder / e["file"], VALIDATION_THUMB_PX),
                    f"step {_step_of(folder)}: {prompt} (seed {e.get('seed')})",
                    f"seed {e['seed']}" if "seed" in e else Path(e["file"]).stem,
                )
                for e in entries
                if str(e.get("prompt") or "") == prompt
            )
            cells.append(f'<td><div class="thumbs">{figures}</div></td>')
        rows.append(f"<tr><th>step {_step_of(folder)}</th>{''.join(cells)}</tr>")
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


def comparison_section(run_dir: Path) -> Section:
    section = Section("samples", "LoRA vs base model")
    path = run_dir / SAMPLES_DIR / SAMPLES_JSON
    if not path.is_file():
        section.body = _not_yet('no samples.json (run `sdlora sample "sksToy on a beach"`)')
        section.status = "missing"
        return section
    data = read_json(path)
    images = (
        [e for e in (data.get("images") or []) if isinstance(e, dict) and "file" in e] if isinstance(data, dict) else []
    )
    if not images:
        section.body, section.status = _not_yet(f"{SAMPLES_JSON} lists no images"), "missing"
        return section
    prompts: dict[str, list[dict[str, Any]]] = {}
    for entry in images:
        prompts.setdefault(str(entry.get("prompt", "")), []).append(entry)
    settings = ", ".join(
        f"{k} {escape(str(data[k]))}"
        for k in ("model", "steps", "guidance", "scheduler", "lora_scale")
        if data.get(k) is not None
    )
    parts = [
        f'<p class="muted">Same prompts and seeds; the base row is the base model with the LoRA switched off. '
        f"Last sampling: {settings}.</p>"
    ]
    names = list(prompts)
    if len(names) > MAX_PROMPTS:
        parts.append(f'<p class="muted">Showing the first {MAX_PROMPTS} of {len(names)} prompts.</p>')
    for prompt in names[:MAX_PROMPTS]:
        mine = prompts[prompt]
        rows = []
        for variant, label in (("lora", "LoRA"), ("baseline", "base")):
            chosen = sorted(
                (e for e in mine if e.get("variant") == variant), key=lambda e: (e.get("index", 0), e["file"])
            )
            if not chosen:
                continue
            figures = "".join(
                _img(
                    thumbnail(path.parent / e["file"]),
                    f"{label}: {prompt} (seed {e.get('seed')})",
                    f"seed {e.get('seed')}",
                )
                for e in chosen
            )
            rows.append(
                f'<div class="prompt-row"><div class="row-label variant-{variant}">{label}</div>'
                f'<div class="thumbs">{figures}</div></div>'
            )
        written = mine[0].get("prompt_as_written")
        note = f' <span class="muted">(written as “{escape(written)}”)</span>' if written and written != prompt else ""
        parts.append(f'<div class="comparison"><h3>{escape(prompt)}{note}</h3>{"".join(rows)}</div>')
    section.body = "".join(parts)
    return section


def scores_section(run_dir: Path) -> Section:
    section = Section("scores", "Scores")
    path = run_dir / SCORES_JSON
    if not path.is_file():
        section.body, section.status = _not_yet("no scores.json (run `sdlora score`)"), "missing"
        return section
    data = read_json(path)
    if not isinstance(data, dict):
        raise Unreadable(f"{SCORES_JSON}: not a JSON object")
    overall = data.get("overall") or {}
    lora, base = overall.get("lora") or {}, overall.get("baseline") or {}
    head = "<tr><th>metric</th><th>LoRA</th><th>base model</th><th>LoRA &minus; base</th></tr>"
    rows = []
    for key, label in SCORE_METRICS:
        a, b = _num(lora.get(key)), _num(base.get(key))
        if a is None and b is None:
            continue
        delta = (
            "&ndash;" if a is None or b is None else f'<span class="{"up" if a >= b else "down"}">{a - b:+.3f}</span>'
        )
        rows.append(f"<tr><th>{label}</th><td>{_fmt(a)}</td><td>{_fmt(b)}</td><td>{delta}</td></tr>")
    rows.append(
        f"<tr><th>images</th><td>{escape(str(lora.get('images', '–')))}</td>"
        f"<td>{escape(str(base.get('images', '–')))}</td><td></td></tr>"
    )
    parts = [_scorers_note(data), f'<table class="scores overall">{head}{"".join(rows)}</table>']
    per_prompt = [p for p in (data.get("prompts") or []) if isinstance(p, dict)]
    if per_prompt:
        head = (
            "<tr><th>prompt</th><th>variant</th>"
            + "".join(f"<th>{label}</th>" for _, label in SCORE_METRICS)
            + "<th>images</th></tr>"
        )
        body = []
        for entry in per_prompt:
            for i, (variant, label) in enumerate((("lora", "LoRA"), ("baseline", "base"))):
                scores = entry.get(variant) or {}
                prompt_cell = f'<td rowspan="2">{escape(str(entry.get("prompt", "")))}</td>' if i == 0 else ""
                body.append(
                    f'<tr class="{variant}">{prompt_cell}<td class="variant">{label}</td>'
                    + "".join(f"<td>{_fmt(scores.get(k))}</td>" for k, _ in SCORE_METRICS)
                    + f"<td>{escape(str(scores.get('images', 0)))}</td></tr>"
                )
        parts.append(f'<h3>Per prompt</h3><table class="scores per-prompt">{head}{"".join(body)}</table>')
    if data.get("scale"):
        parts.append(f'<p class="muted">{escape(str(data["scale"]))}</p>')
    section.body = "".join(parts)
    return section


def _scorers_note(data: dict[str, Any]) -> str:
    scorers = data.get("scorers") or {}
    bits = []
    dino, clip = scorers.get("dino") or {}, scorers.get("clip") or {}
    if dino.get("model"):
        bits.append(f"DINO {escape(str(dino['model']))}")
    if clip.get("model"):
        pretrained = f" ({escape(str(clip['pretrained']))})" if clip.get("pretrained") else ""
        bits.append(f"CLIP {escape(str(clip['model']))}{pretrained}")
    real = data.get("real") or {}
    if real.get("count") is not None:
        bits.append(f"{escape(str(real['count']))} real {escape(str(real.get('split', 'val')))} photos")
    if data.get("created"):
        bits.append(f"scored {escape(str(data['created']))}")
    tiny = any(str(s.get("model", "")).startswith("tiny-") for s in (dino, clip))
    warn = (
        '<p class="warn">Tiny random scorer models: these numbers check the plumbing, not the LoRA.</p>' if tiny else ""
    )
    return (f'<p class="muted">{"; ".join(bits)}.</p>' if bits else "") + warn


def outputs_section(run_dir: Path) -> Section:
    section = Section("outputs", "LoRA files")
    rows = []
    for folder in (LORA_DIR, BEST_DIR):
        for file in sorted((run_dir / folder).glob("*.safetensors")) if (run_dir / folder).is_dir() else []:
            rows.append(
                f"<tr><td><code>{escape(folder)}/{escape(file.name)}</code></td>"
                f"<td>{file.stat().st_size / 2**20:.2f} MiB</td><td>{escape(_lora_kind(file))}</td></tr>"
            )
    if not rows:
        section.body, section.status = _not_yet("no LoRA written (training not finished)"), "missing"
        return section
    section.body = (
        '<table class="files"><tr><th>file</th><th>size</th><th>format</th></tr>' + "".join(rows) + "</table>"
    )
    return section


def _lora_kind(file: Path) -> str:
    if file.name == "pytorch_lora_weights.safetensors":
        return "diffusers / peft (pipe.load_lora_weights)"
    if file.name == "embeddings.safetensors":
        return "textual-inversion embedding"
    return "kohya (AUTOMATIC1111, ComfyUI)"


# ============================================================================ page

SECTIONS: tuple[Callable[[Path], Section], ...] = (
    scores_section,
    comparison_section,
    training_section,
    validation_section,
    outputs_section,
    config_section,
)

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px}
header{background:#20252c;color:#eee;padding:18px 24px}header h1{margin:0 0 4px;font-size:22px}
header .meta{color:#bbb;font-size:13px}header code{color:#ddd}
nav{margin-top:8px}nav a{color:#9cf;margin-right:14px;text-decoration:none;font-size:13px}
nav a.missing{color:#888}
section{background:#fff;border:1px solid #e2e4e8;border-radius:8px;padding:12px 18px;margin:16px 0}
h2{font-size:18px;margin:4px 0 10px}h3{font-size:15px;margin:14px 0 6px}
.muted{color:#666}.not-yet{color:#777;font-style:italic}.warn{color:#a15c00}.error{color:#b00020}
pre{background:#f3f4f6;padding:10px;border-radius:6px;overflow:auto;max-height:420px;font-size:12px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:10px}
svg.plot{background:#fff;border:1px solid #eee;border-radius:4px;width:100%;height:auto}
.plot-title{font-size:14px;font-weight:600;fill:#222}.plot-tick{font-size:11px;fill:#555}
.plot-label{font-size:12px;fill:#444}.plot-legend{font-size:12px;fill:#333}.plot-empty{font-size:13px;fill:#888}
.plot-frame{fill:none;stroke:#bbb}.plot-grid{stroke:#eee}.plot-axis{stroke:#999}
.prompt-row{display:flex;align-items:center;gap:8px;margin:4px 0}
.row-label{width:150px;flex:none;font-size:13px;color:#333;word-break:break-word}
.variant-lora{font-weight:600;color:#1f5fa8}.variant-baseline{color:#666}
.thumbs{display:flex;flex-wrap:wrap;gap:6px}
figure.thumb{margin:0;text-align:center}figure.thumb img{display:block;width:128px;height:128px;object-fit:cover;
image-rendering:auto;border-radius:3px;border:1px solid #ddd}
.val-steps figure.thumb img{width:96px;height:96px}table.val-steps th{text-align:left;vertical-align:middle;font-weight:600}
table.val-steps td{text-align:left}
figure.thumb figcaption{font-size:11px;color:#666}
figure.missing div{width:128px;height:128px;background:#eee;color:#999;display:flex;align-items:center;justify-content:center}
table{border-collapse:collapse;margin:6px 0}th,td{border:1px solid #e2e4e8;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}table.per-prompt td:first-child{max-width:360px}
tr.baseline td{color:#666}td.variant{text-align:left}table.files td{text-align:left}.up{color:#17803d}.down{color:#b00020}
dl.summary{display:grid;grid-template-columns:max-content auto;gap:2px 16px;margin:0 0 10px}
dl.summary dt{color:#666}dl.summary dd{margin:0}
"""


def render_report(run_dir: Path) -> str:
    """The report's HTML for `run_dir` (never raises for missing or unreadable parts)."""
    run_dir = Path(run_dir)
    sections = []
    for build in SECTIONS:
        try:
            sections.append(build(run_dir))
        except (Unreadable, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            name = build.__name__.removesuffix("_section")
            section = Section(name, name.capitalize(), status="error")
            section.body = f'<p class="error">Could not be shown: {escape(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}</p>'
            sections.append(section)
    nav = "".join(
        f'<a href="#{s.id}" class="{"missing" if s.status == "missing" else ""}">{escape(s.title)}</a>'
        for s in sections
    )
    body = "".join(
        f'<section id="{s.id}" class="{s.status}"><h2>{escape(s.title)}</h2>{s.body}</section>' for s in sections
    )
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>sdlora report: {escape(run_dir.name)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>sdlora run {escape(run_dir.name)}</h1><div class="meta">{_run_meta(run_dir)}'
        f" &middot; report written {escape(now)} by sdlora {escape(__version__)}</div><nav>{nav}</nav></header>"
        f"<main>{body}</main></body></html>\n"
    )


def _run_meta(run_dir: Path) -> str:
    import yaml

    bits = [f"<code>{escape(str(run_dir))}</code>"]
    try:
        config = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8"))
        model, data = config.get("model") or {}, config.get("data") or {}
        if model.get("name"):
            bits.append(f"base model {escape(str(model['name']))}")
        if data.get("token"):
            bits.append(f"token <b>{escape(str(data['token']))}</b> {escape(str(data.get('class_word', '')))}")
        if data.get("resolution"):
            bits.append(f"{escape(str(data['resolution']))} px")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        pass
    if _is_tiny(run_dir):
        bits.append('<span class="warn">tiny random-weight model: its images are noise</span>')
    return " &middot; ".join(bits)


def _is_tiny(run_dir: Path) -> bool:
    try:
        import yaml

        from sdlora.models.loading import is_tiny

        config = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8"))
        return is_tiny(str((config.get("model") or {}).get("name")))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return False


def write_report(run_dir: Path) -> Path:
    """(Re)write run_dir/report.html from whatever the run has; returns its path."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT
    write_text(path, render_report(run_dir))
    return path
