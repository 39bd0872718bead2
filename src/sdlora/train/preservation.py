"""Preservation without class images: differential output preservation (`--preservation dop`).

Each step the UNet also sees, on the same noisy latents, each caption with the token replaced by the
class word ("a photo of sksToy toy" -> "a photo of toy"). Its LoRA-on prediction for that class caption
is pulled towards the base model's own (the LoRA switched off, no gradients): the LoRA learns the object
under its token while the class word keeps meaning any toy, the job prior preservation's class images
do, with no images to generate or store. With a text-encoder LoRA the class caption goes through the
LoRA-on encoders for the prediction and the LoRA-off ones for the target (`lora_disabled` switches both).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

from sdlora.data.captions import clean_caption


def class_caption(caption: str, token: str, class_word: str) -> str:
    """The caption with the token taken out: "a photo of sksToy toy" -> "a photo of toy". A token that is
    not followed by the class word is replaced by it ("sksToy on a table" -> "toy on a table")."""
    word = rf"(?<!\w){re.escape(token)}(?!\w)"
    if class_word:
        followed = re.compile(word + rf"\s+(?={re.escape(class_word)}(?!\w))", re.IGNORECASE)
        if followed.search(caption):
            return clean_caption(followed.sub("", caption))
    return clean_caption(re.compile(word, re.IGNORECASE).sub(class_word or "", caption))


@contextlib.contextmanager
def lora_disabled(*models: Any) -> Iterator[None]:
    """The models' LoRA layers switched off (the base model's output) inside the block, on again after.

    Uses peft's own switch on each LoRA layer (`BaseTunerLayer.enable_adapters`, what diffusers'
    `disable_adapters()` calls), so it works alike on the diffusers UNet and the transformers text
    encoders; pass unwrapped (not DDP) models.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def dop_loss(state: Any, batch: Any, predict: Any, weight_map: Any) -> tuple[Any, Any]:
    """(instance loss, preservation loss) of one batch under --preservation dop.

    The instance captions and the class captions go through one LoRA-on forward on the same noisy
    latents; the target of the class rows is the LoRA-off prediction (no gradients). `predict` is
    the loop's `predict(state, part, unet=None)`; `weight_map` the instance rows' mask weights.
    """
    from dataclasses import replace

    import torch

    from sdlora.train import losses
    from sdlora.train.data import Batch, Conditioning

    n = len(batch)
    both = Batch(
        latents=torch.cat([batch.latents, batch.latents]),
        noise=torch.cat([batch.noise, batch.noise]),
        timesteps=torch.cat([batch.timesteps, batch.timesteps]),
        cond=Conditioning.cat([batch.cond, batch.class_cond]),
        time_ids=torch.cat([batch.time_ids, batch.time_ids]),
    )
    pred, target, weights = predict(state, both)
    loss = losses.diffusion_loss_of_rows(pred, target, weights, weight_map, slice(None, n))
    classes = replace(batch, cond=batch.class_cond, class_cond=None, mask=None)
    unet = state.unwrap(state.unet)
    with torch.no_grad(), lora_disabled(unet, *[state.unwrap(e) for e in state.text_encoders]):
        base = predict(state, classes, unet=unet)[0]
    return loss, losses.diffusion_loss(pred[n:], base.detach(), None)
