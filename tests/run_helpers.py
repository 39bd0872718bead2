"""Run-folder fixtures following the contract in sdlora/run.py, made without `sdlora train`.

`make_run` writes config.yaml and a real LoRA for a tiny model, saved by diffusers' own
`save_lora_weights` (so loading it tests our sampler, not our exporter); `write_metrics`
writes a metrics.jsonl shaped like the training loop's; `write_validation_samples` a
samples/step-NNNNNN/ folder with validation.json. Reusable by any test that needs a run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from sdlora.run import CONFIG, DIFFUSERS_LORA, EMBEDDINGS, LORA_DIR, METRICS, SAMPLES_DIR, Metric

TOKEN, CLASS_WORD = "sksToy", "toy"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def write_config(
    run: Path, *, model: str = "tiny-sd", dataset: Path | None = None, resolution: int = 64, **sections: Any
) -> Path:
    """run/config.yaml with the sections later stages read (plus any extra `sections`)."""
    run.mkdir(parents=True, exist_ok=True)
    config = {
        "model": {"name": model, "revision": None, "variant": None, "vae": None},
        "data": {
            "dataset": str(dataset or run.parent.parent / "dataset"),
            "resolution": resolution,
            "token": TOKEN,
            "class_word": CLASS_WORD,
        },
        "lora": {"rank": 4, "alpha": 4},
        **sections,
    }
    (run / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return run


def save_random_lora(folder: Path, model: str = "tiny-sd", *, rank: int = 4, seed: int = 0, std: float = 0.5) -> Path:
    """A UNet LoRA with nonzero random lora_B (so it changes the images), saved diffusers-style."""
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sdlora.models import load_pipeline

    pipe, _ = load_pipeline(model)
    with torch.random.fork_rng(devices=[]):  # the same LoRA for a seed (lora_A's init draws from torch's RNG)
        torch.manual_seed(seed)
        pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers)
    return folder / DIFFUSERS_LORA


def save_embedding(folder: Path, model: str = "tiny-sd", *, vectors: int = 1, seed: int = 0) -> Path:
    """A textual-inversion embedding for the token beside the LoRA (SDXL: clip_l + clip_g)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    if model == "tiny-sdxl":
        state = {
            "clip_l": torch.randn(vectors, 32, generator=generator),
            "clip_g": torch.randn(vectors, 32, generator=generator),
        }
    else:
        state = {"emb_params": torch.randn(vectors, 32, generator=generator)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / EMBEDDINGS))
    return folder / EMBEDDINGS


def make_run(
    root: Path, *, name: str = "r1", model: str = "tiny-sd", lora: bool = True, best: bool = False, **config: Any
) -> Path:
    """root/runs/<name>: config.yaml, lora/ (and best/) with a real random LoRA, runs/latest -> it."""
    from sdlora.run import point_latest

    run = write_config(root / "runs" / name, model=model, **config)
    if lora:
        save_random_lora(run / LORA_DIR, model)
    if best:
        save_random_lora(run / "best", model, seed=1)
    point_latest(run)
    return run


def write_metrics(
    run: Path,
    *,
    steps: int = 40,
    validate_every: int = 10,
    groups: tuple[str, ...] = ("unet",),
    cuda: bool = False,
    log_every: int = 1,
) -> Path:
    """metrics.jsonl as the training loop writes it: step records (loss, running mean, grad norms per
    group, learning rates, machine load) and validation records (val_loss)."""
    rng = np.random.default_rng(0)
    lines = []
    mean = None
    for step in range(1, steps + 1):
        loss = 0.3 * math.exp(-step / 15) + 0.05 + float(rng.normal(0, 0.02))
        mean = loss if mean is None else 0.9 * mean + 0.1 * loss
        record: dict[str, Any] = {Metric.STEP: step, Metric.LOSS: loss, Metric.LOSS_MEAN: mean}
        for g, group in enumerate(groups):
            record[Metric.grad_norm(group)] = 0.5 / (1 + g) + float(rng.random()) * 0.1
        record[Metric.GRAD_NORM_TOTAL] = math.sqrt(sum(record[Metric.grad_norm(g)] ** 2 for g in groups))
        lr = 1e-4 * min(1.0, step / 5)
        for group in groups:
            record[Metric.lr(group)] = lr if group == "unet" else lr / 2
        if "embeddings" in groups:  # the token's own embedding: its norm grows, then freezes halfway
            record[Metric.embedding_norm("text_encoder")] = 0.4 + 0.01 * min(step, steps // 2)
        record.update({Metric.STEP_TIME: 0.2, Metric.IMAGES_PER_S: 5.0, Metric.EPOCH: step // 10})
        if step % log_every == 0:
            record.update(cpu_percent=150 + float(rng.normal(0, 10)), system_cpu_percent=80.0)
            record[Metric.RSS_GB] = 2.0 + step / 100
            if cuda:
                record[Metric.CUDA_PREFIX + "allocated_gb"] = 3.0
                record[Metric.CUDA_PEAK_GB] = 3.5 + step / 400
        lines.append(record)
        if step % validate_every == 0:
            lines.append({Metric.STEP: step, Metric.VAL_LOSS: 0.2 * math.exp(-step / 20) + 0.08})
    path = run / METRICS
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return path


def random_png(path: Path, seed: int, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def write_validation_samples(run: Path, step: int, prompts: list[str], num_images: int = 2, size: int = 64) -> Path:
    """samples/step-NNNNNN/ with PNGs and validation.json, as the training loop writes them."""
    folder = run / SAMPLES_DIR / f"step-{step:06d}"
    entries = []
    for i, prompt in enumerate(prompts):
        for k in range(num_images):
            name = f"{i:02d}-{k:02d}.png"
            random_png(folder / name, seed=step * 100 + i * 10 + k, size=size)
            entries.append({"file": name, "prompt": prompt, "prompt_as_written": prompt, "seed": k, "step": step})
    (folder / "validation.json").write_text(json.dumps({"step": step, "steps": 2, "guidance": 7.5, "images": entries}))
    return folder
