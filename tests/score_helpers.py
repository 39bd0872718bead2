"""Fixtures for the score tests: a run folder following the contract, with samples.json + PNGs.

Written with random PNGs through the run-folder contract (`sdlora.run.write_samples`, the prompts
expanded by the sampler's own `expand_prompt`), so the scorer is tested without sampling.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import yaml

from conftest import write_tiny_dataset
from run_helpers import random_png
from sdlora.generate import expand_prompt
from sdlora.run import DIFFUSERS_LORA, read_samples, write_samples


def slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")


def write_run(root: Path, *, n_dataset: int = 10, val: bool = True, lora: bool = True, **config) -> Path:
    """runs/r1 with config.yaml (tiny-sd), a LoRA file and a 64 px dataset (val photos unless val=False)."""
    dataset = write_tiny_dataset(root / "dataset", n=n_dataset)
    if not val:
        manifest = json.loads((dataset / "manifest.json").read_text())
        manifest["train"] += manifest["val"]
        manifest["val"] = []
        (dataset / "manifest.json").write_text(json.dumps(manifest))
    run = root / "runs" / "r1"
    run.mkdir(parents=True)
    cfg = {
        "model": {"name": "tiny-sd"},
        "data": {"dataset": str(dataset), "token": "sksToy", "class_word": "toy", "resolution": 64},
        **config,
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if lora:
        # score only checks that the LoRA exists; sampling (not tested here) loads it.
        (run / "lora").mkdir()
        (run / "lora" / DIFFUSERS_LORA).write_bytes(b"lora placeholder")
    return run


def add_samples(
    samples_dir: Path,
    prompts: Sequence[str],
    *,
    per_variant: int = 2,
    seed0: int = 0,
    token: str = "sksToy",
    class_word: str = "toy",
) -> list[dict]:
    """Write PNGs for each prompt (LoRA + baseline) and merge their entries into samples.json."""
    path = samples_dir / "samples.json"
    data = (
        read_samples(path)
        if path.is_file()
        else {
            "model": "tiny-sd",
            "run": str(samples_dir.parent),
            "lora_dir": str(samples_dir.parent / "lora"),
            "lora_scale": 1.0,
            "steps": 2,
            "guidance": 7.5,
            "scheduler": "EulerDiscreteScheduler",
            "height": 64,
            "width": 64,
            "negative_prompt": None,
            "images": [],
        }
    )
    new = []
    for p, written in enumerate(prompts):
        prompt = expand_prompt(written, token, class_word)
        for variant, stem in (("lora", "lora"), ("baseline", "base")):  # same seeds, different images
            for i in range(per_variant):
                file = f"{slug(prompt)}/{stem}-{i:02d}.png"
                random_png(samples_dir / file, seed=seed0 * 10_000 + p * 100 + (variant == "lora") * 50 + i)
                new.append(
                    {
                        "file": file,
                        "prompt": prompt,
                        "prompt_as_written": written,
                        "seed": seed0 + i,
                        "variant": variant,
                        "index": i,
                    }
                )
    files = {e["file"] for e in new}
    data["images"] = [e for e in data["images"] if e["file"] not in files] + new
    write_samples(path, data)
    return new


def write_real_lora(run: Path, model: str = "tiny-sd") -> None:
    """A real (random) UNet LoRA for a tiny model, saved by diffusers' own save_lora_weights."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdlora.models import load_pipeline

    pipe, _ = load_pipeline(model)
    torch.manual_seed(0)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(run / "lora", unet_lora_layers=layers)
