"""What the transformer families' kohya / ComfyUI LoRA files share (FLUX.1, FLUX.2 [klein], Z-Image): their
key suffixes, and peft's per-module LoRA turned into the file's modules, where a module the original model
fuses (q, k, v in one Linear) gets one LoRA made of its trained parts: lora_down the parts' downs stacked,
lora_up block-diagonal, alpha so that every part keeps its own scale (flux_keys.py's docstring has the
sources). Each family's key module says where a diffusers module goes (`place`)."""

from __future__ import annotations

from typing import Callable, Mapping

import torch

PREFIX = "lora_unet_"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
PEFT_A, PEFT_B = ".lora_A.weight", ".lora_B.weight"
PEFT_PREFIX = "transformer."  # diffusers' `save_lora_weights` puts it before the transformer's keys

Part = tuple[torch.Tensor, torch.Tensor, float]  # (lora_down, lora_up, alpha)
Layout = tuple[tuple[str, int], ...]  # a fused module's diffusers parts in row order: (path, rows per input width)
# diffusers module path -> (file module name, index among the fused parts, the fused layout or None)
Place = Callable[[str], tuple[str, int, "Layout | None"]]


def peft_to_fused_kohya(
    state_dict: Mapping[str, torch.Tensor],
    alphas: Mapping[str, float],
    *,
    label: str,
    file: str,
    place: Place,
    error: type[Exception],
    unfused: Callable[[str, torch.Tensor, torch.Tensor, float], Part] | None = None,
) -> dict[str, torch.Tensor]:
    """The file's state dict (`lora_down`, `lora_up`, `alpha` per module) of a peft LoRA on the transformer
    (`get_peft_model_state_dict` keys, with or without a leading `transformer.`); `alphas[module path]` is each
    module's lora_alpha. `unfused(path, down, up, alpha)` adapts a module that is not fused to the family's
    own convention. Raises `error` naming the first key it cannot place (`label`, `file` name the family)."""
    alphas = {path.removeprefix(PEFT_PREFIX): float(alpha) for path, alpha in alphas.items()}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        suffix = next((s for s in (PEFT_A, PEFT_B) if key.endswith(s)), None)
        if suffix is None:
            what = "DoRA's magnitude" if "lora_magnitude_vector" in key else "this tensor"
            raise error(f"{key}: {what} has no place in a {file} (lora_A, lora_B only)")
        path = key[: -len(suffix)].removeprefix(PEFT_PREFIX)
        try:
            place(path)
        except error as exc:
            raise error(f"{key}: {exc}") from None
        modules.setdefault(path, {})[suffix] = tensor
    groups: dict[str, dict[int, Part]] = {}
    layouts: dict[str, Layout | None] = {}
    first: dict[str, str] = {}
    for path, tensors in modules.items():
        if len(tensors) != 2:
            raise error(f"{label} LoRA module {path!r} lacks lora_A or lora_B")
        if path not in alphas:
            raise error(f"no lora_alpha known for {label} module {path!r}")
        name, part, layouts[name] = place(path)
        groups.setdefault(name, {})[part] = (tensors[PEFT_A], tensors[PEFT_B], alphas[path])
        first.setdefault(name, path)
    out: dict[str, torch.Tensor] = {}
    for name, parts in groups.items():
        layout = layouts[name]
        if layout is not None:
            down, up, alpha = fuse(name, layout, parts, error)
        else:
            down, up, alpha = parts[0]
            if unfused is not None:
                down, up, alpha = unfused(first[name], down, up, alpha)
        out[name + DOWN] = down.detach().to("cpu").contiguous()
        out[name + UP] = up.detach().to("cpu").contiguous()
        out[name + ALPHA] = torch.tensor(alpha, dtype=torch.float32)
    return out


def fuse(name: str, layout: Layout, parts: Mapping[int, Part], error: type[Exception]) -> Part:
    """One fused LoRA from its trained parts: block-diagonal, every block `width` wide (see the module doc)."""
    first_down = next(iter(parts.values()))[0]
    width_in, dtype = first_down.shape[1], first_down.dtype
    rows = [int(n) * width_in for _, n in layout]
    for i, (down, up, _) in parts.items():
        if down.shape[1] != width_in or up.shape != (rows[i], down.shape[0]):
            raise error(
                f"{layout[i][0]}: lora_A {tuple(down.shape)} / lora_B {tuple(up.shape)} do not fit {name} "
                f"({rows[i]} output rows for input width {width_in})"
            )
    width = max(down.shape[0] for down, _, _ in parts.values())
    rank = width * len(layout)
    scales = {i: alpha / down.shape[0] for i, (down, _, alpha) in parts.items()}
    same = len(set(scales.values())) == 1
    fused_down = torch.zeros(rank, width_in, dtype=dtype)
    fused_up = torch.zeros(sum(rows), rank, dtype=dtype)
    for i, (down, up, _) in parts.items():
        r, top = down.shape[0], sum(rows[:i])
        fused_down[i * width : i * width + r] = down.detach().to("cpu", dtype)
        block = up.detach().to("cpu", torch.float32) * (1.0 if same else scales[i])
        fused_up[top : top + rows[i], i * width : i * width + r] = block.to(dtype)
    return fused_down, fused_up, (next(iter(scales.values())) if same else 1.0) * rank


def swap_halves(up: torch.Tensor) -> torch.Tensor:
    """(scale, shift) rows <-> (shift, scale): the same swap both ways."""
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
