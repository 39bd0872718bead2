"""Inline SVG line plots for the report: no plotting dependency, readable offline in any browser."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Sequence

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
