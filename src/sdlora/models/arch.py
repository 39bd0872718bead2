"""What differs between SD 1.x and SDXL, behind one small interface.

The architecture is read from the UNet's own config (SDXL's UNet takes pooled text and time
ids: `addition_embed_type == "text_time"`), never from the model's name. Everything else in
sdlora (training, sampling, export) is shared and asks this object for the differences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch


@dataclass(frozen=True)
class Architecture:
    name: str  # "sd1" or "sdxl"
    default_resolution: int
    text_encoders: tuple[str, ...]  # pipeline attribute names, in order
    tokenizers: tuple[str, ...]
    kohya_base_version: str  # `ss_base_model_version`: how A1111 files the LoRA
    kohya_te_prefixes: tuple[str, ...]  # kohya key prefix per text encoder
    # SDXL: prompts give a pooled embedding beside the per-token ones, and the UNet takes it with the six
    # micro-conditioning time ids as added conditions.
    uses_pooled: bool = False

    @property
    def is_sdxl(self) -> bool:
        """For what differs in a file format (kohya keys, embedding keys); computation asks the methods below."""
        return self.name == "sdxl"

    def tokenize(self, pipe: Any, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Token ids per tokenizer, padded to the model's 77 positions."""
        ids = []
        for name in self.tokenizers:
            tokenizer = getattr(pipe, name)
            ids.append(
                tokenizer(
                    list(prompts),
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
            )
        return ids

    def encode_tokens(
        self, text_encoders: Sequence[torch.nn.Module], token_ids: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings (and SDXL's pooled embedding) exactly as the diffusers pipelines make them.

        SD 1.x: the last hidden state of the one encoder. SDXL: the penultimate hidden states of
        both encoders, concatenated, plus the projected pooled output of the second.
        """
        if not self.uses_pooled:
            encoder, ids = text_encoders[0], token_ids[0]
            return encoder(ids.to(encoder.device))[0], None
        hidden, pooled = [], None
        for encoder, ids in zip(text_encoders, token_ids):
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
        return torch.cat(hidden, dim=-1), pooled

    def encode_prompts(self, pipe: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoders = [getattr(pipe, name) for name in self.text_encoders]
        return self.encode_tokens(encoders, self.tokenize(pipe, prompts))

    @staticmethod
    def time_ids(
        original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
    ) -> torch.Tensor:
        """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)

    def unet_kwargs(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict[str, Any]:
        """Extra keyword arguments for the UNet forward: SDXL's added conditions; SD 1.x ignores both."""
        if not self.uses_pooled:
            return {}
        if pooled is None or time_ids is None:
            raise ValueError("SDXL needs pooled text embeddings and time ids")
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def stack_pooled(self, pooled: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
        """Per-prompt pooled embeddings as one (N, Dp) batch; None for an architecture without them."""
        return torch.stack(list(pooled)) if self.uses_pooled else None  # type: ignore[arg-type]

    def prompt_embeds_kwargs(
        self,
        pipe: Any,
        cond: tuple[torch.Tensor, torch.Tensor | None],
        negative: tuple[torch.Tensor, torch.Tensor | None],
        device: Any,
    ) -> dict[str, Any]:
        """Pipeline keyword arguments for one prompt from cached embeddings (77, D) and pooled (Dp,), with the
        empty prompt's as the negative: what the pipeline itself does for `prompt=` without a negative prompt
        (SDXL pipelines with `force_zeros_for_empty_prompt` use zeros for it)."""
        (embeds, pooled), (neg, neg_pooled) = cond, negative
        kwargs: dict[str, Any] = {}
        if self.uses_pooled:
            if pipe.config.get("force_zeros_for_empty_prompt", False):
                neg, neg_pooled = torch.zeros_like(neg), torch.zeros_like(neg_pooled)
            kwargs.update(
                pooled_prompt_embeds=pooled[None].to(device),  # type: ignore[index]
                negative_pooled_prompt_embeds=neg_pooled[None].to(device),  # type: ignore[index]
            )
        return {"prompt_embeds": embeds[None].to(device), "negative_prompt_embeds": neg[None].to(device), **kwargs}


SD1 = Architecture(
    name="sd1",
    default_resolution=512,
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    kohya_base_version="sd_v1",
    kohya_te_prefixes=("lora_te",),
)

SDXL = Architecture(
    name="sdxl",
    default_resolution=1024,
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    kohya_base_version="sdxl_base_v1-0",
    kohya_te_prefixes=("lora_te1", "lora_te2"),
    uses_pooled=True,
)


def detect_architecture(unet_config: Mapping[str, Any]) -> Architecture:
    """SD 1.x or SDXL from a UNet config (a dict or diffusers FrozenDict)."""
    if unet_config.get("addition_embed_type") == "text_time":
        return SDXL
    if unet_config.get("cross_attention_dim") is None:
        raise ValueError("not a text-to-image UNet: its config has no cross_attention_dim")
    return SD1


class OnDevice:
    """A (possibly DDP-wrapped) text encoder with the `.device` that `Architecture.encode_tokens` reads."""

    def __init__(self, module: Any, device: torch.device):
        self.module, self.device = module, device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)
