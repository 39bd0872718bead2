"""The report's result sections: LoRA vs base model images (samples.json), the score tables
(scores.json), both read through `sdlora.run`'s schema-checked readers; the LoRA files and the config
(with a strip of train images beside their subject masks when the dataset has masks)."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from sdlora.report.parts import Section, figure, fmt_number, not_yet, number, thumbnail
from sdlora.run import (
    BEST_DIR,
    CONFIG,
    DIFFUSERS_LORA,
    EMBEDDINGS,
    LORA_DIR,
    SAMPLES_DIR,
    SAMPLES_JSON,
    SCORE_METRICS,
    SCORES_JSON,
    VARIANTS,
    read_samples,
    read_scores,
)
from sdlora.safetensors_io import DAMAGED, problem

MAX_PROMPTS = 40  # LoRA-vs-baseline prompts shown
MASK_STRIP = 4  # train images shown beside their subject masks
VARIANT_LABELS = ("LoRA", "base")  # beside VARIANTS
METRIC_LABELS = dict(zip(SCORE_METRICS, ("DINO", "CLIP-I", "CLIP-T", "CLIP-T +token"), strict=True))


def comparison_section(run_dir: Path, section: Section) -> Section:
    path = run_dir / SAMPLES_DIR / SAMPLES_JSON
    if not path.is_file():
        section.body = not_yet('no samples.json (run `sdlora sample "sksToy on a beach"`)')
        section.status = "missing"
        return section
    data = read_samples(path)
    images = data["images"]
    if not images:
        section.body, section.status = not_yet(f"{SAMPLES_JSON} lists no images"), "missing"
        return section
    prompts: dict[str, list[dict[str, Any]]] = {}
    for entry in images:
        prompts.setdefault(entry["prompt"], []).append(entry)
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
        for variant, label in zip(VARIANTS, VARIANT_LABELS):
            chosen = sorted((e for e in mine if e["variant"] == variant), key=lambda e: (e["index"], e["file"]))
            if not chosen:
                continue
            figures = "".join(
                figure(
                    thumbnail(path.parent / e["file"]),
                    f"{label}: {prompt} (seed {e['seed']})",
                    f"seed {e['seed']}",
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


def scores_section(run_dir: Path, section: Section) -> Section:
    path = run_dir / SCORES_JSON
    if not path.is_file():
        section.body, section.status = not_yet("no scores.json (run `sdlora score`)"), "missing"
        return section
    data = read_scores(path)
    overall = data["overall"]
    lora, base = overall.get("lora") or {}, overall.get("baseline") or {}
    head = "<tr><th>metric</th><th>LoRA</th><th>base model</th><th>LoRA &minus; base</th></tr>"
    rows = []
    for key, label in METRIC_LABELS.items():
        a, b = number(lora.get(key)), number(base.get(key))
        if a is None and b is None:
            continue
        delta = (
            "&ndash;" if a is None or b is None else f'<span class="{"up" if a >= b else "down"}">{a - b:+.3f}</span>'
        )
        rows.append(f"<tr><th>{label}</th><td>{fmt_number(a)}</td><td>{fmt_number(b)}</td><td>{delta}</td></tr>")
    rows.append(
        f"<tr><th>images</th><td>{escape(str(lora.get('images', '–')))}</td>"
        f"<td>{escape(str(base.get('images', '–')))}</td><td></td></tr>"
    )
    parts = [_scorers_note(data), f'<table class="scores overall">{head}{"".join(rows)}</table>']
    per_prompt = [p for p in (data.get("prompts") or []) if isinstance(p, dict)]
    if per_prompt:
        head = (
            "<tr><th>prompt</th><th>variant</th>"
            + "".join(f"<th>{label}</th>" for label in METRIC_LABELS.values())
            + "<th>images</th></tr>"
        )
        body = []
        for entry in per_prompt:
            for i, (variant, label) in enumerate(zip(VARIANTS, VARIANT_LABELS)):
                scores = entry.get(variant) or {}
                prompt_cell = f'<td rowspan="2">{escape(str(entry.get("prompt", "")))}</td>' if i == 0 else ""
                body.append(
                    f'<tr class="{variant}">{prompt_cell}<td class="variant">{label}</td>'
                    + "".join(f"<td>{fmt_number(scores.get(k))}</td>" for k in SCORE_METRICS)
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


def outputs_section(run_dir: Path, section: Section) -> Section:
    """The exported files, each checked whole: a damaged one is shown as damaged and marks the section."""
    rows, broken = [], []
    for folder in (LORA_DIR, BEST_DIR):
        for file in sorted((run_dir / folder).glob("*.safetensors")) if (run_dir / folder).is_dir() else []:
            trouble = problem(file)
            kind, row_class = _lora_kind(file), ""
            if trouble is not None:
                broken.append(trouble)
                kind, row_class = f"{DAMAGED}: not usable", ' class="error"'
            rows.append(
                f"<tr{row_class}><td><code>{escape(folder)}/{escape(file.name)}</code></td>"
                f"<td>{file.stat().st_size / 2**20:.2f} MiB</td><td>{escape(kind)}</td></tr>"
            )
    if not rows:
        section.body, section.status = not_yet("no LoRA written (training not finished)"), "missing"
        return section
    section.body = (
        '<table class="files"><tr><th>file</th><th>size</th><th>format</th></tr>' + "".join(rows) + "</table>"
    )
    if broken:
        section.status = "error"
        section.body = "".join(f'<p class="error">{escape(line)}</p>' for line in broken) + section.body
    return section


def _lora_kind(file: Path) -> str:
    if file.name == DIFFUSERS_LORA:
        return "diffusers only (pipe.load_lora_weights); not for ComfyUI / AUTOMATIC1111"
    if file.name == EMBEDDINGS:
        return "textual-inversion embedding"
    return "kohya: ComfyUI, AUTOMATIC1111, Forge (diffusers too)"


def config_section(run_dir: Path, section: Section) -> Section:
    path = run_dir / CONFIG
    if not path.is_file():
        section.body, section.status = not_yet(f"no {CONFIG} in this run folder"), "missing"
        return section
    text = path.read_text(encoding="utf-8", errors="replace")
    section.body = (
        f'<p class="muted">The fully resolved config ({escape(CONFIG)}): '
        f"<code>sdlora train --config {escape(str(path))}</code> repeats the run.</p>"
        f"{mask_strip(text)}<pre>{escape(text)}</pre>"
    )
    return section


def mask_strip(config_text: str) -> str:
    """A few train images beside their subject masks (`prepare --masks`), with how the loss used them;
    empty when the dataset has no masks or is not where config.yaml says (moved, deleted)."""
    from sdlora import yamlfile
    from sdlora.data.manifest import load_manifest
    from sdlora.data.masks import MASKS
    from sdlora.errors import SdloraError

    try:
        data = (yamlfile.loads(config_text, CONFIG) or {}).get("data") or {}
        dataset = Path(str(data["dataset"]))
        manifest = load_manifest(dataset)
    except (SdloraError, OSError, KeyError, TypeError, AttributeError):
        return ""
    names = [n for n in manifest.train if n in manifest.images and manifest.images[n].mask][:MASK_STRIP]
    if not names:
        return ""
    figures = []
    for name in names:
        rec = manifest.images[name]
        coverage = f"mask, {rec.mask_coverage:.0%}" if isinstance(rec.mask_coverage, (int, float)) else "mask"
        figures.append(figure(thumbnail(dataset / "images" / name), name, name))
        figures.append(figure(thumbnail(dataset / MASKS / str(rec.mask)), f"{name} mask", coverage))
    if data.get("masked_loss"):
        use = f"the loss weighs the background {fmt_number(data.get('unmasked_weight'), 2)} (--unmasked-weight)"
    else:
        use = "not used by this run's loss (--no-masked-loss)"
    masked = sum(1 for rec in manifest.images.values() if rec.mask)
    return (
        f'<p class="muted">Subject masks (white = object) of {masked} of the dataset\'s {len(manifest.images)} '
        f"images; {escape(use)}. Check that each covers the object and not the background:</p>"
        f'<div class="thumbs">{"".join(figures)}</div>'
    )
