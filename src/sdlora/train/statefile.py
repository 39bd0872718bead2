"""A state dict as two files we write and read ourselves: `<name>.safetensors` and `<name>.json`. No pickle.

Checkpoints hold optimizer, LR-scheduler, grad-scaler and RNG states (train/checkpoint.py). Their
`state_dict()`s are nests of dicts, lists, tuples, numbers, strings and tensors (numpy arrays in
numpy's RNG state). `save_state` puts every tensor in the safetensors file and the structure in the
JSON file, with a tensor as `{"__tensor__": key}`, a tuple as `{"__tuple__": [...]}`, a numpy array
as `{"__ndarray__": key}` and a dict with keys other than text (the optimizer's per-parameter state,
keyed by int) as `{"__items__": [[key, value], ...]}`. `load_state` rebuilds it exactly (floats
round-trip through JSON exactly; tensors keep their dtype), so a resumed run is bit-identical.
Loading runs no code from the files: safetensors holds only tensors, and JSON only data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sdlora.errors import RunError
from sdlora.fsutil import writing

_MARKERS = ("__tensor__", "__tuple__", "__ndarray__", "__items__")


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    import numpy as np

    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().clone().contiguous()  # clone: safetensors refuses shared storage
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"__ndarray__": key}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint: {value!r:.80}")


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((marker, inner),) = value.items()
        if marker in ("__tensor__", "__ndarray__"):
            if inner not in tensors:
                raise RunError(f"{where}: refers to tensor {inner!r}, which its .safetensors file lacks")
            return tensors[inner] if marker == "__tensor__" else tensors[inner].numpy()
        if marker == "__tuple__":
            return tuple(_decode(v, tensors, where) for v in inner)
        if marker == "__items__":
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in inner}
    return {k: _decode(v, tensors, where) for k, v in value.items()}


def save_state(folder: Path, name: str, state: Any) -> list[str]:
    """Write `state` as `<name>.safetensors` + `<name>.json` in `folder`; the names of the files written."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors)
    folder = Path(folder)
    tensors_path, json_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    with writing(tensors_path):  # a full disk: an OSError naming the file (safetensors raises its own error)
        save_file(tensors, str(tensors_path))
    with writing(json_path):
        json_path.write_text(json.dumps(structure) + "\n", encoding="utf-8")
    return [f"{name}.safetensors", f"{name}.json"]


def load_state(folder: Path, name: str) -> Any:
    """What `save_state(folder, name, ...)` wrote; RunError naming the file when it is damaged."""
    from safetensors.torch import load_file

    folder = Path(folder)
    tensors_path, json_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    try:
        tensors = load_file(str(tensors_path))
    except Exception as exc:  # safetensors raises its own error types for a cut or garbled file
        raise RunError(f"{tensors_path}: damaged or incomplete ({exc})") from None
    try:
        structure = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{json_path}: damaged or incomplete ({exc})") from None
    return _decode(structure, tensors, json_path)
