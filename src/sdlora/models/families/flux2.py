"""FLUX.2 [klein] (4B and 9B, distilled and base): a flow-matching transformer (5 double-stream + 20
single-stream blocks at 4B) on the Flux2 VAE's 32-channel latents, patchified 2 x 2 into 128 channels and
normalised by the VAE's batch-norm statistics, conditioned on Qwen3's intermediate hidden states; no pooled
embedding and no guidance embedding (the base models sample with true CFG against the empty prompt).

What follows diffusers' Flux2KleinPipeline and examples/dreambooth/train_dreambooth_lora_flux2_klein.py:

- prompts: one user turn through Qwen3's chat template (thinking off), padded to TEXT_WINDOW tokens with
  its attention mask; the hidden states after TEXT_LAYERS stacked per token into (L, 3 x D), as
  `Flux2KleinPipeline._get_qwen3_prompt_embeds` does at its default `text_encoder_out_layers` (which
  sampling uses too; diffusers' training script defaults to (10, 20, 30), a mismatch with its own pipeline).
- latents (`scale_latents`): the VAE's posterior mean, patchified 2 x 2 (`_patchify_latents`), then
  (x - mean) / sqrt(var + eps) with the VAE's batch-norm running statistics, what the pipeline undoes before
  decoding: the loop sees (B, 4C, H/2, W/2). `denoise` packs those into (B, h * w, 4C) tokens with
  position ids (t, row, column, l) = (0, r, c, 0), the text's (0, 0, 0, position), and unpacks the velocity.
- the transformer takes sigma itself as its timestep (it multiplies by 1000 inside; the pipeline passes
  timestep / 1000) and no guidance value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from sdlora.errors import ConfigError
from sdlora.models.families.flux import ATTENTION as FLUX1_ATTENTION
from sdlora.models.families.qwen_prompt import chat_tokens, chat_windows
from sdlora.models.families.transformer import TransformerFamily

TEXT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's default `text_encoder_out_layers`
TEXT_WINDOW = 512  # Flux2KleinPipeline's default `max_sequence_length`
DISTILLED_STEPS = 4  # the step-distilled [klein] 4B / 9B: BFL's cards sample them in 4 steps
BASE_STEPS = 50  # Flux2KleinPipeline's default num_inference_steps (its docstring's base-model call)
PATCH = 2  # latent cells per token side: the VAE's 8x, then 2 x 2 patches, make a token 16 px wide

# The attention projections: both streams' q, k, v and outputs in the double blocks (FLUX.1's default, the same
# module names) and the single blocks' `to_qkv_mlp_proj`, their q, k, v fused with the MLP's input in one
# layer. diffusers' train_dreambooth_lora_flux2_klein.py defaults to to_q/k/v, to_out.0, to_qkv_mlp_proj and
# each single block's `attn.to_out` (attention and MLP output fused); the last cannot be a name here (the
# double blocks' `attn.to_out` is a ModuleList that peft refuses), and the text stream is trained as for FLUX.1.
ATTENTION = (*FLUX1_ATTENTION, "to_qkv_mlp_proj")


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) VAE latents as (B, 4C, H/2, W/2): Flux2KleinPipeline._patchify_latents."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * 4, h // 2, w // 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) as (B, h * w, C) tokens, row by row: Flux2KleinPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`pack` undone (what `_unpack_latents_with_ids` does with `latent_ids`' row-major ids)."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def latent_ids(height: int, width: int, device: Any) -> torch.Tensor:
    """(h * w, 4) position ids (0, row, column, 0) of the packed tokens: Flux2KleinPipeline._prepare_latent_ids."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    zeros = torch.zeros(height * width, dtype=torch.long)
    return torch.stack([zeros, rows.reshape(-1), cols.reshape(-1), zeros], dim=1).to(device)


def text_ids(length: int, device: Any) -> torch.Tensor:
    """(L, 4) position ids (0, 0, 0, position) of the prompt's tokens: Flux2KleinPipeline._prepare_text_ids."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


def _bn_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


@dataclass(frozen=True)
class Flux2Klein(TransformerFamily):
    # ---- the kohya / ComfyUI file: BFL's module names (lora_unet_double_blocks_N_img_attn_qkv, q, k, v
    # fused), models/families/flux2_keys.py

    def kohya_keys(self) -> tuple[Any, Any]:
        from sdlora.models.families.flux2_keys import kohya_module, peft_to_kohya_flux2

        return kohya_module, peft_to_kohya_flux2

    # ---- loading

    def matches_unet(self, unet_config: Mapping[str, Any]) -> bool:
        # Flux2Transformer2DModel's config (FLUX.1's has no timestep_guidance_channels); [klein] has no
        # guidance embedding, FLUX.2 [dev] (Flux2Pipeline, a Mistral text encoder) has one.
        return unet_config.get("timestep_guidance_channels") is not None and not unet_config.get("guidance_embeds")

    def build_tiny(self) -> Any:
        from sdlora.models.tiny import tiny_flux2_klein

        return tiny_flux2_klein(TEXT_LAYERS)

    # ---- training

    def scale_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Patchified 2 x 2, then normalised by the VAE's batch-norm statistics: Flux2KleinPipeline._encode_vae_image
        (its decoding undoes both)."""
        patches = patchify(latents)
        mean, std = _bn_stats(vae, patches)
        return (patches - mean) / std

    def training_objective(self, pipe: Any, train: Any) -> Any:
        """Flow matching with diffusers' train_dreambooth_lora_flux2_klein.py defaults (uniform sigmas, no
        weighting), `--timestep-sampling` and `--shift` as for FLUX.1. The transformer takes sigma itself."""
        from sdlora.train.flow_matching import FlowMatching

        sampling = train.timestep_sampling.replace("-", "_")
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
        """The transformer's velocity for `noisy` (B, 4C, h, w): packed into tokens, unpacked back."""
        batch, _, height, width = noisy.shape
        out = denoiser(
            hidden_states=pack(noisy),
            timestep=timesteps.to(device=noisy.device, dtype=noisy.dtype).expand(batch),
            guidance=None,
            encoder_hidden_states=embeds,
            txt_ids=text_ids(embeds.shape[1], noisy.device),
            img_ids=latent_ids(height, width, noisy.device),
            return_dict=False,
        )[0]
        return unpack(out, height, width)

    # ---- prompt conditioning

    def tokenize(self, pipe: Any, prompts: Sequence[str]) -> list[torch.Tensor]:
        """The chat-templated prompts' token ids and their attention mask (both (N, TEXT_WINDOW)): the one text
        encoder reads both, as Flux2KleinPipeline calls it."""
        return chat_tokens(pipe.tokenizer, prompts, TEXT_WINDOW, thinking=False)

    def prompt_windows(self, pipe: Any) -> list[tuple[str, Any, int]]:
        return chat_windows(pipe.tokenizer, TEXT_WINDOW, thinking=False)

    def encode_tokens(
        self, text_encoders: Sequence[Any], token_ids: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Qwen3's hidden states after TEXT_LAYERS, stacked per token: (N, L, 3 x D); no pooled embedding."""
        (qwen,) = text_encoders
        ids, mask = token_ids
        out = qwen(
            input_ids=ids.to(qwen.device),
            attention_mask=mask.to(qwen.device),
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,  # the hidden states are what is read; no (L, vocabulary) logits
        )
        stacked = torch.stack([out.hidden_states[k] for k in TEXT_LAYERS], dim=1)  # (N, 3, L, D)
        n, layers, length, width = stacked.shape
        return stacked.permute(0, 2, 1, 3).reshape(n, length, layers * width), None

    def prompt_embeds_kwargs(
        self,
        pipe: Any,
        cond: tuple[torch.Tensor, torch.Tensor | None],
        negative: tuple[torch.Tensor, torch.Tensor | None],
        device: Any,
    ) -> dict[str, Any]:
        """The cached states (L, D) of one prompt, and of the empty prompt: the base models' CFG negative."""
        kwargs = {"prompt_embeds": cond[0][None].to(device)}
        if negative is not None:
            kwargs["negative_prompt_embeds"] = negative[0][None].to(device)
        return kwargs

    # ---- sampling

    def sample_steps(self, pipe: Any) -> int:
        """Flux2KleinPipeline's default 50 for [klein] base; 4 for the step-distilled [klein] (4B, 9B), which
        its `model_index.json` marks `is_distilled`."""
        return DISTILLED_STEPS if getattr(pipe.config, "is_distilled", False) else BASE_STEPS

    def sampling_kwargs(self, guidance: float | None, negative_prompt: Any) -> dict[str, Any]:
        """The CFG scale of the base models (the distilled ones ignore it); Flux2KleinPipeline takes no negative
        prompt (its CFG negative is the empty prompt): refused."""
        if negative_prompt is not None:
            raise ConfigError(
                f"--negative-prompt: {self.label}'s pipeline takes no negative prompt (it guides against the "
                "empty prompt); drop it"
            )
        return {"guidance_scale": guidance}


FLUX2_KLEIN = Flux2Klein(
    name="flux2-klein",
    label="FLUX.2 [klein]",
    title="FLUX.2 [klein]",
    default_resolution=1024,  # Flux2KleinPipeline's default_sample_size 128 x the VAE's 8
    pipeline_classes=("Flux2KleinPipeline",),
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    uses_pooled=False,
    # musubi-tuner (kohya-ss' FLUX.2 trainer) writes its architecture's full name here and its module below;
    # sdlora records the 4B's (a 9B LoRA has the same key layout).
    kohya_base_version="flux_2_klein_4b",
    kohya_te_prefixes=("lora_te",),  # never written: text-encoder LoRAs are refused
    kohya_unet_layout="bfl",
    kohya_network_module="networks.lora_flux_2",
    modelspec_architecture="Flux.2-klein-4b/lora",  # musubi-tuner's utils/sai_model_spec.py
    modelspec_implementation="https://github.com/black-forest-labs/flux2",
    embedding_keys=(("text_encoder", "qwen3"),),  # never written: pivotal tuning is refused
    hub_tag="flux",  # the tag BFL's FLUX.2 [klein] cards carry (text-to-image, image-editing, flux)
    licenses=(
        ("black-forest-labs/FLUX.2-klein-4B", "apache-2.0"),
        ("black-forest-labs/FLUX.2-klein-base-4B", "apache-2.0"),
        ("black-forest-labs/FLUX.2-klein-9B", "other"),  # the FLUX non-commercial license
        ("black-forest-labs/FLUX.2-klein-base-9B", "other"),
    ),
    # Never reached: single_file.detect refuses a file without an SD UNet first (FLUX.2 [klein] files: diffusers
    # folders or hub ids only, in this version). BFL's checkpoint key, a prefix no other family's files have.
    single_file_key="double_stream_modulation_img.",
    base_config="flux2-klein",
    tiny_model="tiny-flux2-klein",
    denoiser="transformer",
    lora_targets=ATTENTION,
    sample_guidance=4.0,  # Flux2KleinPipeline's default guidance_scale
)
