"""`sdlora prepare --masks auto`: find the object in each prepared image by its class word.

A text-prompted segmentation model from transformers (CLIPSeg by default, `CIDAS/clipseg-rd64-refined`,
prompt "a photo of a {class}"; any model that CLIPSegForImageSegmentation and AutoProcessor load, from
the hub cache or a local folder; `tiny-clipseg` for tests) gives a probability per pixel; above the
threshold is the object. It runs on the prepared images (so the mask covers exactly what is trained),
batched, on the GPU when there is one. `model_identity` names the model and its revision without
loading it, so a re-run whose masks are all cached loads nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from sdlora.data.masks import DEFAULT_MASK_PROMPT
from sdlora.devices import resolve_device
from sdlora.errors import ConfigError, ModelError
from sdlora.events import ProgressFn
from sdlora.models.hub import hub_error, hub_offline
from sdlora.models.tiny import TINY_CLIPSEG
from sdlora.prompts import fill_prompt


def _local(model: str) -> Path | None:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model.startswith((".", "/", "~")) or path.exists():
        raise ModelError(f"--mask-model {model}: no such model folder")
    return None


def model_revision(model: str) -> str | None:
    """The revision a load of `model` would use, without loading it: "tiny" for tiny-clipseg, the
    cached snapshot's commit for a hub id (None when it is not cached), a local folder's config
    checksum."""
    if model == TINY_CLIPSEG:
        return "tiny"
    local = _local(model)
    if local is not None:
        import hashlib

        config = local / "config.json"
        return hashlib.sha256(config.read_bytes()).hexdigest()[:12] if config.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id is reported by the load itself
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def mask_prompt(class_word: str) -> str:
    return fill_prompt(DEFAULT_MASK_PROMPT, "", class_word)


def check_mask_prompt(class_word: str, tokenizer=None, positions: int = 77) -> None:
    """ConfigError in one line when the mask prompt of `class_word` is longer than the text model reads
    (`positions` ids, start and end markers included): CLIPSeg fails on it, it does not cut it.
    `tokenizer`: the model's; default the CLIP tokenizer every CLIPSeg uses, built offline."""
    if tokenizer is None:
        from sdlora.models.tiny import clip_tokenizer

        tokenizer = clip_tokenizer()
    ids = tokenizer(mask_prompt(class_word), truncation=False)["input_ids"]
    if len(ids) > positions:
        shown = class_word if len(class_word) <= 60 else f"{class_word[:57]}..."
        raise ConfigError(
            f"--class-word {shown!r}: {len(ids)} CLIP tokens in the --masks auto prompt, and the mask model "
            f"reads {positions}; give the object's class in a few words (e.g. 'toy', 'rc car')"
        )


class AutoMasker:
    """A loaded segmentation model; call it with images to get one uint8 mask (0/255) each."""

    def __init__(self, model: str, *, threshold: float, device: str | None = None, batch_size: int = 8):
        import torch

        self.model_name = model
        self.threshold = threshold
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if model == TINY_CLIPSEG:
            from sdlora.models.tiny import tiny_clipseg

            self.model, self.processor = tiny_clipseg()
        else:
            self.model, self.processor = self._load(model)
        self.revision = model_revision(model)
        self.model.to(self.device, self.dtype).eval()

    def _load(self, model: str):
        from transformers import AutoProcessor, CLIPSegForImageSegmentation
        from transformers.utils import logging as hf_logging

        local = _local(model)
        if local is None:
            hub_offline()  # an unreachable hub is found out once, in seconds, and then the cache is used
        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # the CLI draws its own progress
        try:
            where = str(local or model)
            return CLIPSegForImageSegmentation.from_pretrained(where), AutoProcessor.from_pretrained(where)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if local is None:
                raise hub_error(f"--mask-model {model}", exc, "or pass a local folder") from exc
            raise ModelError(
                f"--mask-model {model}: cannot load a CLIPSeg segmentation model ({str(exc).strip()[:150]}); "
                "the folder needs a processor and a model, as saved by save_pretrained"
            ) from exc
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()

    def source(self) -> dict:
        """The manifest's `mask_source` of the masks this model makes."""
        return {"kind": "auto", "model": self.model_name, "revision": self.revision}

    def __call__(
        self, images: Sequence[Image.Image], class_word: str, on_progress: ProgressFn | None = None
    ) -> list[np.ndarray]:
        import torch
        import torch.nn.functional as F

        prompt = mask_prompt(class_word)
        positions = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", 77)
        check_mask_prompt(class_word, self.processor.tokenizer, positions)
        masks: list[np.ndarray] = []
        total = len(images)
        if on_progress:
            on_progress("masking", 0, total)
        for start in range(0, total, self.batch_size):
            batch = [img.convert("RGB") for img in images[start : start + self.batch_size]]
            inputs = self.processor(text=[prompt] * len(batch), images=batch, padding=True, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.inference_mode():
                logits = self.model(**inputs).logits.float()
            logits = logits.reshape(len(batch), 1, *logits.shape[-2:])  # one image comes back unbatched
            for img, logit in zip(batch, logits):
                w, h = img.size
                prob = torch.sigmoid(F.interpolate(logit[None], size=(h, w), mode="bilinear", align_corners=False))
                masks.append(((prob[0, 0] >= self.threshold).cpu().numpy() * 255).astype(np.uint8))
            if on_progress:
                on_progress("masking", len(masks), total)
        return masks
