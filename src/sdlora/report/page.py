"""The report page: its sections in order, the style sheet, the header, and writing report.html."""

from __future__ import annotations

import datetime
import os
from html import escape
from pathlib import Path
from typing import Callable

from sdlora import __version__
from sdlora.errors import SdloraError
from sdlora.fsutil import write_text
from sdlora.report.parts import Section, Unreadable
from sdlora.report.results import comparison_section, config_section, outputs_section, scores_section
from sdlora.report.training import training_section, validation_section
from sdlora.run import CONFIG, REPORT

# (id, title, the function that fills it), in page order
SECTIONS: tuple[tuple[str, str, Callable[[Path, Section], Section]], ...] = (
    ("scores", "Scores", scores_section),
    ("samples", "LoRA vs base model", comparison_section),
    ("training", "Training curves", training_section),
    ("validation", "Samples during training", validation_section),
    ("outputs", "LoRA files", outputs_section),
    ("config", "Configuration", config_section),
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
    for section_id, title, build in SECTIONS:
        try:
            sections.append(build(run_dir, Section(section_id, title)))
        except (SdloraError, Unreadable, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            section = Section(section_id, title, status="error")
            reason = (str(exc).splitlines() or [type(exc).__name__])[0].replace(f"{run_dir}{os.sep}", "")
            section.body = f'<p class="error">Could not be shown: {escape(reason)}</p>'
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
    from sdlora import yamlfile

    bits = [f"<code>{escape(str(run_dir))}</code>"]
    try:
        config = yamlfile.read(run_dir / CONFIG)
        model, data = config.get("model") or {}, config.get("data") or {}
        if model.get("name"):
            bits.append(f"base model {escape(str(model['name']))}")
        if data.get("token"):
            bits.append(f"token <b>{escape(str(data['token']))}</b> {escape(str(data.get('class_word', '')))}")
        if data.get("resolution"):
            bits.append(f"{escape(str(data['resolution']))} px")
    except (OSError, ValueError, AttributeError, yamlfile.YamlError):
        pass
    if _is_tiny(run_dir):
        bits.append('<span class="warn">tiny random-weight model: its images are noise</span>')
    return " &middot; ".join(bits)


def _is_tiny(run_dir: Path) -> bool:
    try:
        from sdlora import yamlfile
        from sdlora.models.loading import is_tiny

        config = yamlfile.read(run_dir / CONFIG)
        return is_tiny(str((config.get("model") or {}).get("name")))
    except (OSError, ValueError, AttributeError, yamlfile.YamlError):
        return False


def write_report(run_dir: Path) -> Path:
    """(Re)write run_dir/report.html from whatever the run has; returns its path."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT
    write_text(path, render_report(run_dir))
    return path
