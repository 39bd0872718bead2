"""What the UNet + CLIP families (SD 1.x, SDXL) share: CLIP tokenizing and encoding, and the UNet's
added conditions (pooled text and size time ids) for the families that use them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from sdlora.errors import ConfigError
from sdlora.models.families.base import Family

# The UNet's attention projections: diffusers' train_dreambooth_lora.py / train_text_to_image_lora.py targets.
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class UNetClipFamily(Family):
    """A UNet denoiser conditioned on CLIP text encoders; `uses_pooled` adds SDXL-style added conditions
    (the last encoder's pooled embedding and the six micro-conditioning time ids)."""

    def check_options(self, cfg: Any) -> None:
        """The flow-matching options have nothing to act on in DDPM noise prediction (its timesteps are drawn
        uniformly): refused, not ignored."""
        asked = [
            flag
            for flag, on in (
                ("--timestep-sampling", cfg.train.timestep_sampling != "uniform"),
                ("--shift", cfg.train.shift is not None),
            )
            if on
        ]
        if asked:
            raise ConfigError(
                f"{asked[0]} is for the flow-matching models (FLUX); {self.label} trains by DDPM noise "
                "prediction (its timesteps are uniform; --snr-gamma weights them)"
            )

    # ---- the kohya / ComfyUI file: train/kohya.py's names (diffusers' or SGM's module paths)

    def check_kohya_names(
        self, paths: Mapping[str, Sequence[str]], denoiser_config: Any, text_encoders: Sequence[Any] | None
    ) -> None:
        from sdlora.train.kohya import KohyaNames

        names = KohyaNames.for_models(self, denoiser_config, text_encoders)
        for component, component_paths in paths.items():
            for path in component_paths:
                names.to_kohya(component, path)

    def kohya_lora(
        self,
        lora: Mapping[str, Mapping[str, torch.Tensor]],
        alphas: Mapping[str, Mapping[str, float]],
        denoiser_config: Any,
        text_encoders: Sequence[Any] | None,
    ) -> dict[str, torch.Tensor]:
        from sdlora.train.kohya import KohyaNames, peft_to_kohya

        return peft_to_kohya(lora, alphas, KohyaNames.for_models(self, denoiser_config, text_encoders))

    def training_objective(self, pipe: Any, train: Any) -> Any:
        """DDPM noise prediction on the pipeline's own noise schedule (epsilon or v-prediction), with
        `--snr-gamma`'s Min-SNR weights."""
        from sdlora.train.objective import NoisePrediction

        return NoisePrediction.of_pipeline(pipe, train.snr_gamma)

    def denoise(
        self,
        denoiser: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The UNet's forward on the latents as they are, with the added conditions where the family has them."""
        return denoiser(noisy, timesteps, embeds, return_dict=False, **self.unet_kwargs(pooled, time_ids))[0]

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
        self, text_encoders: Sequence[Any], token_ids: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings (and the pooled embedding) exactly as the diffusers pipelines make them.

        One encoder, no pooled: its last hidden state. With pooled: the penultimate hidden states of all
        encoders, concatenated, plus the projected pooled output of the last.
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

    @staticmethod
    def time_ids(
        original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
    ) -> torch.Tensor:
        """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)

    def unet_kwargs(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict[str, Any]:
        """Extra keyword arguments for the UNet forward: the added conditions, for a family that uses them."""
        if not self.uses_pooled:
            return {}
        if pooled is None or time_ids is None:
            raise ValueError(f"{self.label} needs pooled text embeddings and time ids")
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

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
