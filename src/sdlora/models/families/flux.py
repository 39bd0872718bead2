"""FLUX.1 [dev] and [schnell]: a flow-matching transformer (19 double-stream + 38 single-stream blocks) on
16-channel VAE latents packed into 2x2 tokens, conditioned on T5-XXL's hidden states and CLIP-L's pooled
output; [dev] also takes the guidance value as an input (guidance distillation), [schnell] does not.

What follows diffusers' FluxPipeline and examples/dreambooth/train_dreambooth_lora_flux.py:

- prompts: CLIP-L's pooled output (77 tokens) and T5's last hidden states (up to 512 tokens, padded to the
  full window as the pipeline does); the text position ids are zeros, made at the forward.
- latents: the VAE's (latents - shift_factor) * scaling_factor (`Family.scale_latents`' default), packed by
  `pack_latents` into (B, h/2 * w/2, 64) tokens with `latent_ids` (0, row, column) per token, the model's
  prediction unpacked back to (B, 16, h, w) so the loss, masks and DOP see the latents' own shape.
- the transformer takes sigma itself as its timestep (it multiplies by 1000 inside), and, where
  `guidance_embeds` is set ([dev]), the guidance value: TRAIN_GUIDANCE.
- pivotal tuning (`--train-token-embedding`, opt-in here: `pivotal_tuning`): the token's own vectors in CLIP-L
  and T5 (train/embeddings.py), as examples/advanced_diffusion_training/train_dreambooth_lora_flux_advanced.py
  trains them with --enable_t5_ti; the file's keys are its `clip_l` / `t5`, and ComfyUI's `t5xxl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from sdlora.errors import ConfigError
from sdlora.models.families.transformer import TransformerFamily

# The training guidance [dev] is given. diffusers' train_dreambooth_lora_flux.py defaults `--guidance_scale`
# to 3.5; sd-scripts' FLUX.1 LoRA example (docs/flux_train_network.md) trains with `--guidance_scale 1.0`,
# the value its docs recommend for LoRA training of the guidance-distilled [dev]. sdlora follows sd-scripts.
TRAIN_GUIDANCE = 1.0

# The attention projections of both block kinds: to_q/k/v (+ to_out.0 in the double-stream blocks) on the
# image stream, add_q/k/v_proj + to_add_out on the text stream: the attention part of the default
# `--lora_layers` of diffusers' train_dreambooth_lora_flux.py (it adds the feed-forward layers too).
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

T5_WINDOW = 512  # FluxPipeline's max_sequence_length for [dev] (diffusers' training default too)
DEV_STEPS = 28  # FluxPipeline's default num_inference_steps
SCHNELL_STEPS = 4  # [schnell] is step-distilled: BFL's model card and diffusers' FLUX docs sample it in 4


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents as (B, h/2 * w/2, 4C) tokens of 2x2 cells: FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    tokens = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`pack_latents` undone: (B, h/2 * w/2, 4C) tokens as (B, C, h, w) for latents `height` x `width`."""
    b, _, channels = tokens.shape
    latents = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, height, width)


def latent_ids(height: int, width: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) position ids of the packed tokens: (0, row, column), FluxPipeline._prepare_latent_image_ids."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def _config(denoiser: Any) -> Any:
    """The transformer's config through DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while not hasattr(denoiser, "config"):
        denoiser = getattr(denoiser, "module", None) or denoiser._orig_mod
    return denoiser.config


@dataclass(frozen=True)
class Flux1(TransformerFamily):
    def check_options(self, cfg: Any) -> None:
        """What this FLUX.1 version does not train, refused before any encoding. A text-encoder LoRA trains
        (CLIP-L's alone: `lora_text_encoders`)."""
        if cfg.train.snr_gamma is not None:
            raise ConfigError(
                f"--snr-gamma: Min-SNR weights (a DDPM noise-schedule weighting) are not for {self.label}; "
                "the flow-matching loss takes --timestep-sampling and --shift"
            )

    def lora_text_encoders(self) -> tuple[str, ...]:
        """CLIP-L: sd-scripts' lora_flux.py trains `lora_te1_` (CLIP-L) and no T5 LoRA by default, and diffusers'
        train_dreambooth_lora_flux.py `--train_text_encoder` CLIP-L alone. T5-XXL stays frozen; the loss still
        runs it, for the transformer reads the prompt through it."""
        return self.text_encoders[:1]

    def pivotal_tuning(self) -> bool:
        """Asked for only (`--train-token-embedding`): the token's vectors in CLIP-L and T5 train through both
        encoders, so T5-XXL (4.7 B parameters, ~9.5 GB in bf16) stays on the GPU and runs forward and backward
        at every step while the embedding trains, where a LoRA-only run encodes the captions once and lets it
        go. diffusers' train_dreambooth_lora_flux_advanced.py has it opt-in too (--train_text_encoder_ti)."""
        return False

    def prompt_windows(self, pipe: Any) -> list[tuple[str, Any, int]]:
        """T5's window (T5_WINDOW): the transformer reads the prompt token by token through T5 alone. CLIP-L
        gives only its pooled summary of its first 77 tokens, as FluxPipeline cuts them."""
        t5 = getattr(pipe, self.tokenizers[1], None)
        return [] if t5 is None else [("T5", t5, min(T5_WINDOW, int(t5.model_max_length)))]

    def modelspec_arch(self, denoiser_config: Any) -> str:
        """`flux-1-dev/lora`, or `flux-1-schnell/lora` for a transformer without the guidance embedding
        ([schnell]), as sd-scripts' library/sai_model_spec.py names them."""
        return (
            self.modelspec_architecture if dict(denoiser_config).get("guidance_embeds", True) else "flux-1-schnell/lora"
        )

    # ---- the kohya / ComfyUI file: sd-scripts' lora_flux.py layout (lora_unet_double_blocks_N_img_attn_qkv,
    # q, k, v fused), models/families/flux_keys.py

    def kohya_keys(self) -> tuple[Any, Any]:
        from sdlora.models.families.flux_keys import kohya_module, peft_to_kohya_flux

        return kohya_module, peft_to_kohya_flux

    # ---- loading

    def matches_unet(self, unet_config: Mapping[str, Any]) -> bool:
        # FluxTransformer2DModel's config: rotary axes and the joint (text) attention width.
        return unet_config.get("axes_dims_rope") is not None and unet_config.get("joint_attention_dim") is not None

    def build_tiny(self) -> Any:
        from sdlora.models.tiny import tiny_flux

        return tiny_flux()

    # ---- training

    def training_objective(self, pipe: Any, train: Any) -> Any:
        """Flow matching with diffusers' train_dreambooth_lora_flux.py defaults (uniform sigmas, no shift, no
        loss weighting); `--timestep-sampling` and `--shift` as sd-scripts offers them (its FLUX.1 LoRA
        example: sigmoid with a shift of 3.1582), and `flux-shift`, sd-scripts' `flux_shift`: sigmoid, then
        FLUX.1's resolution-dependent shift with the base model's own scheduler settings (the mu its pipeline
        samples with at that image size). The transformer takes sigma itself (timestep_scale 1)."""
        from sdlora.train.flow_matching import FlowMatching, ResolutionShift

        if train.timestep_sampling == "flux-shift":
            config = pipe.scheduler.config
            by_resolution = ResolutionShift(
                base_shift=config.get("base_shift", 0.5),
                max_shift=config.get("max_shift", 1.15),
                base_seq_len=config.get("base_image_seq_len", 256),
                max_seq_len=config.get("max_image_seq_len", 4096),
            )
            return FlowMatching(
                sampling="sigmoid", shift=train.shift, resolution_shift=by_resolution, timestep_scale=1.0
            )
        sampling = train.timestep_sampling.replace("-", "_")  # logit-normal: FlowMatching's logit_normal
        return FlowMatching(sampling=sampling, shift=train.shift, timestep_scale=1.0)

    def denoise(
        self,
        denoiser: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The transformer's velocity for `noisy` (B, 16, h, w): packed into tokens, unpacked back."""
        batch, _, height, width = noisy.shape
        device, dtype = noisy.device, noisy.dtype
        guidance = None
        if _config(denoiser).guidance_embeds:
            guidance = torch.full((batch,), TRAIN_GUIDANCE, device=device, dtype=torch.float32)
        out = denoiser(
            hidden_states=pack_latents(noisy),
            timestep=timesteps.to(device=device, dtype=dtype).expand(batch),
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=latent_ids(height, width, device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)

    # ---- prompt conditioning

    def tokenize(self, pipe: Any, prompts: Sequence[str]) -> list[torch.Tensor]:
        """CLIP-L's ids padded to its 77 positions, T5's padded to the full T5_WINDOW (as FluxPipeline pads)."""
        clip, t5 = (getattr(pipe, name) for name in self.tokenizers)
        windows = (clip.model_max_length, min(T5_WINDOW, t5.model_max_length))
        return [
            tokenizer(
                list(prompts), padding="max_length", max_length=window, truncation=True, return_tensors="pt"
            ).input_ids
            for tokenizer, window in zip((clip, t5), windows)
        ]

    def encode_tokens(
        self, text_encoders: Sequence[Any], token_ids: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """T5's last hidden states (N, L, D) and CLIP-L's pooled output (N, Dp): FluxPipeline.encode_prompt."""
        clip, t5 = text_encoders
        pooled = clip(token_ids[0].to(clip.device), output_hidden_states=False).pooler_output
        embeds = t5(token_ids[1].to(t5.device), output_hidden_states=False)[0]
        return embeds, pooled

    def prompt_embeds_kwargs(
        self,
        pipe: Any,
        cond: tuple[torch.Tensor, torch.Tensor | None],
        negative: tuple[torch.Tensor, torch.Tensor | None],
        device: Any,
    ) -> dict[str, Any]:
        """The cached T5 states (L, D) and CLIP pooled (Dp,) of one prompt; no negative ([dev] is distilled)."""
        embeds, pooled = cond
        return {"prompt_embeds": embeds[None].to(device), "pooled_prompt_embeds": pooled[None].to(device)}  # type: ignore[index]

    # ---- sampling

    def prompt_kwargs(self, pipe: Any) -> dict[str, Any]:
        """T5's window as `tokenize` pads it: FluxPipeline pads to its `max_sequence_length`, 512 unless told,
        which a T5 tokenizer of fewer positions (world-flux's 32) must be told, or the transformer reads
        hundreds of padding states it never saw in training."""
        windows = self.prompt_windows(pipe)
        return {"max_sequence_length": windows[0][2]} if windows else {}

    def sample_steps(self, pipe: Any) -> int:
        """FluxPipeline's default 28 for [dev]; 4 for a transformer without the guidance embedding ([schnell], which
        BFL's card and diffusers' FLUX docs sample in 4 steps)."""
        return DEV_STEPS if dict(_config(getattr(pipe, self.denoiser))).get("guidance_embeds", True) else SCHNELL_STEPS

    def sampling_kwargs(self, guidance: float | None, negative_prompt: Any) -> dict[str, Any]:
        """[dev]'s distilled guidance value (FluxPipeline ignores it for [schnell]); a negative prompt would
        need FluxPipeline's true CFG, twice the steps' cost: refused."""
        if negative_prompt is not None:
            raise ConfigError(
                f"--negative-prompt: {self.label} is guidance-distilled and takes no negative prompt; drop it"
            )
        return {"guidance_scale": guidance}


FLUX1 = Flux1(
    name="flux1",
    label="FLUX.1",
    title="FLUX.1",
    default_resolution=1024,
    pipeline_classes=("FluxPipeline",),
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    uses_pooled=True,
    kohya_base_version="flux1",  # sd-scripts' ss_base_model_version for FLUX.1
    kohya_te_prefixes=("lora_te1", "lora_te3"),  # sd-scripts' lora_flux.py: CLIP-L, T5-XXL
    kohya_unet_layout="bfl",  # sd-scripts names the transformer's layers by BFL's own modules (double_blocks...)
    kohya_network_module="networks.lora_flux",  # sd-scripts' FLUX.1 LoRA module
    modelspec_architecture="flux-1-dev/lora",  # sd-scripts' sai_model_spec.py ([schnell]'s: `modelspec_arch`)
    modelspec_implementation="https://github.com/black-forest-labs/flux",
    # diffusers' advanced FLUX script's keys (its README loads `clip_l` and `t5`); T5's again as ComfyUI's `t5xxl`
    # (its FLUX T5 tokenizer's embedding_key; it reads `clip_l` for CLIP-L).
    embedding_keys=(("text_encoder", "clip_l"), ("text_encoder_2", "t5"), ("text_encoder_2", "t5xxl")),
    hub_tag="flux",
    licenses=(
        ("black-forest-labs/FLUX.1-dev", "other"),  # the FLUX.1 [dev] non-commercial license
        ("black-forest-labs/FLUX.1-schnell", "apache-2.0"),
    ),
    # Never reached: single_file.detect refuses a file without an SD UNet first (FLUX.1 files: diffusers
    # folders or hub ids only, in this version).
    single_file_key="model.diffusion_model.double_blocks.",
    base_config="flux1",
    tiny_model="tiny-flux",
    denoiser="transformer",
    lora_targets=ATTENTION,
    sample_guidance=3.5,  # FluxPipeline's default guidance_scale
)
