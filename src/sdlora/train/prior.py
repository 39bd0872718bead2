"""Class images for prior preservation, generated with the base model once and cached.

DreamBooth's prior-preservation loss trains on images of the plain class ("a photo of a toy")
made by the base model itself, so the LoRA learns the object without forgetting the class.
Image `i` is generated from seed `seed + i`, so it is the same image whether it is made
alone or in a batch, in this run or a later one. Files are named from a key of (model,
prompt, resolution, seed) and the index: a second call with the same settings finds them
all and generates nothing, and changing the prompt never reuses images of another prompt.
Images a user put in the folder themselves (any other image file) are used first, as in
diffusers' DreamBooth script.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch

from sdlora.errors import ConfigError
from sdlora.events import ProgressFn
from sdlora.fsutil import atomic_path
from sdlora.models.families import Family

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
_GENERATED = re.compile(r"^class-[0-9a-f]{10}-\d{4}\.png$")


def class_image_key(model_id: str, class_prompt: str, resolution: int, seed: int) -> str:
    """Ten hex digits naming one set of generated class images."""
    text = "\n".join([model_id, class_prompt, str(resolution), str(seed)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:10]


def ensure_class_images(
    pipe: Any,
    arch: Family,
    *,
    class_prompt: str,
    num_images: int,
    folder: Path,
    resolution: int,
    seed: int,
    device: Any,
    on_progress: ProgressFn | None = None,
    model_id: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 4,
    process_index: int = 0,
    num_processes: int = 1,
) -> list[Path]:
    """The `num_images` class images in `folder`, generating the missing ones with `pipe`.

    `model_id` names the base model in the cache key (default: the pipeline's `name_or_path`,
    else the architecture name; pass the `--model` value). With `num_processes` > 1 each
    process generates its share (indices `i % num_processes == process_index`); the caller
    waits for all, then calls again on one process to get the full list (nothing is generated).
    `pipe` is moved to `device`; its dtype is left as it is. `num_inference_steps` and `guidance_scale` None: the
    loaded model's, as `sdlora sample` draws (`Family.sample_steps`, `Family.guidance_for`; a step-distilled
    model's few steps).
    """
    if num_images <= 0:
        return []
    if not class_prompt.strip():
        raise ConfigError("--class-prompt is empty; prior preservation needs a prompt such as 'a photo of a toy'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    user_images = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in _IMAGE_SUFFIXES and not _GENERATED.match(p.name) and not p.name.startswith(".")
    )[:num_images]
    model_id = model_id or getattr(pipe, "name_or_path", None) or arch.name
    key = class_image_key(model_id, class_prompt, resolution, seed)
    wanted = [folder / f"class-{key}-{i:04d}.png" for i in range(num_images - len(user_images))]
    missing = [i for i, path in enumerate(wanted) if not path.is_file() and i % num_processes == process_index]
    if missing:
        _generate(
            pipe,
            missing,
            wanted,
            class_prompt=class_prompt,
            resolution=resolution,
            seed=seed,
            device=device,
            steps=arch.sample_steps(pipe) if num_inference_steps is None else num_inference_steps,
            guidance=arch.guidance_for(pipe) if guidance_scale is None else guidance_scale,  # the model's default
            batch_size=max(1, batch_size),
            prompt_kwargs=arch.prompt_kwargs(pipe),
            on_progress=on_progress,
        )
    return user_images + wanted


def _generate(
    pipe: Any,
    indices: list[int],
    paths: list[Path],
    *,
    class_prompt: str,
    resolution: int,
    seed: int,
    device: Any,
    steps: int,
    guidance: float,
    batch_size: int,
    prompt_kwargs: dict[str, Any],
    on_progress: ProgressFn | None,
) -> None:
    from PIL.PngImagePlugin import PngInfo

    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # A CPU generator per image: the same seed gives the same image on any device.
    done = 0
    if on_progress:
        on_progress("class images", 0, len(indices))
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        images = pipe(
            prompt=[class_prompt] * len(batch),  # by name: not every pipeline's first argument (FLUX.2's: image)
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in batch],
            **prompt_kwargs,
        ).images
        for i, image in zip(batch, images):
            info = PngInfo()
            info.add_text("sdlora:class_prompt", class_prompt)
            info.add_text("sdlora:seed", str(seed + i))
            with atomic_path(paths[i]) as tmp:
                image.save(tmp, format="PNG", pnginfo=info)
        done += len(batch)
        if on_progress:
            on_progress("class images", done, len(indices))
