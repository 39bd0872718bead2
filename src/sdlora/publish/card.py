"""A run's model card: huggingface_hub's `ModelCard`, YAML front matter and a Markdown body.

The front matter is what the Hub reads: `base_model` (a hub id only: a tiny model or a local folder
has none), `library_name: diffusers`, `license` (the base model's where known, else `other`), tags,
`instance_prompt` (the trigger token) and a `widget` of sample images with their prompts. The body
says what the run is (and plainly when its base model is a tiny random one), shows the LoRA beside
the base model for the same prompts and seeds, the scores against the base model (scores.json), the
training settings that matter (config.yaml, and the LoRA file's own metadata for the steps done),
and how to load the files in diffusers, ComfyUI and AUTOMATIC1111.

One card, two places: `write_run_card` writes it into the run folder as README.md (the name the Hub,
GitHub and file browsers show for a folder), its code loading from `runs/<name>/lora`; `sdlora push`
renders it again for the repo (`repo_id`), its code loading from the Hub. Image links are
`samples/...` in both, relative to the card, because the push stages the images at the same paths.
Everything here reads files; nothing loads a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sdlora.fsutil import write_text
from sdlora.run import (
    DIFFUSERS_LORA,
    EMBEDDINGS,
    LORA_DIR,
    SAMPLES_DIR,
    SAMPLES_JSON,
    SCORE_METRICS,
    SCORES_JSON,
    RunInfo,
    load_run,
    read_samples,
    read_scores,
)
from sdlora.safetensors_io import read_metadata

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

CARD = "README.md"  # in the run folder and at the root of the pushed repo
MAX_PROMPTS = 4  # sample prompts shown (one LoRA image and its baseline each)

METRIC_LABELS = dict(zip(SCORE_METRICS, ("DINO", "CLIP-I", "CLIP-T", "CLIP-T +token"), strict=True))
CEILING_KEY = "ceiling"  # scores.json: the real photos scored against each other, when `score` writes it


@dataclass
class Shown:
    """One sample prompt on the card: a LoRA image and the base model's image for the same seed."""

    prompt: str
    seed: int
    lora: str  # path relative to the run folder (and to the card): samples/<slug>/lora-NN.png
    baseline: str | None


@dataclass
class LoraFiles:
    """The files a user loads, in the run's lora/ folder."""

    diffusers: Path
    kohya: Path | None
    embedding: Path | None
    embedding_keys: tuple[str, ...]  # the file's keys: one per text encoder (SDXL: clip_l, clip_g), or emb_params
    metadata: dict[str, str]  # the diffusers file's header (sdlora.* keys)

    def shared(self) -> list[Path]:
        return [p for p in (self.diffusers, self.kohya, self.embedding) if p is not None]


# ---- facts ----------------------------------------------------------------------------------------


def lora_files(run: RunInfo) -> LoraFiles:
    """The run's LoRA files (RunError if it has none, or one is damaged)."""
    folder = run.lora_dir(LORA_DIR)
    metadata = read_metadata(folder / DIFFUSERS_LORA, "LoRA file")
    others = sorted(p for p in folder.glob("*.safetensors") if p.name not in (DIFFUSERS_LORA, EMBEDDINGS))
    # train names the kohya file after the run folder; a renamed folder keeps its old name
    kohya = next((p for p in others if p.stem == run.name), None) or next(
        (p for p in others if read_metadata(p).get("sdlora.format") == "kohya"), others[0] if others else None
    )
    embedding = folder / EMBEDDINGS if (folder / EMBEDDINGS).is_file() else None
    keys: tuple[str, ...] = ()
    if embedding is not None:
        from safetensors import safe_open

        read_metadata(embedding, "token embedding")  # checked whole: a damaged file is an error here
        with safe_open(str(embedding), framework="pt", device="cpu") as f:
            keys = tuple(f.keys())
    return LoraFiles(folder / DIFFUSERS_LORA, kohya, embedding, keys, metadata)


def architecture(run: RunInfo, metadata: dict[str, str]) -> str | None:
    """sd1 / sdxl from the LoRA's metadata, a tiny model's name, or the base model's model_index.json
    (a local folder, or the hub's copy in the local cache); None when none of them says."""
    from sdlora.models import families

    tiny = families.tiny_family(run.model)
    arch = metadata.get("sdlora.architecture") or (tiny.name if tiny else None)
    if arch:
        return arch
    index = _cached_file(run.model, "model_index.json", run.revision)
    if index is None:
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    try:
        return families.detect_family(data).name
    except families.UnknownFamily:
        return None


def _cached_file(model: str, name: str, revision: str | None) -> Path | None:
    """`name` of a local model folder, or of a hub model already in the local cache (no download)."""
    if Path(model).is_dir():
        return Path(model) / name if (Path(model) / name).is_file() else None
    if not is_hub_id(model):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model, name, revision=revision)
    except Exception:  # a malformed id or cache: not known
        return None
    return Path(found) if isinstance(found, str) else None


def _is_tiny(model: str) -> bool:
    from sdlora.models import families

    return families.tiny_family(model) is not None


def _family(arch: str | None) -> Any:
    """The model family a LoRA records (`sdlora.architecture`), or None for an unknown one."""
    from sdlora.models import families

    return families.find_family(arch)


def is_hub_id(model: str) -> bool:
    """`org/name` (what a card's base_model may name), not a tiny model, a path or a file."""
    if _is_tiny(model) or Path(model).exists() or model.endswith((".safetensors", ".ckpt")):
        return False
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~"))


def base_license(run: RunInfo) -> str:
    """The base model's license where known (sdlora's presets, or the model's own cached card), else other."""
    from sdlora.models import families

    # The families' well-known base models; another hub model's comes from its own cached card.
    known = dict(pair for family in families.FAMILIES for pair in family.licenses)
    if run.model in known:
        return known[run.model]
    card = _cached_file(run.model, CARD, run.revision)
    if card is not None:
        from huggingface_hub import metadata_load

        try:
            license_ = (metadata_load(card) or {}).get("license")
        except Exception:  # an unreadable card: not known
            license_ = None
        if isinstance(license_, str) and license_.strip():
            return license_.strip()
    return "other"


def shown_samples(run: RunInfo, limit: int = MAX_PROMPTS) -> list[Shown]:
    """Up to `limit` prompts of samples.json, each its first LoRA image and the baseline of that seed."""
    path = run.path / SAMPLES_DIR / SAMPLES_JSON
    images = [e for e in read_samples(path, missing_ok=True)["images"] if (path.parent / e["file"]).is_file()]
    shown: list[Shown] = []
    for prompt in dict.fromkeys(e["prompt"] for e in images):
        mine = sorted((e for e in images if e["prompt"] == prompt), key=lambda e: (e["index"], e["seed"], e["file"]))
        lora = next((e for e in mine if e["variant"] == "lora"), None)
        if lora is None:
            continue
        base = next((e for e in mine if e["variant"] == "baseline" and e["seed"] == lora["seed"]), None)
        rel = f"{SAMPLES_DIR}/"
        shown.append(Shown(prompt, lora["seed"], rel + lora["file"], rel + base["file"] if base else None))
        if len(shown) == limit:
            break
    return shown


def settings(run: RunInfo, files: LoraFiles) -> list[tuple[str, str]]:
    """The training settings that matter, as (name, value) rows, from config.yaml and the LoRA's metadata."""
    cfg = run.config
    lora, train = cfg.get("lora") or {}, cfg.get("train") or {}
    data, prior, emb = cfg.get("data") or {}, cfg.get("prior") or {}, cfg.get("embedding") or {}
    meta = files.metadata
    rows: list[tuple[str, str]] = []

    def add(name: str, value: Any) -> None:
        if value is not None and value != "":
            rows.append((name, str(value)))

    steps = meta.get("sdlora.steps")
    planned = train.get("max_steps")
    add("steps", f"{steps} (of {planned} planned)" if steps and planned and str(planned) != steps else steps or planned)
    kind = lora.get("lora_type") or "lora"
    add("adapter", {"lora": "LoRA"}.get(kind, kind.upper()) + (" (DoRA)" if lora.get("dora") else ""))
    rank = lora.get("rank")
    add("rank", rank)
    add("alpha", lora.get("alpha") if lora.get("alpha") is not None else rank)
    add("target modules", ", ".join(lora.get("target_modules") or []) or None)
    add("text encoder LoRA", "yes" if lora.get("train_text_encoder") else "no")
    add("learning rate", train.get("learning_rate"))
    if train.get("text_encoder_lr") is not None and lora.get("train_text_encoder"):
        add("text encoder learning rate", train.get("text_encoder_lr"))
    add("optimizer", train.get("optimizer"))
    add("lr schedule", train.get("lr_scheduler"))
    batch, accumulation = train.get("batch_size"), train.get("gradient_accumulation")
    if batch is not None:
        add("batch", f"{batch} x {accumulation} accumulated" if accumulation and accumulation != 1 else batch)
    add("resolution", run.resolution)
    add("mixed precision", train.get("mixed_precision"))
    masked = data.get("masked_loss")
    add("masked loss", f"yes (background weight {data.get('unmasked_weight')})" if masked else "no")
    add("preservation", _preservation(prior))
    add("pivotal tuning (token embedding)", _pivotal(emb, files))
    for key, name in (("caption_dropout", "caption dropout"), ("noise_offset", "noise offset")):
        if data.get(key) or train.get(key):
            add(name, data.get(key) or train.get(key))
    add("min-SNR gamma", train.get("snr_gamma"))
    if lora.get("ema_decay"):
        add("EMA decay", lora["ema_decay"])
    add("seed", train.get("seed"))
    return rows


def _preservation(prior: dict[str, Any]) -> str:
    kind = prior.get("preservation") or "none"
    if kind == "none" and prior.get("class_prompt"):
        kind = "images"  # a class prompt alone means prior preservation
    if kind == "dop":
        return f"DOP, differential output preservation (weight {prior.get('preservation_weight')})"
    if kind == "images":
        return (
            f"prior preservation: {prior.get('num_class_images')} class images of "
            f"\u201c{prior.get('class_prompt')}\u201d (weight {prior.get('prior_loss_weight')})"
        )
    return "none"


def _pivotal(emb: dict[str, Any], files: LoraFiles) -> str:
    if files.embedding is None:
        return "no (the token is used as the tokenizer splits it)" if emb.get("train") is False else "no"
    fraction = emb.get("steps_fraction")
    share = f"{fraction:.0%}" if isinstance(fraction, (int, float)) else "part"
    return (
        f"yes: the token's own embedding, from \u201c{emb.get('init_token')}\u201d, at {emb.get('learning_rate')} "
        f"for the first {share} of the steps ({EMBEDDINGS})"
    )


# ---- the card -------------------------------------------------------------------------------------


def build_card(run: RunInfo | Path | str, repo_id: str | None = None) -> ModelCard:
    """The run's model card; `repo_id`: its code loads from that Hub repo, else from the run folder."""
    from huggingface_hub import ModelCard, ModelCardData

    run = run if isinstance(run, RunInfo) else load_run(run)
    files = lora_files(run)
    arch = architecture(run, files.metadata)
    tiny = _is_tiny(run.model)
    shown = shown_samples(run)
    scores = _scores(run)
    family = _family(arch)
    tags = ["text-to-image", "diffusers", "lora", *([family.hub_tag] if family else []), "sdlora"]
    if files.embedding is not None:
        tags.append("textual-inversion")
    data = ModelCardData(
        base_model=run.model if is_hub_id(run.model) else None,
        library_name="diffusers",
        license=base_license(run),
        pipeline_tag="text-to-image",
        tags=tags,
        instance_prompt=run.token,
        widget=[{"text": s.prompt, "output": {"url": s.lora}} for s in shown] or None,
    )
    body = "\n".join(
        part
        for part in (
            _intro(run, arch, tiny, repo_id),
            _samples_section(run, shown),
            _scores_section(scores, run),
            _settings_section(run, files),
            _diffusers_section(run, files, arch, tiny, repo_id),
            _comfy_section(run, files),
            _footer(run, files, repo_id),
        )
        if part
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_run_card(run: RunInfo | Path | str) -> Path:
    """Write the card into the run folder as README.md (atomically); its path."""
    run = run if isinstance(run, RunInfo) else load_run(run)
    path = run.path / CARD
    write_text(path, str(build_card(run)))
    return path


def _scores(run: RunInfo) -> dict[str, Any] | None:
    path = run.path / SCORES_JSON
    return read_scores(path) if path.is_file() else None


def _base_name(run: RunInfo) -> str:
    """The base model as the card names it: a hub id, or a local folder's name only (no private paths)."""
    if is_hub_id(run.model) or _is_tiny(run.model):
        return run.model
    return Path(run.model).name


def _intro(run: RunInfo, arch: str | None, tiny: bool, repo_id: str | None) -> str:
    title = repo_id.split("/")[-1] if repo_id else run.name
    known = _family(arch)
    family = known.title if known else "an unrecognised architecture"
    if tiny:
        base = (
            f"`{run.model}`, sdlora's **tiny random-weight model** ({family} architecture, built in memory for "
            "tests and first tries)"
        )
    elif is_hub_id(run.model):
        base = f"[`{run.model}`](https://huggingface.co/{run.model}) ({family})"
    else:
        base = f"a local model folder, `{_base_name(run)}` ({family})"
    lines = [
        f"# {title}",
        "",
        f"A LoRA for {base} that teaches it one object: write **`{run.token}`** in the prompt "
        f"(e.g. \u201ca photo of {run.token} {run.class_word}\u201d). Trained with sdlora.",
    ]
    if tiny:
        lines += [
            "",
            "> **Not a usable LoRA.** Its base model has random weights: the images below are noise, and any "
            "scores check the plumbing, not what the LoRA learned. Train on a real base model "
            "(`sdlora train --model stable-diffusion-v1-5/stable-diffusion-v1-5`) for a LoRA worth sharing.",
        ]
    return "\n".join(lines) + "\n"


def _samples_section(run: RunInfo, shown: list[Shown]) -> str:
    lines = ["## Samples", ""]
    if not shown:
        return (
            "\n".join(
                [
                    *lines,
                    f'No samples yet: `sdlora sample "a photo of {run.token} {run.class_word} on a beach"` makes them.',
                ]
            )
            + "\n"
        )
    lines += [
        "The same prompt and seed with the LoRA and with the base model alone (`sdlora sample`).",
        "",
        "| prompt | with the LoRA | base model |",
        "| --- | --- | --- |",
    ]
    for s in shown:
        base = f"![base model, seed {s.seed}]({quote(s.baseline)})" if s.baseline else "(not sampled)"
        lines.append(f"| {_cell(s.prompt)} (seed {s.seed}) | ![LoRA, seed {s.seed}]({quote(s.lora)}) | {base} |")
    lines += _provenance(run, run.path / SAMPLES_DIR / SAMPLES_JSON, "samples", "sdlora sample")
    return "\n".join(lines) + "\n"


def _provenance(run: RunInfo, path: Path, what: str, verb: str) -> list[str]:
    """A note when `what` (samples, scores) came from another LoRA folder (best/) or predate the LoRA."""
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("lora_dir")
        older = path.stat().st_mtime < (run.path / LORA_DIR / DIFFUSERS_LORA).stat().st_mtime
    except (OSError, ValueError, AttributeError):
        return []
    notes = []
    if recorded and Path(str(recorded)).name != LORA_DIR:
        notes.append(
            f"these {what} were made with `{Path(str(recorded)).name}/`, not the `{LORA_DIR}/` LoRA shared here"
        )
    if older:
        notes.append(f"these {what} predate the LoRA's last export (run `{verb}` again)")
    return ["", *(f"> Note: {n}." for n in notes)] if notes else []


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "\u2013"


def _scores_section(scores: dict[str, Any] | None, run: RunInfo) -> str:
    lines = ["## Scores", ""]
    if scores is None:
        return "\n".join([*lines, "Not scored yet: `sdlora score` compares the LoRA with the base model."]) + "\n"
    overall = scores.get("overall") or {}
    lora, base = overall.get("lora") or {}, overall.get("baseline") or {}
    ceiling = _ceiling(scores)
    real = scores.get("real") or {}
    scorers = scores.get("scorers") or {}
    dino, clip = scorers.get("dino") or {}, scorers.get("clip") or {}
    lines.append(
        f"Cosine similarity (1 = identical embeddings) of {lora.get('images', 0)} LoRA and {base.get('images', 0)} "
        f"base-model images to {real.get('count', '?')} real photos held out of training (DINO, CLIP-I), and to "
        f"their prompt (CLIP-T: the token removed; +token: as generated). Scorers: DINO `{dino.get('model', '?')}`, "
        f"CLIP `{clip.get('model', '?')}`" + (f" ({clip['pretrained']})" if clip.get("pretrained") else "") + "."
    )
    lines.append("")
    head = "| metric | LoRA | base model | LoRA \u2212 base |" + (" real photos (ceiling) |" if ceiling else "")
    lines += [head, "| --- | ---: | ---: | ---: |" + (" ---: |" if ceiling else "")]
    for key, label in METRIC_LABELS.items():
        a, b = lora.get(key), base.get(key)
        if a is None and b is None:
            continue
        both = all(isinstance(v, (int, float)) for v in (a, b))
        delta = f"{a - b:+.3f}" if both else "\u2013"
        extra = f" {_fmt(ceiling.get(key))} |" if ceiling else ""
        lines.append(f"| {label} | {_fmt(a)} | {_fmt(b)} | {delta} |{extra}")
    if any(str(s.get("model", "")).startswith("tiny-") for s in (dino, clip)):
        lines += ["", "> The scorers are tiny random models: these numbers check the plumbing, not the LoRA."]
    lines += _provenance(run, run.path / SCORES_JSON, "scores", "sdlora score")
    return "\n".join(lines) + "\n"


def _ceiling(scores: dict[str, Any]) -> dict[str, Any]:
    """The real photos scored against each other (what a perfect LoRA would reach), if scores.json has it."""
    ceiling = scores.get(CEILING_KEY)
    if not isinstance(ceiling, dict):
        ceiling = scores.get("real") if isinstance(scores.get("real"), dict) else {}
    return {k: ceiling[k] for k in SCORE_METRICS if isinstance(ceiling.get(k), (int, float))}


def _settings_section(run: RunInfo, files: LoraFiles) -> str:
    lines = ["## Training", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in settings(run, files)]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _diffusers_section(run: RunInfo, files: LoraFiles, arch: str | None, tiny: bool, repo_id: str | None) -> str:
    token, prompt = run.token, f"a photo of {run.token} {run.class_word} on a beach"
    lycoris = (run.config.get("lora") or {}).get("lora_type", "lora") not in ("lora", None)
    known = _family(arch)
    pipe_class = known.pipeline_classes[0] if known else "DiffusionPipeline"
    if tiny:
        load_base = [
            "from sdlora.models import load_pipeline",
            "",
            f'pipe, _ = load_pipeline("{run.model}")  # the tiny random model, built in memory',
        ]
    else:
        source = run.model if is_hub_id(run.model) else f"path/to/{_base_name(run)}"
        load_base = [
            "import torch",
            f"from diffusers import {pipe_class}",
            "",
            f'pipe = {pipe_class}.from_pretrained("{source}", torch_dtype=torch.float16).to("cuda")',
        ]
    here = f"{run.path.parent.name}/{run.name}/{LORA_DIR}"
    lines = ["## Use it with diffusers", ""]
    if lycoris:
        lines += [
            "This is a LyCORIS adapter (LoKr/LoHa): diffusers' `load_lora_weights` cannot read it. Use "
            f"`{files.kohya.name if files.kohya else 'the kohya file'}` in ComfyUI or AUTOMATIC1111 (below); "
            f"`{DIFFUSERS_LORA}` holds peft keys and the adapter config for peft.",
        ]
        return "\n".join(lines) + "\n"
    code = list(load_base)
    if repo_id:
        code.append(f'pipe.load_lora_weights("{repo_id}", weight_name="{DIFFUSERS_LORA}")')
    else:
        code.append(f'pipe.load_lora_weights("{here}")')
    if files.embedding is not None:
        imports, lines_ = _embedding_code(files, arch, token, repo_id, here)
        blank = code.index("")  # the imports end at the first blank line
        code = code[:blank] + imports + code[blank:] + lines_
    code.append(f'image = pipe("{prompt}").images[0]')
    lines += ["```python", *code, "```"]
    if files.embedding is not None:
        lines += [
            "",
            f"The LoRA was trained with `{token}`'s own embedding ({EMBEDDINGS}): load both, or the token "
            "means what the tokenizer makes of it.",
        ]
    if files.kohya is not None:
        lines += [
            "",
            f'diffusers also reads the kohya file: `load_lora_weights(..., weight_name="{files.kohya.name}")`.',
        ]
    return "\n".join(lines) + "\n"


def _embedding_code(
    files: LoraFiles, arch: str | None, token: str, repo_id: str | None, here: str
) -> tuple[list[str], list[str]]:
    """(imports, lines) that load the token's embedding: as `sdlora.generate.load_embeddings` does, one vector
    per text encoder when the architecture has several (the keys as `sdlora.lora_format.embedding_keys` names them)."""
    from sdlora.lora_format import embedding_keys

    known = _family(arch)
    keys = embedding_keys(known) if known is not None else {}
    if known is not None and len(keys) > 1 and set(keys.values()) <= set(files.embedding_keys):
        imports = ["from safetensors.torch import load_file"]
        if repo_id:
            imports.insert(0, "from huggingface_hub import hf_hub_download")
            load = f'state = load_file(hf_hub_download("{repo_id}", "{EMBEDDINGS}"))'
        else:
            load = f'state = load_file("{here}/{EMBEDDINGS}")'
        tokenizers = dict(zip(known.text_encoders, known.tokenizers))
        return imports, [load] + [
            f'pipe.load_textual_inversion(state["{key}"], token="{token}", '
            f"text_encoder=pipe.{encoder}, tokenizer=pipe.{tokenizers[encoder]})"
            for encoder, key in keys.items()
        ]
    if repo_id:
        return [], [f'pipe.load_textual_inversion("{repo_id}", weight_name="{EMBEDDINGS}", token="{token}")']
    return [], [f'pipe.load_textual_inversion("{here}/{EMBEDDINGS}", token="{token}")']


def _comfy_section(run: RunInfo, files: LoraFiles) -> str:
    token = run.token
    lines = ["## Use it in ComfyUI or AUTOMATIC1111", ""]
    if files.kohya is None:
        lines.append(
            f"This run has no kohya-format file: `{DIFFUSERS_LORA}` is for diffusers only (ComfyUI and "
            "AUTOMATIC1111 do not map its keys). Train again with sdlora to get one."
        )
        return "\n".join(lines) + "\n"
    kohya = files.kohya.name
    lines += [
        f"- **ComfyUI**: copy `{kohya}` to `ComfyUI/models/loras/` and load it with a *Load LoRA* node.",
        f"- **AUTOMATIC1111 / Forge**: copy `{kohya}` to `models/Lora/` and write `<lora:{files.kohya.stem}:1>` "
        "in the prompt.",
    ]
    if files.embedding is not None:
        lines += [
            f"- The token's embedding: `{EMBEDDINGS}` to `ComfyUI/models/embeddings/{token}.safetensors` "
            f"(write `embedding:{token}` where the token goes), or to A1111's `embeddings/{token}.safetensors` "
            f"(the file name is the trigger word: `{token}`).",
        ]
    else:
        lines.append(f"- Write `{token}` in the prompt.")
    lines.append(f"- Not `{DIFFUSERS_LORA}`: its keys are diffusers', which these programs do not map.")
    return "\n".join(lines) + "\n"


def _footer(run: RunInfo, files: LoraFiles, repo_id: str | None) -> str:
    shared = ", ".join(f"`{p.name}`" for p in files.shared())
    where = "this repo" if repo_id else f"`{LORA_DIR}/`"
    version = files.metadata.get("sdlora.version")
    made = f"sdlora {version}" if version else "sdlora"
    return f"## Files\n\n{shared} in {where}; card written by {made} from run `{run.name}`.\n"
