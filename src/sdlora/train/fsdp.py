"""FSDP: the denoiser sharded across the processes (`--accelerate-config` with `distributed_type: FSDP`).

Each of the denoiser's blocks (`Family.fsdp_blocks`: FLUX.1's FluxTransformerBlock and
FluxSingleTransformerBlock, the UNet's BasicTransformerBlock), or the classes the config's
`fsdp_transformer_layer_cls_to_wrap` names, is one FSDP2 unit (`torch.distributed.fsdp.fully_shard`),
and the rest of the model the root unit: every process holds 1/N of every weight, the LoRA's beside
the frozen base weights it sits in, and gathers a block's weights only for its forward and backward.

sdlora shards the model itself, with the settings of accelerate's `FullyShardedDataParallelPlugin`
(read from the config by `accelerate launch`), instead of through `Accelerator.prepare`:
- accelerate (1.16) uses its FSDP plugin only on GPUs: on a CPU the processes are `MULTI_CPU` and
  `prepare` wraps the model in DDP, silently;
- `prepare` replaces the parameters after the optimizer was built on them, so the LoRA+ groups, the
  EMA and the gradient norms would hold the old ones. Here the model is sharded before any of those
  take its parameters, the same way on a CPU (gloo) and on GPUs (NCCL).
Only FSDP2 (`fsdp_version: 2`): FSDP1's flat parameters mix the trained and the frozen weights.

The weights are whole where a file or one process needs them: `gathered` (validation, samples, the
exported LoRA and the checkpoint's LoRA weights) and `full_tensors` (the optimizer's and EMA's state),
so a checkpoint is the same files as a one-process run's and resumes with any number of processes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from sdlora.errors import ConfigError

# accelerate's `distributed_type` values; with no CUDA GPU only the first three can run.
CPU_TYPES = ("NO", "MULTI_CPU", "FSDP")
GPU_TYPES = ("MULTI_GPU", "DEEPSPEED", "MEGATRON_LM", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "XLA")


def read_accelerate_config(path: Path, *, has_gpu: bool) -> dict[str, Any]:
    """An accelerate config file, checked before any process starts; one ConfigError line naming the file."""
    from sdlora import yamlfile

    data = yamlfile.read(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not an accelerate config (expected keys such as distributed_type: FSDP)")
    kind = str(data.get("distributed_type", "NO"))
    if kind not in CPU_TYPES + GPU_TYPES:
        raise ConfigError(f"{path}: unknown distributed_type {kind!r} (one of {', '.join(CPU_TYPES + GPU_TYPES)})")
    gpu_ids = data.get("gpu_ids")
    asks_gpu = kind in GPU_TYPES or (gpu_ids not in (None, "all", "") and not data.get("use_cpu"))
    if asks_gpu and not has_gpu:
        what = f"distributed_type: {kind}" if kind in GPU_TYPES else f"gpu_ids: {gpu_ids}"
        raise ConfigError(
            f"{path}: asks for GPUs ({what}) and this machine has no CUDA GPU; "
            "use distributed_type: FSDP or MULTI_CPU, or leave --accelerate-config out"
        )
    if kind == "FSDP":
        _check_fsdp(path, data.get("fsdp_config") or {})
    processes = data.get("num_processes", 1)
    if not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"{path}: num_processes must be a whole number of at least 1, got {processes!r}")
    return data


def _check_fsdp(path: Path, fsdp: Any) -> None:
    if not isinstance(fsdp, dict):
        raise ConfigError(f"{path}: fsdp_config must be a mapping of fsdp_* keys")
    if str(fsdp.get("fsdp_version", 1)) != "2":
        raise ConfigError(
            f"{path}: sdlora shards with FSDP2 only; set fsdp_config.fsdp_version: 2 "
            "(FSDP1's flat parameters mix the LoRA's trained weights with the frozen base)"
        )
    policy = str(fsdp.get("fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"))
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
        raise ConfigError(
            f"{path}: fsdp_auto_wrap_policy {policy} is not supported; use TRANSFORMER_BASED_WRAP "
            "(one unit per transformer block) or NO_WRAP"
        )
    if fsdp.get("fsdp_activation_checkpointing"):
        raise ConfigError(f"{path}: fsdp_activation_checkpointing is not supported; use --gradient-checkpointing")


# ----------------------------------------------------------------------------- in the workers


def requested() -> bool:
    """Whether `accelerate launch` started this process with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_run(cfg: Any) -> None:
    """What FSDP does not train here: one ConfigError line, before the model loads."""
    if cfg.train.mixed_precision == "fp16":
        raise ConfigError("FSDP: --mixed-precision fp16 is not supported (its grad scaler is not sharded); use bf16")
    if cfg.lora.train_text_encoder:
        raise ConfigError("FSDP shards the denoiser only: leave --train-text-encoder out")
    if cfg.train.base_precision in (
        "fp8",
        "nf4",
    ):  # FSDP cuts every weight in rows; a quantized one is not a plain tensor
        raise ConfigError(f"FSDP: --base-precision {cfg.train.base_precision} is not sharded here; use bf16")
    import accelerate
    from accelerate.utils import FullyShardedDataParallelPlugin

    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401 - public from torch 2.6
    except ImportError:
        raise ConfigError(
            f"FSDP needs torch 2.6 or newer (FSDP2's fully_shard); this is torch {torch.__version__}"
        ) from None
    if "fsdp_version" not in FullyShardedDataParallelPlugin.__dataclass_fields__:  # FSDP2 settings: accelerate 1.6
        raise ConfigError(f"FSDP needs accelerate 1.6 or newer; this is accelerate {accelerate.__version__}")


def _plugin(accelerator: Any) -> Any:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:  # a CPU: accelerate left the plugin out; the same settings from the launcher's variables
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
    return plugin


def shards(accelerator: Any) -> bool:
    """Whether this run shards its denoiser: FSDP asked for, on several processes."""
    return requested() and accelerator.num_processes > 1


def denoiser_device(accelerator: Any) -> Any:
    """Where the LoRA is put on the frozen denoiser: the run's device, or, when it will be sharded, None (it
    stays in host memory and `fully_shard` moves it to the device block by block, each block's whole weights
    only until they are cut into shards, so a denoiser larger than one card can be sharded)."""
    return None if shards(accelerator) else accelerator.device


def shard(model: torch.nn.Module, arch: Any, accelerator: Any) -> torch.nn.Module:
    """Shard `model` in place (FSDP2) when FSDP was asked for and there are several processes; else as is.
    Call it before anything holds the model's parameters (optimizer, EMA, parameter groups)."""
    if not shards(accelerator):
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = _plugin(accelerator)
    wrap_blocks = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP") != "NO_WRAP"
    names = tuple(plugin.transformer_cls_names_to_wrap or arch.fsdp_blocks(model)) if wrap_blocks else ()
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    # No casting policy: the forward runs under the run's autocast, as without FSDP (the LoRA stays float32).
    options = {
        "mesh": mesh,
        "reshard_after_forward": plugin.reshard_after_forward is not False,
        "mp_policy": MixedPrecisionPolicy(),
    }
    if plugin.cpu_offload is not None:
        options["offload_policy"] = plugin.cpu_offload
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if names and not blocks:
        raise ConfigError(f"FSDP: the {arch.label} denoiser has no block of the classes {', '.join(names)} to shard")
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    if accelerator.mixed_precision != "no":  # what accelerate's prepare would add
        model.forward = accelerator.autocast()(model.forward)
    return model


def prepare(accelerator: Any, unet: Any, encoders: Sequence[Any], optimizer: Any) -> tuple[Any, list[Any], Any]:
    """`accelerator.prepare` for an unsharded model; a sharded one (and its optimizer) stays as it is."""
    if is_sharded(unet):
        return unet, list(encoders), optimizer
    unet, *prepared, optimizer = accelerator.prepare(unet, *encoders, optimizer)
    return unet, prepared, optimizer


def is_sharded(model: Any) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch before 2.6, or built without torch.distributed: nothing is ever sharded
        return False
    return isinstance(model, FSDPModule)


def no_sync(accelerator: Any, model: Any) -> Any:
    """No gradient reduction in this backward (an accumulation micro-batch before the last)."""
    if is_sharded(model):
        return _requires_sync(model, False)
    return accelerator.no_sync(model)


@contextlib.contextmanager
def _requires_sync(model: Any, value: bool) -> Iterator[None]:
    model.set_requires_gradient_sync(value)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(not value)


def _units(model: Any) -> list[Any]:
    return [m for m in model.modules() if is_sharded(m)]


def units(model: Any) -> int:
    """How many FSDP units shard `model` (its blocks and the root); 0 when it is not sharded."""
    return len(_units(model)) if is_sharded(model) else 0


@contextlib.contextmanager
def gathered(model: Any) -> Iterator[None]:
    """A sharded model's whole weights on every process, as plain parameters, inside the block: the main
    process alone may then run it (validation, samples) or read its state dict (the LoRA's files).
    Every process must enter it (the gathering is collective). Nothing for an unsharded model."""
    if not is_sharded(model):
        yield
        return
    units = _units(model)
    for unit in units:
        unit.unshard()
    for unit in units:  # a forward must not give its block's weights back (that would be collective again)
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def gathered_state_dict(model: Any) -> dict[str, torch.Tensor] | None:
    """Inside `gathered`: a sharded model's whole parameters by name, for peft's `get_peft_model_state_dict`
    (the model's own `state_dict()` would give the shards back: FSDP2's hook reshards first); None for an
    unsharded model (its `state_dict()` is whole)."""
    if not is_sharded(model):
        return None
    return dict(model.named_parameters())


def full_tensors(value: Any) -> Any:
    """`value` (a state dict, nested) with every sharded tensor whole; collective: call it on every process."""
    if hasattr(value, "full_tensor"):
        return value.full_tensor()
    if isinstance(value, dict):
        return {key: full_tensors(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full_tensors(item) for item in value)
    return value


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor (read from a file by every process) as this process's shard of `param`."""
    if not hasattr(param, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    value = value.to(device=param.device, dtype=param.dtype)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def shard_optimizer_state(saved: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """An optimizer state dict with whole tensors (a checkpoint's) as this process's shards."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(hasattr(p, "device_mesh") for p in params):
        return saved
    state = {}
    for index, entry in saved["state"].items():
        param = params[int(index)]
        state[index] = {
            key: like(value, param) if isinstance(value, torch.Tensor) and value.shape == param.shape else value
            for key, value in entry.items()
        }
    return {**saved, "state": state}


def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Clip the gradients to `max_norm` as torch's clip_grad_norm_ does; sharded gradients with `total_norm`,
    the whole gradient's norm (monitor.group_grad_norms), which torch's cannot mix with unsharded ones."""
    if not any(hasattr(p.grad, "device_mesh") for p in params if p.grad is not None):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    coef = min(1.0, max_norm / (total_norm + 1e-6))
    if coef < 1.0:
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
