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
from sdlora.lora_format import META_PREFIX, PEFT_CONFIG, STEPS, embedding_keys
from sdlora.models.families import Family
from sdlora.run import DIFFUSERS_LORA, EMBEDDINGS, RunInfo
from sdlora.safetensors_io import check, load_file, read_metadata

ADAPTER = "sdlora"

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


def resolve_lora(run: RunInfo, lora: str | Path | None) -> Path:
    """The LoRA file to sample with, absolute: the diffusers file of `None` / `lora` / `best` (folders of
    the run) or of a LoRA folder, or a named .safetensors file, exactly that one (RunError if it is not there)."""
    if lora is None or str(lora) in ("lora", "best"):
        return (run.lora_dir(str(lora or "lora")) / DIFFUSERS_LORA).resolve()
    path = Path(lora).expanduser()
    if path.is_dir():
        if not (path / DIFFUSERS_LORA).is_file():
            raise RunError(
                f"--lora {lora}: no {DIFFUSERS_LORA} there (give lora, best, a LoRA folder or a .safetensors file)"
            )
        return (path / DIFFUSERS_LORA).resolve()
    if path.suffix != ".safetensors":
        raise RunError(f"--lora {lora}: no such folder or .safetensors file (give lora, best, a LoRA folder or file)")
    if not path.is_file():
        raise RunError(f"--lora {lora}: no such file")
    return path.resolve()


def resolve_lora_dir(run: RunInfo, lora: str | Path | None) -> Path:
    """The folder of `resolve_lora`'s file (where a token embedding beside it is looked for)."""
    return resolve_lora(run, lora).parent


def lora_file(lora: Path) -> Path:
    """A LoRA given as its file (used as named) or its folder (the diffusers file in it)."""
    lora = Path(lora)
    return lora if lora.suffix == ".safetensors" and not lora.is_dir() else lora / DIFFUSERS_LORA


def check_lora_files(lora: Path, *, embedding: bool = True) -> None:
    """RunError in one line if the LoRA file (`lora_file(lora)`) or the embedding beside it is missing,
    truncated or not safetensors, or if the two are not one export's pair. `embedding` False: the
    embedding is not used, so it is not checked."""
    path = lora_file(lora)
    lora_meta = check(path, "LoRA file")
    if embedding and (path.parent / EMBEDDINGS).is_file():
        check_same_step(path, lora_meta, check(path.parent / EMBEDDINGS, "token embedding"))


def check_same_step(lora_path: Path, lora_meta: dict[str, str], embedding_meta: dict[str, str]) -> None:
    """RunError when the LoRA and the token embedding beside it come from different steps (an older sdlora's
    export cut short): the LoRA was trained with that step's embedding, so the pair would sample wrong.
    Files without sdlora's step (written elsewhere) are not compared."""
    lora_step, embedding_step = lora_meta.get(STEPS), embedding_meta.get(STEPS)
    if lora_step is not None and embedding_step is not None and lora_step != embedding_step:
        raise RunError(
            f"{lora_path.parent}: {lora_path.name} is from step {lora_step} but {EMBEDDINGS} from step "
            f"{embedding_step} (a save was cut short); they only work as a pair: export both again "
            "(sdlora train --resume on the run writes lora/ from its newest checkpoint) or train again"
        )


@dataclass
class LoadedLora:
    """What `load_lora` put into a pipeline, and how to take it out again for the baseline."""

    files: list[str]
    base_tokenizers: dict[str, Any] = field(default_factory=dict)  # tokenizers before the embedding was added


def load_lora(pipe: Any, arch: Family, lora: Path, token: str, *, embedding: bool = True) -> LoadedLora:
    """Load a LoRA file (`lora_file(lora)`: diffusers/peft keys, or kohya keys from any trainer, which
    diffusers converts for SD 1.x and SDXL), and a textual-inversion embedding beside it, into `pipe`.
    `embedding` False: the LoRA alone, the token left as the base model's tokenizer splits it (what the
    LoRA learned without its token's trained embedding).

    Both files are checked whole first (`sdlora.safetensors_io`): a damaged file is named as damaged,
    not blamed on the base model, and nothing is loaded from it."""
    check_lora_files(lora, embedding=embedding)
    path = lora_file(lora)
    embeddings = path.parent / EMBEDDINGS
    metadata = read_metadata(path, "LoRA file")
    try:
        if PEFT_CONFIG in metadata:
            _load_peft_adapters(pipe, path)  # LoKr / LoHa: diffusers' loader reads no LyCORIS
        else:
            with _quiet_diffusers():  # "No LoRA keys associated to CLIPTextModel": expected for a UNet-only LoRA
                pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=ADAPTER)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        ours = any(key.startswith(META_PREFIX) for key in metadata)
        hint = (
            "was it trained on another base model?"
            if ours
            else f"is it a LoRA for {arch.name}? diffusers reads diffusers/peft and kohya LoRA files"
        )
        raise RunError(f"{path}: cannot be loaded into {arch.name} ({str(exc).splitlines()[0][:200]}); {hint}") from exc
    loaded = LoadedLora(files=[str(path.resolve())])
    if embedding and embeddings.is_file():
        # The embedding only adds tokenizer entries and new rows to the embedding matrix, so the
        # untouched tokenizers give exactly the base model's text encoding (the baseline).
        loaded.base_tokenizers = {name: copy.deepcopy(getattr(pipe, name)) for name in arch.tokenizers}
        load_embeddings(pipe, arch, embeddings, token)
        loaded.files.append(str(embeddings.resolve()))
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


def load_embeddings(pipe: Any, arch: Family, path: Path, token: str) -> None:
    """A textual-inversion embedding for `token`, keys as `sdlora.lora_format.embedding_keys` names them: one
    tensor per text encoder (SDXL: `clip_l` + `clip_g`), or SD 1.x's single `emb_params`."""
    state, _ = load_file(path, "token embedding")
    keys = embedding_keys(arch)  # text encoder attribute -> file key, in the architecture's order
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
    run: RunInfo, lora: Path, options: SamplerOptions, scheduler: str | None = None, *, embedding: bool = True
) -> tuple[Any, Family, torch.device, LoadedLora]:
    """The run's base model with a LoRA (file or folder, `load_lora`; `embedding` False: without the token
    embedding beside it) loaded, on its device: (pipe, arch, device, loaded files).

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
    loaded = load_lora(pipe, arch, lora, run.token, embedding=embedding)
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
