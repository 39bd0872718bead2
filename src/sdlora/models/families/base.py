"""The interface every model family fills: what sdlora asks of a model, and nothing of its name.

A family is one frozen declaration (the fields) plus the methods below. The loop, the caches, export,
sampling, the single-file loader and the model card ask these; they never name a family. A new family
(FLUX.1, FLUX.2 [klein], Z-Image, ...) is one module in this package that fills this class and is
listed in `families.FAMILIES`; nothing outside the package changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

if TYPE_CHECKING:
    from sdlora.train.objective import Objective


@dataclass(frozen=True)
class Family:
    """One model family. A family module fills every field and every method that raises here.

    Fields: facts that files and tools record. `name` is written into config.yaml, the LoRA metadata
    (`sdlora.architecture`) and cache keys, so it never changes once released. The rest: label
    (messages), title (model cards), default_resolution, pipeline_classes (the diffusers class names
    `model_index.json`'s `_class_name` may give; the first is the one loaded), text_encoders /
    tokenizers (pipeline attributes, in order), uses_pooled, kohya_base_version / kohya_te_prefixes /
    kohya_unet_layout / kohya_network_module (kohya export), modelspec_architecture / modelspec_implementation,
    embedding_keys (text encoder -> key in embeddings.safetensors), hub_tag and licenses (the Hub
    card), single_file_key / base_config (how a checkpoint file is recognised and the shipped configs
    it loads with), tiny_model (the `--model` name of its tiny random-weight model), denoiser (the
    pipeline attribute the LoRA trains: "unet", "transformer"), lora_targets (`--target-modules`'
    default) and sample_guidance (`--guidance`'s default).

    Methods: loading (`matches_unet`, `pipeline_cls`, `pipeline_kwargs`, `build_tiny`), options
    (`check_options`: what the family refuses, one line before any encoding; `pivotal_tuning`; `lora_text_encoders`:
    which text encoders `--train-text-encoder` trains; `prompt_windows`: what a caption must fit), training
    (`scale_latents`: the VAE's latents as the denoiser sees them; `training_objective`: DDPM noise prediction or flow matching, train/objective.py; `denoise`: the denoiser's
    forward, packing latents where the family does), prompt conditioning (`tokenize`,
    `encode_tokens`, `encode_prompts`, `stack_pooled`, `prompt_embeds_kwargs`), the kohya
    file (`writes_kohya`, `check_kohya_names`, `kohya_lora`, `modelspec_arch`) and sampling (`sample_steps`: the default
    denoising steps of the loaded model; `sampling_kwargs`: guidance and the negative prompt as the family's pipeline
    takes them).
    """

    name: str  # recorded in files: "sd1", "sdxl"
    label: str  # short, for messages: "SD 1.x"
    title: str  # long, for model cards: "Stable Diffusion 1.x"
    default_resolution: int
    pipeline_classes: tuple[str, ...]
    text_encoders: tuple[str, ...]  # pipeline attribute names, in order
    tokenizers: tuple[str, ...]
    # Whether prompts give a pooled embedding beside the per-token ones (and the denoiser takes it).
    uses_pooled: bool
    kohya_base_version: str  # `ss_base_model_version`: how A1111 files the LoRA
    kohya_te_prefixes: tuple[str, ...]  # kohya key prefix per text encoder
    kohya_unet_layout: str  # "diffusers" or "sgm": the module paths kohya names the UNet's layers by
    kohya_network_module: str  # `ss_network_module` of a kohya LoRA file: sd-scripts' module that trains it
    # modelspec (https://github.com/Stability-AI/ModelSpec) keys, as sd-scripts' library/sai_model_spec.py
    # writes them for LoRAs.
    modelspec_architecture: str
    modelspec_implementation: str
    # The token embedding's key per text encoder, as A1111 / ComfyUI / diffusers' scripts write them; an encoder
    # listed twice has its vector written under both keys (read by the first: `lora_format.embedding_keys`).
    embedding_keys: tuple[tuple[str, str], ...]
    hub_tag: str  # the Hub's tag for the family
    licenses: tuple[tuple[str, str], ...]  # (hub id, license) of the family's well-known base models
    single_file_key: str  # a key prefix only this family's single-file checkpoints have
    base_config: str  # the folder under models/base_configs/ a single file loads with
    tiny_model: str  # the `--model` name of its tiny random-weight model
    denoiser: str  # the pipeline attribute of the denoiser the LoRA trains: "unet", "transformer"
    lora_targets: tuple[str, ...]  # the denoiser's modules a LoRA wraps by default (`--target-modules`)
    sample_guidance: float  # `sdlora sample`'s default --guidance for the family's pipeline

    # ---- options

    def check_options(self, cfg: Any) -> None:
        """ConfigError (one line) for a resolved run config (`sdlora.config.Config`) asking for what the
        family cannot train; called as the base model loads, before any encoding."""

    def pivotal_tuning(self) -> bool:
        """Whether the token gets its own trained embedding by default (`embedding.train` unset) when the
        tokenizer splits it: train/embeddings.py covers the family's text encoders. A family that cannot
        train one at all refuses `embedding.train` in `check_options`."""
        return True

    def lora_text_encoders(self) -> tuple[str, ...]:
        """The text encoders (pipeline attributes, in `text_encoders`' order) `--train-text-encoder` puts a LoRA
        on: all of them by default. The others stay frozen; the loss still runs them when a text-encoder LoRA
        trains. Built, counted, checkpointed and exported in this order."""
        return self.text_encoders

    def pixel_multiple(self) -> int:
        """What every side of a training image must be a multiple of: one latent cell of the VAE's 8x for the
        UNets; 16 for the transformers, which cut the latents into 2 x 2 patches (train/resolve.py `check_sides`)."""
        return 8

    def prompt_windows(self, pipe: Any) -> list[tuple[str, Any, int]]:
        """(label, tokenizer, window) of each tokenizer whose window a caption or prompt must fit for the
        denoiser to read it: the window in ids, its special tokens included; the label names its tokens in
        messages. The UNet families: every CLIP tokenizer, 77."""
        return [
            ("CLIP", tokenizer, int(tokenizer.model_max_length))
            for tokenizer in (getattr(pipe, name, None) for name in self.tokenizers)
            if tokenizer is not None
        ]

    def modelspec_arch(self, denoiser_config: Any) -> str:
        """`modelspec.architecture` of a LoRA on the denoiser with this config: `modelspec_architecture`, for a
        family whose variants share one."""
        return self.modelspec_architecture

    def fsdp_blocks(self, denoiser: Any) -> tuple[str, ...]:
        """The denoiser's block class names FSDP shards as one unit each (train/fsdp.py). By default the
        diffusers model's own `_repeated_blocks` (FluxTransformerBlock / FluxSingleTransformerBlock,
        the UNet's BasicTransformerBlock), else its `_no_split_modules`."""
        return tuple(getattr(denoiser, "_repeated_blocks", None) or getattr(denoiser, "_no_split_modules", None) or ())

    # ---- the kohya / ComfyUI file (train/export.py)

    def writes_kohya(self, adapter_config: Any) -> bool:
        """Whether export writes the kohya/ComfyUI file beside the diffusers one for an adapter of this peft
        config (LoRA, DoRA, LoKr, LoHa)."""
        return True

    def check_kohya_names(
        self, paths: Mapping[str, Sequence[str]], denoiser_config: Any, text_encoders: Sequence[Any] | None
    ) -> None:
        """Raise (one line) for a LoRA module the kohya file could not name: pipeline component -> module
        paths, checked before training."""
        raise NotImplementedError

    def kohya_lora(
        self,
        lora: Mapping[str, Mapping[str, torch.Tensor]],
        alphas: Mapping[str, Mapping[str, float]],
        denoiser_config: Any,
        text_encoders: Sequence[Any] | None,
    ) -> dict[str, torch.Tensor]:
        """A LoRA (peft state dict and lora_alpha per module path, per pipeline component) in the kohya layout
        ComfyUI, AUTOMATIC1111 and sd-scripts read for the family."""
        raise NotImplementedError

    # ---- loading

    def matches_unet(self, unet_config: Mapping[str, Any]) -> bool:
        """Whether a denoiser config (a dict or diffusers FrozenDict) is this family's: the fallback when
        there is no pipeline class name to go by (`families.detect_family`)."""
        raise NotImplementedError

    def pipeline_cls(self) -> Any:
        """The diffusers pipeline class that loads the family."""
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for `from_pretrained` / `from_single_file`."""
        return {}

    def build_tiny(self) -> Any:
        """The family's tiny random-weight pipeline, built in memory (`--model <tiny_model>`)."""
        raise NotImplementedError

    def scale_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's posterior mean (B, C, H, W) as the latents the loop trains on, (B, C', h, w): what the
        family's pipeline does to latents before its denoiser sees them and undoes before decoding, so train/cache.py
        caches these. The default: shift, then the scaling factor (SD, SDXL, FLUX.1)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def training_objective(self, pipe: Any, train: Any) -> "Objective":
        """The training objective (train/objective.py) for the loaded `pipe` under the train settings
        `train` (`Config.train`): what the loop and the batch plan ask for timesteps, noisy input,
        target and loss weights. ConfigError (one line) for settings the objective cannot train."""
        raise NotImplementedError

    def denoise(
        self,
        denoiser: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The denoiser's prediction for `noisy` latents (B, C, h, w), in their shape: the one forward call
        the loop and validation make. `timesteps` are in the model's form (`Objective.model_timesteps`). A
        family whose denoiser takes its latents packed into tokens (FLUX) packs and unpacks here."""
        raise NotImplementedError

    # ---- prompt conditioning

    def tokenize(self, pipe: Any, prompts: Sequence[str]) -> list[torch.Tensor]:
        raise NotImplementedError

    def encode_tokens(
        self, text_encoders: Sequence[Any], token_ids: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def encode_prompts(self, pipe: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoders = [getattr(pipe, name) for name in self.text_encoders]
        return self.encode_tokens(encoders, self.tokenize(pipe, prompts))

    def stack_pooled(self, pooled: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
        """Per-prompt pooled embeddings as one (N, Dp) batch; None for a family without them."""
        return torch.stack(list(pooled)) if self.uses_pooled else None  # type: ignore[arg-type]

    def prompt_embeds_kwargs(
        self,
        pipe: Any,
        cond: tuple[torch.Tensor, torch.Tensor | None],
        negative: tuple[torch.Tensor, torch.Tensor | None],
        device: Any,
    ) -> dict[str, Any]:
        """Pipeline keyword arguments for one prompt from cached embeddings."""
        raise NotImplementedError

    # ---- sampling

    def sample_steps(self, pipe: Any) -> int:
        """The denoising steps the loaded `pipe` samples in when none are given (`sdlora sample --steps`, and
        `--validation-steps` up to its cap): its pipeline's default for the model, which a step- or guidance-
        distilled variant lowers. The UNet families: 30."""
        return 30

    def guidance_for(self, pipe: Any) -> float:
        """The guidance the loaded `pipe` samples at when none is given (`sdlora sample --guidance`,
        `--validation-guidance`): `sample_guidance`, for a family whose models share one."""
        return self.sample_guidance

    def sampling_kwargs(self, guidance: float | None, negative_prompt: Any) -> dict[str, Any]:
        """The pipeline's keyword arguments for `--guidance` and `--negative-prompt` (a string, a list of
        strings, or None): classifier-free guidance with the negative prompt for the UNet families. `guidance`
        None: not known yet (before the model loads: `guidance_for`); a refusal that depends on it waits."""
        return {"guidance_scale": guidance, "negative_prompt": negative_prompt}

    def prompt_kwargs(self, pipe: Any) -> dict[str, Any]:
        """What the pipeline must be told to encode a prompt as training does, where its own default differs
        (FLUX.1's T5 window for a tokenizer shorter than 512); passed with every `prompt=` the pipeline encodes."""
        return {}


class OnDevice:
    """A (possibly DDP-wrapped) text encoder with the `.device` that `Family.encode_tokens` reads."""

    def __init__(self, module: Any, device: torch.device):
        self.module, self.device = module, device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)
