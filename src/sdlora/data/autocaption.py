"""`sdlora caption --auto MODEL`: caption images with a transformers image-to-text model.

Any captioning model that AutoProcessor + AutoModelForImageTextToText load and that
captions from the image alone works (BLIP: `Salesforce/blip-image-captioning-base` / `-large`,
GIT: `microsoft/git-base-coco`), from the hub cache or a local folder. The result is a plain
callable `(image paths, on_progress) -> raw captions`; captions.py inserts the token.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator, Sequence

from sdlora.devices import resolve_device
from sdlora.errors import ConfigError, DataError, ModelError
from sdlora.events import ProgressFn
from sdlora.models.hub import hub_error, hub_offline

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"

# BLIP's well-known artefact words ("arafed", "araffe", ...) are not English; drop them.
_ARTEFACTS = re.compile(r"\bar+af+e?d?\b", re.IGNORECASE)


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """No tqdm bars from transformers while loading: the CLI draws its own progress."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    return text[0] if len(text[0]) <= 200 else text[0][:199] + "…"


class ImageCaptioner:
    """A loaded captioning model; call it with image paths to get one caption each."""

    def __init__(self, model: str, *, device: str | None = None, batch_size: int = 8, max_new_tokens: int = 40):
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: must be at least 1")
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model_name = model
        local = Path(model).expanduser()
        if not local.is_dir() and (model.startswith((".", "/", "~")) or local.exists()):
            raise ModelError(f"--auto {model}: no such model folder")
        where = str(local) if local.is_dir() else model
        self.device = resolve_device(device)
        # Half precision only where it is fast and safe; CPU kernels want float32.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if not local.is_dir():
            hub_offline()  # an unreachable hub is found out once, in seconds, and then the cache is used
        try:
            with _quiet_hub():
                self.processor = AutoProcessor.from_pretrained(where)
                self.model = AutoModelForImageTextToText.from_pretrained(where, dtype=self.dtype)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if not local.is_dir():
                raise hub_error(f"--auto {model}", exc, "or pass a local folder") from exc
            raise ModelError(
                f"--auto {model}: cannot load an image-to-text model ({_first_line(exc)}); the folder needs a "
                "processor and an image-to-text model, as saved by save_pretrained"
            ) from exc
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def __call__(self, paths: Sequence[Path], on_progress: ProgressFn | None = None) -> list[str]:
        import torch
        from PIL import Image, UnidentifiedImageError

        captions: list[str] = []
        total = len(paths)
        if on_progress:
            on_progress("captioning", 0, total)
        for start in range(0, total, self.batch_size):
            batch = paths[start : start + self.batch_size]
            images = []
            for path in batch:
                try:
                    with Image.open(path) as img:
                        images.append(img.convert("RGB"))
                except (OSError, UnidentifiedImageError) as exc:
                    raise DataError(f"{path}: cannot read the image ({_first_line(exc)})") from None
            inputs = self.processor(images=images, return_tensors="pt").to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
            texts = self.processor.batch_decode(out, skip_special_tokens=True)
            captions += [" ".join(_ARTEFACTS.sub("", text).split()) for text in texts]
            if on_progress:
                on_progress("captioning", len(captions), total)
        return captions


def load_captioner(model: str = DEFAULT_MODEL, **kwargs) -> ImageCaptioner:
    """Load `model` (hub id or folder); ModelError with one line if that is not possible."""
    return ImageCaptioner(model, **kwargs)
