"""Stable Diffusion 1.x: one CLIP text encoder, a UNet without added conditions, 512 px."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from sdlora.models.families.unet_clip import UNET_ATTENTION, UNetClipFamily


@dataclass(frozen=True)
class StableDiffusion1(UNetClipFamily):
    def matches_unet(self, unet_config: Mapping[str, Any]) -> bool:
        # Asked after SDXL: any other text-conditioned UNet, as sdlora has always read one.
        return unet_config.get("cross_attention_dim") is not None

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def build_tiny(self) -> Any:
        from sdlora.models.tiny import tiny_sd

        return tiny_sd()


SD1 = StableDiffusion1(
    name="sd1",
    label="SD 1.x",
    title="Stable Diffusion 1.x",
    default_resolution=512,
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    uses_pooled=False,
    kohya_base_version="sd_v1",
    kohya_te_prefixes=("lora_te",),
    kohya_unet_layout="diffusers",  # sd-scripts trains SD 1.x on a diffusers-layout UNet
    kohya_network_module="networks.lora",
    modelspec_architecture="stable-diffusion-v1/lora",
    modelspec_implementation="diffusers",
    embedding_keys=(("text_encoder", "emb_params"),),
    hub_tag="stable-diffusion",
    licenses=(
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m"),
        ("runwayml/stable-diffusion-v1-5", "creativeml-openrail-m"),
        ("CompVis/stable-diffusion-v1-4", "creativeml-openrail-m"),
    ),
    single_file_key="cond_stage_model.transformer.",
    base_config="sd15",
    tiny_model="tiny-sd",
    denoiser="unet",
    lora_targets=UNET_ATTENTION,
    sample_guidance=7.5,
)
