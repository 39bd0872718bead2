"""Z-Image and Z-Image-Turbo (Tongyi-MAI, 6 B): a single-stream flow-matching transformer (30 layers, with
noise and context refiner blocks) on 16-channel VAE latents in 2x2 patches, conditioned on the hidden states
of Qwen3-4B, with no pooled embedding.

What follows diffusers' ZImagePipeline and examples/dreambooth/train_dreambooth_lora_z_image.py:

- prompts: each rendered by Qwen3's chat template (one user turn, the assistant's turn opened), tokenized to
  the pipeline's 512-token window, and encoded to Qwen3's `hidden_states[-2]`; the pipeline keeps only the
  rows its attention mask marks (`prompt_embeds[i][prompt_masks[i]]`), a list of per-prompt lengths. The
  loop and its caches batch fixed-shape tensors, so a prompt's embedding here is the whole window, (512,
  D + 1): the hidden states with padding rows zeroed and the attention mask as the last channel. `denoise`
  and `prompt_embeds_kwargs` take the masked rows out again (`unpad`): the transformer and the pipeline get
  exactly the list `ZImagePipeline.encode_prompt` builds.
- latents: the VAE's (latents - shift_factor) * scaling_factor (FLUX.1's VAE; train/cache.py `vae_scale`),
  given to the transformer as a list of (C, 1, h, w) frames that it patchifies itself.
- timesteps: the transformer takes 1 - sigma (the pipeline passes (1000 - t) / 1000) and predicts
  x0 - noise, which the pipeline negates before its scheduler step; `denoise` does both, so the loop sees the
  velocity noise - x0 that train/flow_matching.py trains towards.
- the sigmas: uniform, shifted by the scheduler's own static shift (3.0 in Z-Image-Turbo's config) unless
  `--shift` is given, as diffusers' script draws them from its scheduler's shifted 1000-step schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from sdlora.errors import ConfigError
from sdlora.models.families.qwen_prompt import chat_tokens, chat_windows
from sdlora.models.families.transformer import TransformerFamily

# The attention projections of every block (main layers and both refiners): the default `--lora_layers` of
# diffusers' train_dreambooth_lora_z_image.py.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")

WINDOW = 512  # ZImagePipeline's max_sequence_length (diffusers' training default too)
TURBO_SHIFT = 3.0  # Z-Image-Turbo's scheduler_config.json: static shift 3.0
TURBO_STEPS = 8  # ZImagePipeline's documented Turbo call (8 steps, guidance 0)
BASE_STEPS = 50  # ZImagePipeline's default num_inference_steps (Z-Image base's card: 28-50)
BASE_GUIDANCE = 5.0  # ZImagePipeline's default guidance_scale


def is_turbo(pipe: Any) -> bool:
    """Z-Image-Turbo, told from its scheduler config (a static shift of 3.0; Z-Image base's shifts further)."""
    config = getattr(getattr(pipe, "scheduler", None), "config", {})
    return not config.get("use_dynamic_shifting", False) and config.get("shift") == TURBO_SHIFT


def unpad(embeds: torch.Tensor) -> torch.Tensor:
    """The rows of one prompt's (WINDOW, D + 1) embedding its attention mask (the last channel) keeps, as (L, D)."""
    return embeds[embeds[:, -1] > 0.5, :-1]


@dataclass(frozen=True)
class ZImage(TransformerFamily):
    # ---- the ComfyUI file: the original Z-Image module layout (lora_unet_layers_N_attention_qkv, q, k, v
    # fused), models/families/zimage_keys.py

    def kohya_keys(self) -> tuple[Any, Any]:
        from sdlora.models.families.zimage_keys import kohya_module, peft_to_kohya_zimage

        return kohya_module, peft_to_kohya_zimage

    # ---- loading

    def matches_unet(self, unet_config: Mapping[str, Any]) -> bool:
        # ZImageTransformer2DModel's config: patch sizes per embedder and the caption feature width (Lumina 2's
        # transformer has cap_feat_dim but one patch_size).
        return unet_config.get("all_patch_size") is not None and unet_config.get("cap_feat_dim") is not None

    def build_tiny(self) -> Any:
        from sdlora.models.tiny import tiny_zimage

        return tiny_zimage()

    # ---- training

    def training_objective(self, pipe: Any, train: Any) -> Any:
        """Flow matching as diffusers' train_dreambooth_lora_z_image.py trains it: uniform sigmas (`--weighting_scheme
        none`) shifted by the scheduler's static shift (3.0 for Z-Image-Turbo), no loss weighting; `--shift` and
        `--timestep-sampling` replace them. The transformer's timestep is made from sigma in `denoise`."""
        from sdlora.train.flow_matching import FlowMatching

        shift = train.shift
        scheduler = getattr(pipe, "scheduler", None)
        if shift is None and scheduler is not None and not scheduler.config.get("use_dynamic_shifting", False):
            shift = float(scheduler.config.get("shift", 1.0))
        sampling = train.timestep_sampling.replace("-", "_")  # logit-normal: FlowMatching's logit_normal
        return FlowMatching(sampling=sampling, shift=shift, timestep_scale=1.0)

    def denoise(
        self,
        denoiser: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The velocity for `noisy` (B, 16, h, w) at sigmas `timesteps`: the transformer gets the latents as
        (C, 1, h, w) frames, 1 - sigma and each prompt's unpadded embedding; its x0 - noise comes back negated."""
        batch = noisy.shape[0]
        frames = list(noisy.unsqueeze(2).unbind(dim=0))
        captions = [unpad(e) for e in embeds]
        t = 1.0 - timesteps.to(device=noisy.device, dtype=torch.float32).expand(batch)
        out = denoiser(frames, t, captions, return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2)

    # ---- prompt conditioning

    def tokenize(self, pipe: Any, prompts: Sequence[str]) -> list[torch.Tensor]:
        """The chat-rendered prompts' token ids and their attention mask, padded to the WINDOW (as the pipeline
        tokenizes): [ids, mask], both (N, WINDOW), for the one tokenizer."""
        return chat_tokens(pipe.tokenizer, prompts, WINDOW, thinking=True)

    def prompt_windows(self, pipe: Any) -> list[tuple[str, Any, int]]:
        return chat_windows(pipe.tokenizer, WINDOW, thinking=True)

    def encode_tokens(
        self, text_encoders: Sequence[Any], token_ids: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, WINDOW, D + 1): Qwen3's hidden_states[-2] with padding rows zeroed, the attention mask as the last
        channel (see the module doc); no pooled embedding."""
        (qwen,) = text_encoders
        ids, mask = (t.to(qwen.device) for t in token_ids)
        hidden = qwen(input_ids=ids, attention_mask=mask.bool(), output_hidden_states=True).hidden_states[-2]
        keep = mask[..., None].to(hidden.dtype)
        return torch.cat([hidden * keep, keep], dim=-1), None

    def prompt_embeds_kwargs(
        self,
        pipe: Any,
        cond: tuple[torch.Tensor, torch.Tensor | None],
        negative: tuple[torch.Tensor, torch.Tensor | None],
        device: Any,
    ) -> dict[str, Any]:
        """One prompt's cached embedding as the pipeline's list of unpadded embeddings, and the empty prompt's as
        the negative one (used where --guidance is above 0)."""
        kwargs = {"prompt_embeds": [unpad(cond[0]).to(device)]}
        if negative is not None:
            kwargs["negative_prompt_embeds"] = [unpad(negative[0]).to(device)]
        return kwargs

    # ---- sampling

    def sample_steps(self, pipe: Any) -> int:
        """8 for Z-Image-Turbo (ZImagePipeline's documented Turbo call); ZImagePipeline's default 50 for any other."""
        return TURBO_STEPS if is_turbo(pipe) else BASE_STEPS

    def guidance_for(self, pipe: Any) -> float:
        """0 for Z-Image-Turbo (`sample_guidance`: distilled, no classifier-free guidance); ZImagePipeline's
        default 5.0 for any other (Z-Image base samples with CFG and a negative prompt)."""
        return self.sample_guidance if is_turbo(pipe) else BASE_GUIDANCE

    def sampling_kwargs(self, guidance: float | None, negative_prompt: Any) -> dict[str, Any]:
        """Classifier-free guidance with the negative prompt ("" by default) above guidance 0; at 0 (Z-Image-Turbo's
        setting, its default) the pipeline runs without it, so a negative prompt is refused there."""
        if negative_prompt is not None and guidance is not None and guidance <= 0:
            raise ConfigError(
                f"--negative-prompt: {self.label} samples without classifier-free guidance at --guidance 0 "
                "(Z-Image-Turbo's setting), so a negative prompt does nothing; give --guidance (Z-Image base samples at 5) or drop it"
            )
        return {"guidance_scale": guidance, "negative_prompt": negative_prompt}


ZIMAGE = ZImage(
    name="zimage",
    label="Z-Image",
    title="Z-Image",
    default_resolution=1024,
    pipeline_classes=("ZImagePipeline",),
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    uses_pooled=False,
    kohya_base_version="z_image",  # musubi-tuner's ss_base_model_version for Z-Image (its architecture's full name)
    kohya_te_prefixes=("lora_te",),  # sd-scripts' prefix of a single text encoder (text-encoder LoRAs refused)
    kohya_unet_layout="z-image",  # the original Tongyi-MAI/Z-Image modules ComfyUI runs (attention.qkv, ...)
    kohya_network_module="networks.lora_zimage",  # musubi-tuner's Z-Image LoRA module
    modelspec_architecture="Z-Image/lora",  # musubi-tuner's sai_model_spec.py (ARCH_Z_IMAGE + "/lora")
    modelspec_implementation="https://github.com/Tongyi-MAI/Z-Image",
    embedding_keys=(("text_encoder", "qwen3"),),  # no reader convention known; pivotal tuning is refused
    hub_tag="z-image",
    licenses=(("Tongyi-MAI/Z-Image-Turbo", "apache-2.0"), ("Tongyi-MAI/Z-Image", "apache-2.0")),
    # Never reached: single_file.detect refuses a file without an SD UNet first (Z-Image: diffusers folders or
    # hub ids only, in this version).
    single_file_key="model.diffusion_model.context_refiner.",
    base_config="zimage",
    tiny_model="tiny-zimage",
    denoiser="transformer",
    lora_targets=ATTENTION,
    # ZImagePipeline's documented Turbo call: guidance_scale 0.0 (no classifier-free guidance), 8-9 steps.
    sample_guidance=0.0,
)
