"""A diffusers model folder's weights read one tensor at a time into the dtype they are kept in.

diffusers' `from_pretrained(dtype=...)` converts tensor by tensor too, but from a memory map of the whole
file: every float32 page it converts stays mapped, and counted in the process' memory, until the file is
done. A float32 SD 1.5 UNet loaded into bf16 that way peaks at 3.4 GB of mapped file plus its 1.7 GB of
bf16 (benchmarks/memory.py; a FLUX.1 transformer: 48 + 24 GB). Here each tensor is read with an
ordinary file read into a buffer of its own, converted, and the buffer freed: the peak is the model in its
storage dtype plus its largest tensor (a quantized model: each Linear layer quantized as soon as it is in). The model itself is built on the meta device (no memory) and takes
the converted tensors as its parameters.

Only safetensors files (one, or shards with their index) of a model whose keys match its class exactly;
anything else (.bin files, legacy key names) is left to diffusers' own `from_pretrained` (None here).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
# safetensors' dtype names (https://github.com/huggingface/safetensors, the format's header)
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _variant(name: str, variant: str | None) -> str:
    """`diffusion_pytorch_model.fp16.safetensors` for variant fp16: diffusers' naming (`_add_variant`)."""
    if variant is None:
        return name
    head, _, ext = name.rpartition(".")
    return f"{head}.{variant}.{ext}"


def weight_files(folder: Path, variant: str | None) -> list[Path] | None:
    """The safetensors files of a model folder (one, or the shards its index names), None when it has none."""
    single = folder / _variant(WEIGHTS, variant)
    if single.is_file():
        return [single]
    index = folder / _variant(INDEX, variant)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / shard for shard in shards]
    return None


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_tensors(path: Path, dtype_of: Callable[[str], torch.dtype | None]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one safetensors file, each read on its own into a buffer and converted to
    `dtype_of(name)` (None: as stored; integer tensors always are), the buffer freed before the next."""
    header, start = _header(path)
    with open(path, "rb") as f:
        for name, info in header.items():
            begin, end = info["data_offsets"]
            stored = DTYPES[info["dtype"]]
            buffer = bytearray(end - begin)
            f.seek(start + begin)
            f.readinto(buffer)
            tensor = (
                torch.frombuffer(buffer, dtype=stored).reshape(info["shape"])
                if buffer
                else torch.empty(info["shape"], dtype=stored)
            )
            wanted = dtype_of(name)
            if wanted is None or not stored.is_floating_point:
                yield name, tensor.clone()  # its own memory: the buffer goes
            else:
                yield name, tensor.to(wanted, copy=True)
            del buffer, tensor


def load_model(
    folder: Path,
    dtype: torch.dtype,
    variant: str | None = None,
    quantize: Callable[[torch.nn.Module], None] | None = None,
) -> Any | None:
    """The diffusers model (a UNet, a transformer) of `folder` (its config.json names the class), its floating
    weights in `dtype` (the class' `_keep_in_fp32_modules` in float32), read tensor by tensor; None where it
    has no safetensors weights or their keys are not exactly the model's (diffusers' loader then).

    `quantize` (models/precision.py) is given each Linear layer as soon as its tensors are in, so a
    quantized model never holds all its weights in `dtype` at once (a FLUX.1 transformer in fp8: 12 GB,
    not the 24 GB of bf16 first)."""
    import diffusers
    from accelerate import init_empty_weights

    from sdlora.devices import trim_heap

    files = weight_files(folder, variant)
    config_file = folder / "config.json"
    if files is None or not config_file.is_file():
        return None
    cls = getattr(diffusers, json.loads(config_file.read_text(encoding="utf-8")).get("_class_name", ""), None)
    if cls is None:
        return None
    with init_empty_weights():
        model = cls.from_config(cls.load_config(folder))
    headers = [_header(path)[0] for path in files]
    if {name for header in headers for name in header} != set(model.state_dict()):
        return None
    if any(info["dtype"] not in DTYPES for header in headers for info in header.values()):
        return None  # a dtype this reader does not know (U8 packs, F8_E8M0 scales, ...): diffusers' loader reads it
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())

    def dtype_of(name: str) -> torch.dtype:
        return torch.float32 if any(part in name.split(".") for part in keep) else dtype

    # Linear layer -> the names of its tensors still to come
    waiting = {
        layer: {f"{layer}.{name}" for name, _ in module.named_parameters(recurse=False)}
        for layer, module in model.named_modules()
        if quantize is not None and isinstance(module, torch.nn.Linear)
    }
    for path in files:
        for name, tensor in read_tensors(path, dtype_of):
            owner, _, attribute = name.rpartition(".")
            module = model.get_submodule(owner)
            if attribute in module._parameters:
                old = module._parameters[attribute]
                module._parameters[attribute] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
            else:
                module._buffers[attribute] = tensor
            if owner in waiting:
                waiting[owner].discard(name)
                if not waiting[owner]:
                    quantize(module)  # type: ignore[misc]
                    del waiting[owner]
                    trim_heap()  # the layer's bf16 weights: back to the OS, not kept in glibc's heap
    model.register_to_config(_name_or_path=str(folder))
    return model.eval()
