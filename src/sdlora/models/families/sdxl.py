"""Stable Diffusion XL: two CLIP text encoders, the UNet takes the pooled text and six size time ids
as added conditions (`addition_embed_type == "text_time"`), 1024 px."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from sdlora.models.families.unet_clip import UNET_ATTENTION, UNetClipFamily


@dataclass(frozen=True)
class StableDiffusionXL(UNetClipFamily):
    def matches_unet(self, unet_config: Mapping[str, Any]) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"

    def build_tiny(self) -> Any:
        from sdlora.models.tiny import tiny_sdxl

        return tiny_sdxl()


SDXL = StableDiffusionXL(
    name="sdxl",
    label="SDXL",
    title="Stable Diffusion XL",
    default_resolution=1024,
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    uses_pooled=True,
    kohya_base_version="sdxl_base_v1-0",
    kohya_te_prefixes=("lora_te1", "lora_te2"),
    kohya_unet_layout="sgm",  # sd-scripts trains SDXL on SGM's own UNet
    kohya_network_module="networks.lora",
    modelspec_architecture="stable-diffusion-xl-v1-base/lora",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    embedding_keys=(("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")),
    hub_tag="stable-diffusion-xl",
    licenses=(("stabilityai/stable-diffusion-xl-base-1.0", "openrail++"),),
    single_file_key="conditioner.embedders.1.",
    base_config="sdxl",
    tiny_model="tiny-sdxl",
    denoiser="unet",
    lora_targets=UNET_ATTENTION,
    sample_guidance=7.5,
)
