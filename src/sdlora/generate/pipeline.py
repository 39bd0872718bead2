"""The sampling pipeline: the run's base model with its LoRA (and token embedding) loaded, the
scheduler, precision and memory options, and the base model alone for the baseline."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from sdlora.devices import resolve_device
from sdlora.errors import ConfigError, ModelError, RunError
from sdlora.models.arch import Architecture
from sdlora.run import DIFFUSERS_LORA, EMBEDDINGS, RunInfo
from sdlora.safetensors_io import check, load_file, read_metadata
from sdlora.train.embeddings import file_keys
from sdlora.train.export import META_PREFIX

ADAPTER = "sdlora"
PEFT_CONFIG = f"{META_PREFIX}peft_config"  # in a LoKr/LoHa run's peft-format file (train/export.py)

# --scheduler names -> (diffusers class, extra config). Built with from_config(pipe.scheduler.config),
# so each keeps the model's own noise schedule (betas, prediction type, timestep spacing).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on CUDA (half the memory, tensor cores), fp32 elsewhere (CPU fp16 is slow or unsupported)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def scheduler_key(name: str) -> str:
    """The SCHEDULERS key for a --scheduler name (`dpmpp` is accepted for `dpm++`); ConfigError if unknown."""
    key = name.strip().lower().replace("dpmpp", "dpm++").replace("-", "_")
    if key not in SCHEDULERS:
        raise ConfigError(f"--scheduler {name}: unknown scheduler; choose one of {', '.join(SCHEDULERS)}")
    return key


def make_scheduler(name: str, current: Any) -> Any:
    """The scheduler `name` (see SCHEDULERS), configured from the model's scheduler."""
    import diffusers

    cls_name, extra = SCHEDULERS[scheduler_key(name)]
    return getattr(diffusers, cls_name).from_config(current.config, **extra)


def resolve_lora_dir(run: RunInfo, lora: str | Path | None) -> Path:
    """`None` / `lora` / `best` (folders of the run) or a path to a folder or .safetensors file."""
    if lora is None or str(lora) in ("lora", "best"):
        return run.lora_dir(str(lora or "lora"))
    path = Path(lora)
    folder = path.parent if path.suffix == ".safetensors" else path
    if not (folder / DIFFUSERS_LORA).is_file():
        raise RunError(f"--lora {lora}: no {DIFFUSERS_LORA} there (give lora, best, or a LoRA folder)")
    return folder


def check_lora_files(lora_dir: Path) -> None:
    """RunError in one line if the LoRA file (or the embedding beside it) is missing, truncated or not safetensors."""
    check(lora_dir / DIFFUSERS_LORA, "LoRA file")
    if (lora_dir / EMBEDDINGS).is_file():
        check(lora_dir / EMBEDDINGS, "token embedding")


@dataclass
class LoadedLora:
    """What `load_lora` put into a pipeline, and how to take it out again for the baseline."""

    files: list[str]
    base_tokenizers: dict[str, Any] = field(default_factory=dict)  # tokenizers before the embedding was added


def load_lora(pipe: Any, arch: Architecture, lora_dir: Path, token: str) -> LoadedLora:
    """Load the diffusers-format LoRA (and a textual-inversion embedding beside it) into `pipe`.

    Both files are checked whole first (`sdlora.safetensors_io`): a damaged file is named as damaged,
    not blamed on the base model, and nothing is loaded from it."""
    check_lora_files(lora_dir)
    embeddings = lora_dir / EMBEDDINGS
    try:
        if PEFT_CONFIG in read_metadata(lora_dir / DIFFUSERS_LORA, "LoRA file"):
            _load_peft_adapters(pipe, lora_dir / DIFFUSERS_LORA)  # LoKr / LoHa: diffusers' loader reads no LyCORIS
        else:
            with _quiet_diffusers():  # "No LoRA keys associated to CLIPTextModel": expected for a UNet-only LoRA
                pipe.load_lora_weights(lora_dir, weight_name=DIFFUSERS_LORA, adapter_name=ADAPTER)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise RunError(
            f"{lora_dir / DIFFUSERS_LORA}: cannot be loaded into {arch.name} "
            f"({str(exc).splitlines()[0][:200]}); was it trained on another base model?"
        ) from exc
    loaded = LoadedLora(files=[str(lora_dir / DIFFUSERS_LORA)])
    if embeddings.is_file():
        # The embedding only adds tokenizer entries and new rows to the embedding matrix, so the
        # untouched tokenizers give exactly the base model's text encoding (the baseline).
        loaded.base_tokenizers = {name: copy.deepcopy(getattr(pipe, name)) for name in arch.tokenizers}
        load_embeddings(pipe, arch, embeddings, token)
        loaded.files.append(str(embeddings))
    return loaded


def _load_peft_adapters(pipe: Any, path: Path) -> None:
    """A LoKr/LoHa run's file (train/export.py writes peft keys under component prefixes and each
    component's peft config in `sdlora.peft_config`): each adapter injected as peft builds it, then its
    weights. Named ADAPTER in the components' `peft_config`, so `set_adapters` / `disable_lora` (the
    LoRA scale, the baseline) work as for a LoRA."""
    import json

    from peft import get_peft_config, inject_adapter_in_model, set_peft_model_state_dict

    tensors, header = load_file(path, "LoRA file")
    for name, config_dict in json.loads(header[PEFT_CONFIG]).items():
        model = getattr(pipe, name)
        config = get_peft_config(config_dict)
        if hasattr(model, "set_adapters"):  # a diffusers model: its own peft integration
            model.add_adapter(config, adapter_name=ADAPTER)
        else:  # a transformers text encoder: inject, and record it where diffusers looks
            inject_adapter_in_model(config, model, ADAPTER)
            model.peft_config = {ADAPTER: config}
            model._hf_peft_config_loaded = True
        prefix = f"{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
        if getattr(result, "unexpected_keys", None):
            raise KeyError(f"{len(result.unexpected_keys)} weights fit no {config.peft_type} layer of {name}")


def load_embeddings(pipe: Any, arch: Architecture, path: Path, token: str) -> None:
    """A textual-inversion embedding for `token`, keys as `train.embeddings.file_keys` names them: one
    tensor per text encoder (SDXL: `clip_l` + `clip_g`), or SD 1.x's single `emb_params`."""
    state, _ = load_file(path, "token embedding")
    keys = file_keys(arch)  # text encoder attribute -> file key, in the architecture's order
    tokenizers = dict(zip(arch.text_encoders, arch.tokenizers))
    try:
        if len(keys) > 1 and set(keys.values()) <= set(state):
            for encoder, key in keys.items():
                pipe.load_textual_inversion(
                    state[key],
                    token=token,
                    text_encoder=getattr(pipe, encoder),
                    tokenizer=getattr(pipe, tokenizers[encoder]),
                )
        else:
            pipe.load_textual_inversion(str(path), token=token)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise RunError(
            f"{path}: not a textual-inversion embedding for {arch.name} ({str(exc).splitlines()[0][:200]})"
        ) from exc


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(max(level, diffusers_logging.ERROR))  # never louder than the CLI set it
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


@contextlib.contextmanager
def base_model_only(pipe: Any, loaded: LoadedLora) -> Iterator[None]:
    """The pipeline without the LoRA (and without a learned token embedding), restored afterwards."""
    trained = {name: getattr(pipe, name) for name in loaded.base_tokenizers}
    pipe.disable_lora()
    for name, tokenizer in loaded.base_tokenizers.items():
        setattr(pipe, name, tokenizer)
    try:
        yield
    finally:
        for name, tokenizer in trained.items():
            setattr(pipe, name, tokenizer)
        pipe.enable_lora()


@dataclass
class SamplerOptions:
    """How to run the pipeline: device, precision and the memory savers for small GPUs."""

    device: str | None = None
    dtype: str = "auto"
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False


def prepare_pipeline(
    run: RunInfo, lora_dir: Path, options: SamplerOptions, scheduler: str | None = None
) -> tuple[Any, Architecture, torch.device, LoadedLora]:
    """The run's base model with its LoRA loaded, on its device: (pipe, arch, device, loaded files).

    Attention runs through PyTorch's scaled_dot_product_attention (diffusers' default processor),
    which picks flash / memory-efficient kernels on GPUs.
    """
    from sdlora.models import load_pipeline

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if scheduler is not None:
        scheduler_key(scheduler)  # bad options fail before the model loads
    if options.cpu_offload and device.type == "cpu":
        raise ConfigError("--cpu-offload needs a GPU (it moves each model to the GPU only while it runs)")
    pipe, arch = load_pipeline(run.model, revision=run.revision, variant=run.variant, vae=run.vae, dtype=dtype)
    loaded = load_lora(pipe, arch, lora_dir, run.token)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler)
    if options.attention_slicing:
        pipe.enable_attention_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        try:
            pipe.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise ModelError(f"--device {device}: cannot move the model there ({str(exc).splitlines()[0]})") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe, arch, device, loaded
