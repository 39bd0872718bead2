"""The models a run trains: the base pipeline and its noise schedule, LoRA adapters on the UNet (and
text encoders), and the frozen text encoders the token's own embedding trains through.

Frozen weights sit on the device in the compute dtype (the denoiser's in its `--base-precision` storage,
set as it loads); the trainable LoRA weights are float32 (fp16 or bf16 weights would lose their small
updates). Target modules that do not exist are a ConfigError
naming the option.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from sdlora.config import Config
from sdlora.errors import ConfigError
from sdlora.events import OnEvent
from sdlora.models.families import Family
from sdlora.train.objective import Objective

ADAPTER = "default"


def load_base(cfg: Config, emit: OnEvent, examples: Sequence[Any] = ()) -> tuple[Any, Family, Objective]:
    """The base pipeline, its architecture and its training objective (train/objective.py); what the family
    cannot train, the `examples`' sizes included, refused in one line first.

    The denoiser loads straight into its storage dtype (`--base-precision`, models/precision.py: the
    compute dtype, bf16, or fp8 / nf4 quantized from it), weight by weight; the encoders and the VAE in
    float32, as they encode. The family gives the objective from the model's own scheduler (a UNet's
    noise schedule and target: epsilon or v-prediction).
    """
    from sdlora.models.loading import TINY_WARNING, default_resolution, is_tiny, load_pipeline
    from sdlora.models.precision import storage_dtype
    from sdlora.train.resolve import check_sides, weight_dtype

    pipe, arch = load_pipeline(
        cfg.model.name,
        revision=cfg.model.revision,
        variant=cfg.model.variant,
        vae=cfg.model.vae,
        dtype=torch.float32,
        denoiser_dtype=storage_dtype(cfg.train.base_precision, weight_dtype(cfg)),
        base_precision=cfg.train.base_precision,
    )
    pipe.set_progress_bar_config(disable=True)
    arch.check_options(cfg)  # what the family cannot train: one line, before any encoding
    check_sides(arch, examples)
    try:
        objective = arch.training_objective(pipe, cfg.train)
    except ConfigError as error:
        raise ConfigError(f"{cfg.model.name}: {error}") from None
    if is_tiny(cfg.model.name):
        emit({"event": "warning", "message": TINY_WARNING})
    native = default_resolution(cfg.model.name, arch)
    if cfg.data.resolution != native:
        emit(
            {
                "event": "warning",
                "message": f"training at {cfg.data.resolution} px; {cfg.model.name} was made for {native} px",
            }
        )
    return pipe, arch, objective


def vae_reloadable(cfg: Config) -> bool:
    """Whether the base model's VAE can be loaded again on its own (`reload_vae`): not for the tiny
    models, which are built in memory."""
    from sdlora.models.loading import is_tiny

    return not is_tiny(cfg.model.name)


def reload_vae(cfg: Config, dtype: torch.dtype) -> Any:
    """The VAE of `load_base`'s pipeline, loaded again from the same files in `dtype`: released after
    encoding, it comes back only while validation decodes its sample images."""
    from sdlora.models.loading import load_base_vae

    return load_base_vae(
        cfg.model.name, revision=cfg.model.revision, variant=cfg.model.variant, vae=cfg.model.vae, dtype=dtype
    )


HIGH_RANK = 128  # above this a warning: files and memory grow with the rank, quality rarely does


def _targeted(model: Any, targets: Sequence[str]) -> list[tuple[str, int]]:
    """(module name, width) of each layer of `model` a LoRA on `targets` would wrap (peft's name
    matching: the name itself or its dotted suffix); width = the smaller of its input and output sizes."""
    found = []
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        sizes = [getattr(module, a, None) for a in ("in_features", "out_features", "in_channels", "out_channels")]
        sizes = [s for s in sizes if isinstance(s, int)]
        if sizes:
            found.append((name, min(sizes)))
    return found


def denoiser_label(arch: Family) -> str:
    """How messages name the family's denoiser: "UNet", "transformer"."""
    return "UNet" if arch.denoiser == "unet" else arch.denoiser


def check_rank(cfg: Config, pipe: Any, arch: Family, emit: OnEvent) -> None:
    """`--rank` no larger than the narrowest targeted layer (a wider LoRA only costs time and memory);
    a warning above `HIGH_RANK`. Runs before the encoders, on the loaded base model."""
    rank = cfg.lora.rank
    models = [(denoiser_label(arch), getattr(pipe, arch.denoiser), cfg.lora.target_modules)]
    if cfg.lora.train_text_encoder:
        models += [
            (name, getattr(pipe, name), cfg.lora.text_encoder_target_modules) for name in arch.lora_text_encoders()
        ]
    layers = [(what, name, width) for what, model, targets in models for name, width in _targeted(model, targets)]
    if layers:
        what, name, width = min(layers, key=lambda layer: layer[2])
        if rank > width:
            raise ConfigError(
                f"--rank {rank}: larger than the narrowest targeted layer ({what} {name}, {width} wide); "
                f"give --rank {width} or less (4-64 suits most objects)"
            )
    if rank > HIGH_RANK:
        emit(
            {
                "event": "warning",
                "message": f"--rank {rank} is high: larger files, more memory and slower steps, rarely better "
                "than 16-64",
            }
        )


def token_embedding(cfg: Config, pipe: Any, arch: Family) -> Any:
    """Pivotal tuning (`embedding.train`): the token joins the tokenizers with vectors of its own to train
    (`TokenEmbeddings`, train/embeddings.py); None when only the LoRA trains."""
    if not cfg.embedding.train:
        return None
    from sdlora.train.embeddings import add_token

    return add_token(pipe, arch, str(cfg.data.token), str(cfg.embedding.init_token))


def inject_lora(
    cfg: Config, pipe: Any, arch: Family, device: Any, weight_dtype: torch.dtype, denoiser_device: Any
) -> tuple[Any, list[Any]]:
    """LoRA on the UNet (and text encoders): frozen weights in the compute dtype (the denoiser's as `load_base`
    stored it: `--base-precision`), trainable ones in float32; the denoiser on `denoiser_device` (None: where it
    is; train/fsdp.py `denoiser_device`), the encoders on `device`.

    Returns the UNet and the text encoders being trained (the family's `lora_text_encoders`; none without
    `--train-text-encoder`), in training mode.
    """
    from diffusers.training_utils import cast_training_params

    from sdlora.models.precision import keep_from_ddp

    unet = getattr(pipe, arch.denoiser)  # the denoiser: a UNet or a transformer ("unet" in the loop's names)
    unet.requires_grad_(False)
    # Its dtype is its storage's since the load (a cast would undo a quantized one's weights).
    unet.to(denoiser_device)
    add_lora(unet, cfg.lora.target_modules, cfg, "--target-modules", denoiser_label(arch))
    keep_from_ddp(unet)  # a quantized base's weights: not broadcast when accelerate wraps it in DDP
    encoders = []
    if cfg.lora.train_text_encoder:
        for name in arch.lora_text_encoders():
            encoder = getattr(pipe, name)
            encoder.requires_grad_(False)
            encoder.to(device, dtype=weight_dtype)
            add_lora(encoder, cfg.lora.text_encoder_target_modules, cfg, "lora.text_encoder_target_modules", name)
            encoders.append(encoder)
    # fp16/bf16 LoRA weights would underflow their updates ("Attempting to unscale FP16 gradients").
    cast_training_params([unet, *encoders], dtype=torch.float32)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in encoders:
            encoder.gradient_checkpointing_enable()
    for model in (unet, *encoders):
        model.train()
    return unet, encoders


def frozen_encoders(
    cfg: Config, tokens: Any, trained: Sequence[Any], pipe: Any, arch: Family, device: Any, weight_dtype: torch.dtype
) -> list[Any]:
    """The token's vectors to the device; and the text encoders the loss runs without a LoRA, frozen on the
    device, in the family's order: with a text-encoder LoRA, those the family trains none on (FLUX.1's T5:
    `Family.lora_text_encoders`); else, while the token's vectors train, all of them, for the vectors to train
    through. None when the loss reads cached text embeddings."""
    if tokens is not None:
        tokens.to(device)
    if not (tokens is not None or cfg.lora.train_text_encoder):
        return []
    lora = set(arch.lora_text_encoders()) if trained else set()
    encoders = []
    for name in arch.text_encoders:
        if name in lora:
            continue
        encoder = getattr(pipe, name)
        encoder.requires_grad_(False)
        encoder.to(device, dtype=weight_dtype)
        encoders.append(encoder)
    return encoders


def adapter_config(cfg: Config, targets: Sequence[str]) -> Any:
    """The peft config of `--lora-type`: LoraConfig (LoRA, DoRA), LoKrConfig or LoHaConfig (LyCORIS'
    algorithms as peft ships them; the delta starts at zero, like a LoRA's)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if cfg.lora.lora_type == "lokr":
        return LoKrConfig(
            r=cfg.lora.rank,
            alpha=cfg.effective_alpha,
            target_modules=list(targets),
            decompose_factor=cfg.lora.lokr_factor or -1,  # -1: LyCORIS' automatic factor
            decompose_both=cfg.lora.lokr_decompose_both,
            init_weights=True,
        )
    if cfg.lora.lora_type == "loha":
        return LoHaConfig(r=cfg.lora.rank, alpha=cfg.effective_alpha, target_modules=list(targets), init_weights=True)
    return LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.effective_alpha,
        lora_dropout=cfg.lora.dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets),
        use_dora=cfg.lora.dora,
    )


def add_lora(model: Any, targets: list[str], cfg: Config, flag: str, what: str) -> None:
    """A LoRA (DoRA, LoKr or LoHa: `adapter_config`) adapter named "default" on `model`'s `targets`; ConfigError naming `flag` when none match."""
    lora = adapter_config(cfg, targets)
    try:
        if hasattr(model, "set_adapters"):  # diffusers models: their own peft integration
            model.add_adapter(lora)
        else:
            # transformers' `add_adapter` insists on a newer peft than it needs; inject directly and
            # record the config where `get_peft_model_state_dict` (export) looks for it.
            from peft import inject_adapter_in_model

            inject_adapter_in_model(lora, model, ADAPTER)
            model.peft_config = {ADAPTER: lora}
    except ValueError as exc:
        if "not found" in str(exc).lower() or "target modules" in str(exc).lower():
            raise ConfigError(
                f"{flag} {','.join(targets)}: no such modules in the {what} "
                f"(UNet attention: to_q,to_k,to_v,to_out.0; feed-forward: ff.net.0.proj,ff.net.2)"
            ) from None
        raise
