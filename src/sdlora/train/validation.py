"""Validation during training: the loss on the val images, sample images, DINO, and the best LoRA.

On the main process, every `--validate-every` steps and at the last step:
- `validation_loss`: mean unweighted MSE over the val images at fixed timesteps and fixed noise
  (train/data.py `validation_batches`), so values are comparable across steps and runs;
- sample images for `--validation-prompt`s with fixed seeds under `samples/step-NNNNNN/`, with a
  `validation.json` listing them (and sent to the trackers);
- DINO similarity of those samples to the val photos every `--score-every` steps;
- `best/` holds the LoRA of the lowest validation loss (or highest DINO, `--best-by dino`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from sdlora.config import Config
from sdlora.devices import free_memory
from sdlora.errors import DataError
from sdlora.prompts import fill_prompt
from sdlora.run import BEST_DIR, SAMPLES_DIR, Metric
from sdlora.train.data import Conditioning, Example, validation_batches
from sdlora.train.export import export_lora
from sdlora.train.runtime import log

if TYPE_CHECKING:
    from sdlora.train.state import TrainState


def check_scorer(cfg: Config, val_examples: Sequence[Example], accelerator: Any) -> None:
    """`--score-every`: val photos to compare with, and the DINO model loaded once now (load_dino caches it),
    so an unknown or uncached scorer fails before the base model loads, not at the first validation.
    Only the main process scores; the others keep it on the CPU."""
    if not cfg.validation.score_every:
        return
    if not val_examples:
        raise DataError(
            f"{cfg.data.dataset}: --score-every compares samples with the val photos and there are none "
            "(re-run `sdlora prepare` with --val-fraction above 0)"
        )
    from sdlora.evaluate.dino import load_dino

    load_dino(cfg.validation.dino_model, str(accelerator.device) if accelerator.is_main_process else "cpu")


@torch.no_grad()
def validate(state: TrainState) -> float | None:
    """Validation loss (fixed noise and timesteps) and sample images; keeps best/ up to date."""
    acc, cfg = state.accelerator, state.cfg
    val_loss = None
    if state.is_main:
        free_memory()  # the steps' freed activations leave the heap: validation's allocations start low
        models = [state.unwrap(m) for m in (state.unet, *state.text_encoders)]
        for model in models:
            model.eval()
        try:
            if state.val_data is not None:
                val_loss = validation_loss(state)
                log(state, {Metric.STEP: state.step, Metric.VAL_LOSS: val_loss})
            samples = sample_images(state) if cfg.validation.prompts else None
        finally:
            for model in models:
                model.train()
        dino = _dino_score(state, samples)
        lower = val_loss is not None and val_loss < state.best_val_loss
        higher = dino is not None and dino > state.best_dino
        if lower:
            state.best_val_loss = val_loss  # type: ignore[assignment]
        if higher:
            state.best_dino = dino  # type: ignore[assignment]
        best = higher if cfg.validation.best_by == "dino" else lower
        if best:
            export_lora(state, state.run_dir / BEST_DIR, main_only=True)
        state.emit(
            {
                "event": "validation",
                "step": state.step,
                "val_loss": val_loss,
                "dino": dino,
                "best": best,
                "samples_dir": str(samples) if samples else None,
            }
        )
    acc.wait_for_everyone()
    return val_loss


def _dino_score(state: TrainState, samples: Path | None) -> float | None:
    """DINO of this validation's sample images vs the val photos, on --score-every steps (and the last)."""
    every = state.cfg.validation.score_every
    if not every or samples is None or not (state.step % every == 0 or state.step == state.cfg.train.max_steps):
        return None
    from sdlora.evaluate.score import EMBEDDINGS_CACHE, dino_similarity_to_val

    listed = json.loads((samples / "validation.json").read_text(encoding="utf-8"))["images"]
    images = [samples / entry["file"] for entry in listed]  # this validation's images, not older leftovers
    dino = dino_similarity_to_val(
        images,
        Path(state.cfg.data.dataset),
        dino_model=state.cfg.validation.dino_model,
        device=str(state.device),
        cache_dir=state.run_dir / EMBEDDINGS_CACHE,
    )
    log(state, {Metric.STEP: state.step, Metric.DINO: dino})
    return dino


def validation_loss(state: TrainState) -> float:
    """Mean unweighted MSE over the val images at fixed timesteps and noise (no gradient)."""
    unet = state.unwrap(state.unet)
    total, count = 0.0, 0
    assert state.val_data is not None
    batches = validation_batches(
        state.val_data,
        seed=state.cfg.validation.seed,
        timesteps=state.objective.validation_timesteps(state.cfg.validation.loss_timesteps),
        batch_size=max(4, state.cfg.train.batch_size),
    )
    device, objective = state.device, state.objective
    for batch in batches:
        latents, noise, t = batch.latents.to(device), batch.noise.to(device), batch.timesteps.to(device)
        embeds, pooled = _eval_condition(state, batch.cond)
        with state.accelerator.autocast():
            noisy = objective.noisy_input(latents, noise, t)
            timesteps, time_ids = objective.model_timesteps(t), batch.time_ids.to(device)
            pred = state.arch.denoise(unet, noisy, timesteps, embeds, pooled, time_ids)
        target = objective.target(latents, noise, t)
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        total += per_sample.sum().item()
        count += per_sample.numel()
    return total / max(1, count)


def _eval_condition(state: TrainState, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompt embeddings of a val batch: cached, or from the (unwrapped) live text encoders."""
    if cond.embeds is not None:
        return cond.cached_on(state.device)
    encoders = [state.unwrap(e) for e in state.live_text_encoders]
    with state.accelerator.autocast():
        return state.arch.encode_tokens(encoders, [ids.to(state.device) for ids in cond.token_ids])  # type: ignore[union-attr]


def sample_images(state: TrainState) -> Path:
    """Sample images for the validation prompts, fixed seeds, under samples/step-NNNNNN/."""
    from sdlora.fsutil import atomic_path, write_json

    cfg, pipe, device = state.cfg, state.pipe, state.device
    folder = state.run_dir / SAMPLES_DIR / f"step-{state.step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    reloaded = pipe.vae is None  # released after encoding (train/encode.py): back only while sampling
    if reloaded:
        from sdlora.train.encode import vae_dtype
        from sdlora.train.lora import reload_vae

        pipe.vae = reload_vae(cfg, vae_dtype(cfg, state.weight_dtype))  # the dtype encoding used
    pipe.vae.to(device)
    entries = []
    try:
        for i, prompt in enumerate(cfg.validation.prompts):
            text = fill_prompt(prompt, str(cfg.data.token), str(cfg.data.class_word))
            if state.sample_conds is not None:  # cached embeddings: the text encoders are gone
                kwargs = state.arch.prompt_embeds_kwargs(pipe, state.sample_conds[i], state.negative_cond, device)  # type: ignore[arg-type]
            else:
                kwargs = {"prompt": text, **state.arch.prompt_kwargs(pipe)}
            for k in range(cfg.validation.num_images):
                seed = cfg.validation.seed + k
                with state.accelerator.autocast():
                    image = pipe(
                        num_inference_steps=cfg.validation.steps,
                        guidance_scale=cfg.validation.guidance,
                        height=cfg.data.resolution,
                        width=cfg.data.resolution,
                        generator=torch.Generator("cpu").manual_seed(seed),
                        **kwargs,
                    ).images[0]
                name = f"{i:02d}-{k:02d}.png"
                with atomic_path(folder / name) as tmp:
                    image.save(tmp, format="PNG")
                entries.append(
                    {"file": name, "prompt": text, "prompt_as_written": prompt, "seed": seed, "step": state.step}
                )
    finally:
        if reloaded:
            pipe.vae = None
            free_memory()
        else:
            pipe.vae.to("cpu")
    write_json(
        folder / "validation.json",
        {"step": state.step, "steps": cfg.validation.steps, "guidance": cfg.validation.guidance, "images": entries},
    )
    if cfg.logging.report_to != "none":
        _log_images(state, folder, entries)
    return folder


def _log_images(state: TrainState, folder: Path, entries: list[dict[str, Any]]) -> None:
    """The sample images to the trackers (tensorboard, wandb, clearml), one series per prompt."""
    import numpy as np
    from PIL import Image

    by_prompt: dict[str, list[np.ndarray]] = {}
    for entry in entries:
        with Image.open(folder / entry["file"]) as img:
            by_prompt.setdefault(f"samples/{entry['prompt']}", []).append(np.asarray(img.convert("RGB")))
    for tracker in state.accelerator.trackers:
        try:
            if tracker.name == "tensorboard":
                tracker.log_images({k: np.stack(v) for k, v in by_prompt.items()}, step=state.step, dataformats="NHWC")
            elif tracker.name == "clearml":
                for k, v in by_prompt.items():
                    tracker.log_images({k: v[0]}, step=state.step)
            else:
                tracker.log_images(by_prompt, step=state.step)
        except Exception as exc:  # a tracker's hiccup must not stop training
            state.emit({"event": "warning", "message": f"could not send sample images to {tracker.name}: {exc}"})
