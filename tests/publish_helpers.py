"""A run folder for the card and push tests, made in milliseconds: config.yaml (run_helpers.write_config),
LoRA files that are small safetensors with the headers `train` writes (the card reads headers only),
and optionally samples.json with PNGs and scores.json, written through the contract's writers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from run_helpers import random_png, write_config
from sdlora.run import DIFFUSERS_LORA, EMBEDDINGS, point_latest, write_samples, write_scores

PROMPTS = ["a photo of sksToy toy on a beach", "a red sksToy toy", "sksToy toy in the snow"]
EMBEDDING_KEYS = {"sd1": ("emb_params",), "sdxl": ("clip_l", "clip_g")}


def lora_metadata(model: str, arch: str, steps: int = 40) -> dict[str, str]:
    return {
        "sdlora.version": "0.1.0",
        "sdlora.base_model": model,
        "sdlora.architecture": arch,
        "sdlora.rank": "4",
        "sdlora.alpha": "8",
        "sdlora.token": "sksToy",
        "sdlora.steps": str(steps),
    }


def fake_run(
    root: Path,
    *,
    name: str = "r1",
    model: str = "tiny-sd",
    arch: str | None = None,
    embedding: bool = True,
    kohya: bool = True,
    samples: bool = False,
    scores: bool = False,
    **config: Any,
) -> Path:
    """root/runs/<name> with config.yaml and lora/ (diffusers file, kohya file, embedding); runs/latest -> it."""
    sections = {
        "lora": {"rank": 4, "alpha": 8.0, "target_modules": ["to_q", "to_v"], "lora_type": "lora", "dora": False},
        "train": {"max_steps": 50, "learning_rate": 1e-4, "optimizer": "adamw", "batch_size": 1, "seed": 0},
        "prior": {"preservation": "dop", "preservation_weight": 1.0},
        "embedding": {"train": embedding, "init_token": "toy", "learning_rate": 5e-3, "steps_fraction": 0.5},
        **config,
    }
    run = write_config(root / "runs" / name, model=model, **sections)
    lora = run / "lora"
    lora.mkdir()
    arch = arch or ("sdxl" if model == "tiny-sdxl" else "sd1")
    meta = lora_metadata(model, arch)
    save_file({"w": torch.zeros(8)}, str(lora / DIFFUSERS_LORA), metadata={**meta, "sdlora.format": "diffusers"})
    if kohya:
        save_file({"k": torch.ones(8)}, str(lora / f"{name}.safetensors"), metadata={**meta, "sdlora.format": "kohya"})
    if embedding:
        save_file({k: torch.ones(1, 32) for k in EMBEDDING_KEYS[arch]}, str(lora / EMBEDDINGS), metadata=meta)
    if samples:
        add_samples(run)
    if scores:
        add_scores(run)
    point_latest(run)
    return run


def add_samples(run: Path, prompts: list[str] = PROMPTS, per_variant: int = 2) -> Path:
    images = []
    for p, prompt in enumerate(prompts):
        for variant, stem in (("lora", "lora"), ("baseline", "base")):
            for i in range(per_variant):
                file = f"p{p}/{stem}-{i:02d}.png"
                random_png(run / "samples" / file, seed=p * 100 + i, size=32)
                images.append({"file": file, "prompt": prompt, "seed": 7 + i, "variant": variant, "index": i})
    data = {"model": "tiny-sd", "lora_dir": str(run / "lora"), "steps": 2, "images": images}
    return write_samples(run / "samples" / "samples.json", data)


def scores_entry(dino: float, clip_i: float, clip_t: float, images: int = 4) -> dict[str, Any]:
    return {
        "images": images,
        "real_images": 3,
        "dino": dino,
        "clip_i": clip_i,
        "clip_t": clip_t,
        "clip_t_with_token": 0.3,
    }


def add_scores(run: Path, **extra: Any) -> Path:
    data = {
        "schema_version": 1,
        "lora_dir": str(run / "lora"),
        "scorers": {"dino": {"model": "facebook/dino-vits16"}, "clip": {"model": "ViT-B-32", "pretrained": "openai"}},
        "real": {"dataset": "dataset", "split": "val", "count": 3, "files": ["a.png", "b.png", "c.png"]},
        "overall": {"lora": scores_entry(0.6123, 0.7011, 0.2811), "baseline": scores_entry(0.3456, 0.5522, 0.2907)},
        "prompts": [],
        **extra,
    }
    return write_scores(run / "scores.json", data)
