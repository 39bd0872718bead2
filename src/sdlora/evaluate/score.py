"""`sdlora score`: DINO, CLIP-I and CLIP-T of generated images, the DreamBooth paper's way.

For each prompt and for the LoRA and the baseline (the base model alone, same seeds):
  DINO    mean cosine similarity over all (generated, real val photo) pairs of DINO embeddings
  CLIP-I  the same with CLIP image embeddings
  CLIP-T  mean cosine between each image and its prompt's CLIP text embedding, with the token
          removed from the prompt ("a sksToy toy on a beach" -> "a toy on a beach"), and also
          with the prompt as generated (`clip_t_with_token`)
The overall figures pool every image of a variant (= the mean of the per-image figures).
Cosines are reported as they are (range -1..1; 1 = the same embedding), not rescaled.

Images come from samples.json (`sdlora sample` writes it); this module never samples: a wanted
prompt without images is an error naming the command, and `sdlora score` runs that first.

Writes scores.json through `sdlora.run.write_scores` (its fields are listed in `sdlora.run`): the
figures per prompt and overall for both variants, the scorers' models, revisions and exact
preprocessing, the real photos compared against, and how many images were embedded or cached.
"""

from __future__ import annotations

import datetime
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sdlora.data.manifest import IMAGES, load_manifest
from sdlora.errors import ConfigError, DataError, RunError
from sdlora.evaluate.cache import EmbeddingCache
from sdlora.evaluate.clip import DEFAULT_CLIP, DEFAULT_PRETRAINED, load_clip
from sdlora.evaluate.dino import DEFAULT_DINO, load_dino
from sdlora.evaluate.paper_prompts import IMAGES_PER_PROMPT, object_prompts
from sdlora.events import ProgressFn
from sdlora.fsutil import sha256_file
from sdlora.locks import folder_lock
from sdlora.prompts import DEFAULT_PROMPT, expand_prompt, fill_prompt
from sdlora.run import (
    SAMPLES_DIR,
    SAMPLES_JSON,
    SCORES_JSON,
    SCORES_SCHEMA_VERSION,
    VARIANTS,
    RunInfo,
    read_samples,
    write_scores,
)

SCALE = (
    "cosine similarity reported as is (range -1..1, in practice 0..1; 1 = identical embeddings); "
    "DINO and CLIP-I: mean over all (generated, real val photo) pairs; CLIP-T: mean over images "
    "of cos(image, prompt text)"
)
EMBEDDINGS_CACHE = Path(".cache") / "embeddings"
DREAMBENCH = "dreambench"


def remove_token(prompt: str, token: str) -> str:
    """The prompt without the identifier token, whitespace tidied: CLIP-T's text (the paper's way)."""
    text = re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    return " ".join(text.split()).strip(" ,;:")


def pairwise_mean(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Mean cosine similarity over all pairs (row of a, row of b)."""
    a = _unit(np.asarray(a, dtype=np.float64))
    b = _unit(np.asarray(b, dtype=np.float64))
    return float((a @ b.T).mean())


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)


@dataclass
class Sample:
    file: Path
    prompt: str
    variant: str
    prompt_as_written: str | None = None
    lora_file: str | None = None  # the LoRA file a "lora" image was sampled with (absent from older samples.json)


# ---- inputs ---------------------------------------------------------------------------------


def val_photos(dataset: Path) -> list[Path]:
    """The dataset's real val photos (the manifest's val list); DataError if there are none."""
    manifest = load_manifest(dataset)
    if not manifest.val:
        raise DataError(
            f"{Path(dataset) / 'manifest.json'}: no val images to compare against "
            f"(prepare the dataset again with --val-fraction above 0)"
        )
    paths = [Path(dataset) / IMAGES / name for name in manifest.val]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]}: val image listed in manifest.json is missing "
            f"({len(missing)} of {len(paths)} missing; run `sdlora prepare` again)"
        )
    return paths


def load_samples(samples_json: Path) -> list[Sample]:
    """The images listed in samples.json (`sdlora.run.read_samples`); RunError if one is missing."""
    folder = Path(samples_json).parent
    samples = [
        Sample(folder / e["file"], e["prompt"], e["variant"], e.get("prompt_as_written"), e.get("lora_file"))
        for e in read_samples(samples_json)["images"]
    ]
    for sample in samples:
        if not sample.file.is_file():
            raise RunError(f"{sample.file}: listed in {samples_json} but missing (run `sdlora sample` again)")
    return samples


def default_prompts(run: RunInfo) -> list[str]:
    """The run's validation prompts (config.yaml validation.prompts), token and class filled in."""
    prompts = (run.config.get("validation") or {}).get("prompts") or [DEFAULT_PROMPT]
    return [fill_prompt(p, run.token, run.class_word) for p in prompts]


def resolve_prompts(prompts: Sequence[str] | None, run: RunInfo) -> list[str] | None:
    """`--prompts` values: prompts as written, or `dreambench` for the paper's 25 object prompts."""
    if prompts is None:
        return None
    resolved: list[str] = []
    for prompt in prompts:
        if not prompt.strip():
            raise ConfigError("--prompts: empty prompt; give a prompt such as 'sksToy on a beach' or 'dreambench'")
        if prompt.strip() == DREAMBENCH:
            resolved += object_prompts(run.token, run.class_word)
        else:
            resolved.append(prompt.strip())
    if not resolved:
        raise ConfigError("--prompts: no prompts given")
    return list(dict.fromkeys(resolved))


@dataclass
class ScorePlan:
    """What `score` will score: every image in `samples_json` (wanted None), or the images of the
    `wanted` prompts, each of which needs `min_images` per variant (the paper's 4 for dreambench)."""

    samples_json: Path
    wanted: list[str] | None
    prompt_set: str
    min_images: int


def plan_scoring(
    run: RunInfo,
    prompts: Sequence[str] | None = None,
    samples_json: Path | None = None,
    num_images: int = IMAGES_PER_PROMPT,
) -> ScorePlan:
    """Which samples and prompts to score. Default: every image in samples.json, or the run's
    validation prompts when it has none yet; `dreambench` prompts need `num_images` images each."""
    wanted = resolve_prompts(prompts, run)
    dreambench = prompts is not None and DREAMBENCH in [p.strip() for p in prompts]
    prompt_set = DREAMBENCH if dreambench else ("given" if prompts is not None else "all samples")
    if samples_json is None:
        samples_json = run.path / SAMPLES_DIR / SAMPLES_JSON
        if wanted is None and not samples_json.is_file():
            wanted, prompt_set = default_prompts(run), "validation prompts"  # a fresh run
    return ScorePlan(Path(samples_json), wanted, prompt_set, num_images if dreambench else 1)


def _matches(sample: Sample, prompt: str, run: RunInfo) -> bool:
    """Whether `sample` was made for `prompt` (as written, or as `sdlora sample` expanded it)."""
    if prompt in (sample.prompt, sample.prompt_as_written):
        return True
    return sample.prompt == expand_prompt(prompt, run.token, run.class_word)


def missing_prompts(run: RunInfo, plan: ScorePlan) -> list[str]:
    """The wanted prompts with fewer than `plan.min_images` LoRA or baseline images in samples.json."""
    if plan.wanted is None:
        return []
    existing = load_samples(plan.samples_json) if plan.samples_json.is_file() else []
    missing = []
    for prompt in plan.wanted:
        mine = [s for s in existing if _matches(s, prompt, run)]
        if any(sum(s.variant == v for s in mine) < plan.min_images for v in VARIANTS):
            missing.append(prompt)
    return missing


# ---- embedding ------------------------------------------------------------------------------


def _open_rgb(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from exc


def embed_files(
    scorer: Any,
    paths: Sequence[Path],
    digests: Sequence[str],
    cache: EmbeddingCache,
    *,
    batch_size: int = 32,
    on_progress: ProgressFn | None = None,
) -> tuple[torch.Tensor, int]:
    """Embeddings of `paths` (rows in order), embedding only files whose sha256 is not cached.

    Returns (embeddings, number of images embedded now). Each distinct file is embedded once.
    """
    todo = {d: p for p, d in zip(paths, digests) if d not in cache}
    items = list(todo.items())
    label = f"embedding images ({scorer.kind})"
    if on_progress and items:
        on_progress(label, 0, len(items))
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        vectors = scorer.embed([_open_rgb(p) for _, p in batch])
        for (digest, _), vector in zip(batch, vectors):
            cache.put(digest, vector)
        if on_progress:
            on_progress(label, min(start + batch_size, len(items)), len(items))
    cache.save()
    return cache.stack(list(digests)), len(items)


def _scorer_cache(scorer: Any, folder: Path | None) -> EmbeddingCache:
    return EmbeddingCache(folder, scorer.key, {k: str(v) for k, v in scorer.info().items()})


# ---- scoring --------------------------------------------------------------------------------


def _variant_scores(
    idx: list[int],
    emb: dict[str, torch.Tensor],
    real: dict[str, torch.Tensor],
    text_cos: dict[str, np.ndarray],
    n_real: int,
) -> dict[str, Any] | None:
    """The four figures over the generated images `idx` (None when there are none)."""
    if not idx:
        return None
    return {
        "images": len(idx),
        "real_images": n_real,
        "dino": pairwise_mean(emb["dino"][idx], real["dino"]),
        "clip_i": pairwise_mean(emb["clip"][idx], real["clip"]),
        "clip_t": float(np.mean(text_cos["clip_t"][idx])),
        "clip_t_with_token": float(np.mean(text_cos["clip_t_with_token"][idx])),
    }


def score_samples(
    samples: list[Sample],
    real_paths: list[Path],
    *,
    token: str,
    dino: Any,
    clip: Any,
    cache_dir: Path | None,
    batch_size: int = 32,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Per-prompt and overall scores of `samples` against `real_paths` (no files written except the cache)."""
    paths = [s.file for s in samples]
    all_paths = paths + list(real_paths)
    digests = []
    for i, path in enumerate(all_paths):
        digests.append(sha256_file(path))
        if on_progress:
            on_progress("hashing images", i + 1, len(all_paths))
    n = len(paths)
    emb, real, embedded = {}, {}, {}
    for scorer in (dino, clip):
        cache = _scorer_cache(scorer, cache_dir)
        vectors, embedded[scorer.kind] = embed_files(
            scorer, all_paths, digests, cache, batch_size=batch_size, on_progress=on_progress
        )
        emb[scorer.kind], real[scorer.kind] = vectors[:n], vectors[n:]
    prompts = list(dict.fromkeys(s.prompt for s in samples))
    texts = {"clip_t": [remove_token(p, token) for p in prompts], "clip_t_with_token": prompts}
    # cos(image, its prompt's text) per image: row i of the image embeddings against its prompt's row
    image_emb = _unit(emb["clip"].numpy().astype(np.float64))
    prompt_row = np.array([prompts.index(s.prompt) for s in samples])
    text_cos: dict[str, np.ndarray] = {}
    for name, prompt_texts in texts.items():
        text_emb = _unit(clip.embed_text(prompt_texts).numpy().astype(np.float64))
        text_cos[name] = np.einsum("ij,ij->i", image_emb, text_emb[prompt_row])

    def rows(prompt: str | None, variant: str) -> list[int]:
        return [i for i, s in enumerate(samples) if s.variant == variant and (prompt is None or s.prompt == prompt)]

    per_prompt = []
    for prompt, without in zip(prompts, texts["clip_t"]):
        written = next((s.prompt_as_written for s in samples if s.prompt == prompt and s.prompt_as_written), None)
        entry: dict[str, Any] = {"prompt": prompt, "prompt_as_written": written, "prompt_without_token": without}
        for variant in VARIANTS:
            entry[variant] = _variant_scores(rows(prompt, variant), emb, real, text_cos, len(real_paths))
        per_prompt.append(entry)
    overall = {v: _variant_scores(rows(None, v), emb, real, text_cos, len(real_paths)) for v in VARIANTS}
    for variant in VARIANTS:
        if overall[variant] is not None:
            overall[variant]["prompts"] = sum(1 for e in per_prompt if e[variant] is not None)
    return {
        "overall": overall,
        "prompts": per_prompt,
        "embedded": embedded,
        "cached": {kind: len(set(digests)) - count for kind, count in embedded.items()},
    }


def score_run(
    run: RunInfo,
    *,
    samples_json: Path | None = None,
    prompts: Sequence[str] | None = None,
    dino_model: str = DEFAULT_DINO,
    clip_model: str = DEFAULT_CLIP,
    clip_pretrained: str | None = DEFAULT_PRETRAINED,
    device: str | None = None,
    batch_size: int = 32,
    num_images: int = IMAGES_PER_PROMPT,
    plan: ScorePlan | None = None,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Score a run's samples and write scores.json; the images must exist (`sdlora sample` makes them).

    `prompts`: score only these; `dreambench` stands for the paper's 25 object prompts, `num_images`
    images each. Default: every image in samples.json, or the run's validation prompts when there is
    none. A wanted prompt without images is a RunError naming the `sdlora sample` command to run.
    `plan` (from `plan_scoring`) replaces samples_json / prompts / num_images.
    """
    plan = plan or plan_scoring(run, prompts, samples_json, num_images)
    lora_dir = run.lora_dir()  # RunError for a run without a LoRA
    # The val photos are read under the dataset's shared lock: `prepare` does not rewrite them meanwhile.
    with folder_lock(run.dataset, "score", shared=True):
        real_paths = val_photos(run.dataset)
        dino = load_dino(dino_model, device)
        clip = load_clip(clip_model, clip_pretrained, device)
        missing = missing_prompts(run, plan)
        if missing:
            quoted = " ".join(shlex.quote(p) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise RunError(
                f"{plan.samples_json}: no samples for {len(missing)} prompt(s); run "
                f"`sdlora sample --run {shlex.quote(str(run.path))} --num-images {plan.min_images} {quoted}` first"
            )
        samples = load_samples(plan.samples_json)
        if plan.wanted is not None:
            samples = [s for s in samples if any(_matches(s, p, run) for p in plan.wanted)]
        if not samples:
            raise RunError(f"{plan.samples_json}: no images to score (generate some with `sdlora sample PROMPT`)")
        result = score_samples(
            samples,
            real_paths,
            token=run.token,
            dino=dino,
            clip=clip,
            cache_dir=run.path / EMBEDDINGS_CACHE,
            batch_size=batch_size,
            on_progress=on_progress,
        )
    scores = {
        "schema_version": SCORES_SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run": str(run.path),
        "samples": str(plan.samples_json),
        "lora_dir": str(lora_dir),
        # the files the scored LoRA images were sampled with (`sample --lora FILE` may name another)
        "lora_files": sorted({s.lora_file for s in samples if s.variant == "lora" and s.lora_file}),
        "token": run.token,
        "class_word": run.class_word,
        "prompt_set": plan.prompt_set,
        "scale": SCALE,
        "scorers": {"dino": dino.info(), "clip": clip.info()},
        "real": {
            "dataset": str(run.dataset),
            "split": "val",
            "count": len(real_paths),
            "files": [p.name for p in real_paths],
        },
        **result,
    }
    write_scores(run.path / SCORES_JSON, scores)
    return scores


def dino_similarity_to_val(
    images: Sequence[Any],
    dataset: Path,
    *,
    dino_model: str = DEFAULT_DINO,
    device: str | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 32,
) -> float:
    """Mean pairwise DINO cosine of `images` (PIL images or paths) vs the dataset's val photos.

    For `train --score-every`: val embeddings are cached by file hash in `cache_dir` if given.
    """
    if not images:
        raise ConfigError("dino_similarity_to_val: no images to score")
    real_paths = val_photos(dataset)
    scorer = load_dino(dino_model, device)
    real, _ = embed_files(
        scorer,
        real_paths,
        [sha256_file(p) for p in real_paths],
        _scorer_cache(scorer, cache_dir),
        batch_size=batch_size,
    )
    pil = [_open_rgb(Path(im)) if isinstance(im, (str, Path)) else im.convert("RGB") for im in images]
    generated = torch.cat([scorer.embed(pil[i : i + batch_size]) for i in range(0, len(pil), batch_size)])
    return pairwise_mean(generated, real)
