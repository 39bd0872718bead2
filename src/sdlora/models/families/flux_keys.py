"""FLUX.1 LoRA keys: peft on diffusers' FluxTransformer2DModel <-> the sd-scripts / ComfyUI layout.

Pure functions on state dicts (no I/O, no model). sd-scripts trains FLUX.1 on Black Forest Labs'
own module layout and names each LoRA module `lora_unet_` + the BFL path with dots turned into
underscores (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `.lora_up.weight` /
`.alpha`; the update is up @ down * alpha / rank, rank = lora_down's rows). Where BFL has one
linear layer for what diffusers splits, the LoRA is fused: q, k, v of a double block's image
(`img_attn.qkv`) and text (`txt_attn.qkv`) stream, and q, k, v and the MLP input of a single block
(`linear1`), their output rows in that order.

Fusing is exact: lora_down is the parts' downs stacked, lora_up block-diagonal (each part's up in its
own rows and its own columns; a part that was not trained gets zero rows), every part in a block of
the same width (the largest part rank), and alpha = (alpha / r of the parts) * fused rank, so a
reader that scales by alpha / rank applies each part's own scale. Parts with different alpha / r get
their scale folded into their up block (alpha = rank). Splitting on the way back takes the blocks
apart again when lora_up is block-diagonal (and drops a block that is all zero, the padding of an
untrained part); a dense fused LoRA (sd-scripts' default) gives every part the whole lora_down and
its rows of lora_up, which is exact too.

Transformer only: a FLUX.1 file's CLIP-L keys (`lora_te1_...`) are SD's text-encoder names (train/kohya.py).
DoRA has no place here (refused): a fused module's magnitude would need the untrained parts' base weights.

Sources read (2026 snapshots):
- sd-scripts `networks/lora_flux.py` (48d368f): `LORA_PREFIX_FLUX = "lora_unet"`, names are the BFL
  module path with `_`; `split_qkv` trains q, k, v (and mlp for `linear1`) apart and `state_dict()`
  saves them fused as cat(downs) and a block-diagonal up, but leaves alpha unchanged, so readers scale
  those modules by 1/3 or 1/4 (sd-scripts issue #2204, open); here alpha is multiplied by the part count.
- sd-scripts `networks/convert_flux_lora.py` (same commit): `convert_ai_toolkit_to_sd_scripts` fuses a
  diffusers-layout LoRA the same way (cat of the downs, block-diagonal up, alpha = the fused rank for
  scale-1 parts), needing every part present; the other direction is diffusers' adaptation of it,
  `loaders/lora_conversion_utils.py::_convert_kohya_flux_lora_to_diffusers` (0.42): the BFL -> diffusers
  module table, the scale alpha / rank, a fused module split densely (the whole down to every part) or,
  when rank % parts == 0 and lora_up is block-diagonal, in blocks; `final_layer.adaLN_modulation.1`
  rows are (shift, scale) where diffusers' `norm_out.linear` has (scale, shift) (`swap_scale_shift`);
  the final layer's two modules are read without their alpha, so here their scale is folded into lora_up
  (and the modules outside the blocks come out without `transformer.`, so `load_lora_weights` skips them).
- diffusers `loaders/single_file_utils.py::convert_flux_transformer_checkpoint_to_diffusers`: the same
  table for whole checkpoints, q, k, v chunked in that order and `linear1` split (h, h, h, 4h);
  tests/test_flux_keys.py runs it on this module's output for the full-size FLUX.1 [dev].
- ComfyUI `comfy/lora.py::model_lora_keys_unet`: every model weight `diffusion_model.<path>.weight`
  is reachable as `lora_unet_<path with _>` (so these names), and for Flux also the diffusers names
  `transformer.<diffusers path>` through `comfy/utils.py::flux_to_diffusers` (so the diffusers-format
  file loads there too); fused parts are applied to row slices (q at 0, k at h, v at 2h, mlp at 3h).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from sdlora.errors import SdloraError
from sdlora.models.families.fused_lora import (
    ALPHA,
    DOWN,
    PEFT_A,
    PEFT_B,
    PREFIX,
    UP,
    Layout,
    Part,
    peft_to_fused_kohya,
    swap_halves,
)

COMFY_PREFIX = "diffusion_model."  # ComfyUI's own LoRA keys: the BFL path with dots, then the suffix

# diffusers path inside a block (or the model) -> BFL path.
DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# BFL path -> its parts in row order: (diffusers path, output rows in units of the input width h).
_QKV = ("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1)
DOUBLE_FUSED = {
    "img_attn.qkv": _QKV,
    "txt_attn.qkv": (("attn.add_q_proj", 1), ("attn.add_k_proj", 1), ("attn.add_v_proj", 1)),
}
SINGLE_FUSED = {"linear1": (*_QKV, ("proj_mlp", 4))}  # FLUX.1's mlp_ratio 4
# Output rows BFL orders (shift, scale) and diffusers (scale, shift).
SWAPPED = {"norm_out.linear"}
# diffusers' kohya loader reads the final layer's LoRA without its alpha ("TODO: alphas" in
# `_convert_kohya_flux_lora_to_diffusers`), so there alpha / rank goes into lora_up and alpha = rank.
SCALE_FOLDED = {"proj_out", "norm_out.linear"}

_BLOCKS = {  # diffusers block list -> (BFL block list, unfused table, fused table)
    "transformer_blocks": ("double_blocks", DOUBLE, DOUBLE_FUSED),
    "single_transformer_blocks": ("single_blocks", SINGLE, SINGLE_FUSED),
}
DIFFUSERS_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)")
_KOHYA_BLOCK = re.compile(r"(double_blocks|single_blocks)_(\d+)_(.+)")


class FluxKeyError(SdloraError, ValueError):
    """A FLUX.1 LoRA key that has no place in the other layout (or in the model)."""


# ====================================================================== module names


def _reverse(table: Mapping[str, str], fused: Mapping[str, tuple[tuple[str, int], ...]]) -> dict[str, tuple]:
    """Underscored BFL path -> its parts in row order, (diffusers path, rows per h or None if unfused)."""
    out: dict[str, tuple] = {bfl.replace(".", "_"): ((path, None),) for path, bfl in table.items()}
    return out | {bfl.replace(".", "_"): parts for bfl, parts in fused.items()}


# kohya name body (after the prefix and, in blocks, the block number) -> its parts
_KOHYA_TOP = _reverse(TOP, {})
_KOHYA_BLOCKS = {bfl: (blocks, _reverse(table, fused)) for blocks, (bfl, table, fused) in _BLOCKS.items()}


def bfl_module(
    path: str,
    blocks: Mapping[str, tuple[str, Mapping[str, str], Mapping[str, Any]]],
    top: Mapping[str, str],
    label: str,
    layout: str,
) -> tuple[str, int]:
    """(kohya module name, index of `path` among the fused parts, 0 if unfused) of a diffusers module path, by
    a BFL-layout family's tables (`blocks`: diffusers block list -> (BFL block list, unfused table, fused
    table); `top`: the modules outside the blocks). Raises `FluxKeyError` naming `layout` for a module the
    BFL layout has no linear layer for (`label`: the family, `layout`: the file's)."""
    if match := DIFFUSERS_BLOCK.fullmatch(path):
        block_list, index, inner = match.groups()
        bfl_blocks, table, fused = blocks[block_list]
        if inner in table:
            return f"{PREFIX}{bfl_blocks}_{index}_{table[inner].replace('.', '_')}", 0
        for bfl, parts in fused.items():
            for i, (part, _) in enumerate(parts):
                if part == inner:
                    return f"{PREFIX}{bfl_blocks}_{index}_{bfl.replace('.', '_')}", i
    elif path in top:
        return PREFIX + top[path].replace(".", "_"), 0
    raise FluxKeyError(f"{label} transformer module {path!r} has no place in the {layout} layout")


def kohya_module(path: str) -> tuple[str, int]:
    """`bfl_module` by FLUX.1's tables (FluxTransformer2DModel)."""
    return bfl_module(path, _BLOCKS, TOP, "FLUX.1", "sd-scripts/ComfyUI")


def diffusers_parts(name: str) -> tuple[tuple[str, int | None], ...]:
    """The diffusers modules a kohya module name covers, in row order: (path, rows per input width h),
    the rows None for an unfused module. Raises `FluxKeyError` for a name outside the FLUX.1 layout."""
    body = name[len(PREFIX) :] if name.startswith(PREFIX) else ""
    if match := _KOHYA_BLOCK.fullmatch(body):
        bfl_blocks, index, inner = match.groups()
        blocks, table = _KOHYA_BLOCKS[bfl_blocks]
        if inner in table:
            return tuple((f"{blocks}.{index}.{path}", rows) for path, rows in table[inner])
    elif body in _KOHYA_TOP:
        return _KOHYA_TOP[body]
    raise FluxKeyError(f"unrecognised FLUX.1 LoRA module {name!r} (expected sd-scripts' lora_unet_... names)")


# ====================================================================== peft -> kohya


def _place(path: str) -> tuple[str, int, Layout | None]:
    name, part = kohya_module(path)
    layout = diffusers_parts(name)
    return name, part, None if layout[0][1] is None else layout


def _own_convention(path: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> Part:
    """An unfused module as diffusers' kohya reader needs it: the final layer's rows in BFL's order, and its
    scale folded into lora_up where the reader takes no alpha."""
    if path in SWAPPED:
        up = swap_halves(up)
    if path in SCALE_FOLDED and alpha != down.shape[0]:
        up = (up.detach().to("cpu", torch.float32) * (alpha / down.shape[0])).to(up.dtype)
        alpha = float(down.shape[0])
    return down, up, alpha


def peft_to_kohya_flux(state_dict: Mapping[str, torch.Tensor], alphas: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """sd-scripts / ComfyUI state dict (`lora_down`, `lora_up`, `alpha` per module) of a peft LoRA on
    FluxTransformer2DModel (`get_peft_model_state_dict` keys, with or without a leading `transformer.`).

    `alphas[module path]` is each module's lora_alpha (rsLoRA: alpha * sqrt(r), as `module_alphas`
    gives it). Raises `FluxKeyError` naming the first key it cannot place."""
    return peft_to_fused_kohya(
        state_dict, alphas, label="FLUX.1", file="FLUX.1 sd-scripts/ComfyUI file", place=_place,
        error=FluxKeyError, unfused=_own_convention,
    )  # fmt: skip


# ====================================================================== kohya -> peft


def _kohya_modules(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        suffix = next((s for s in (DOWN, UP, ALPHA) if key.endswith(s)), None)
        if suffix is None:
            raise FluxKeyError(f"unrecognised FLUX.1 LoRA tensor {key!r} (expected lora_down, lora_up or alpha)")
        name = key[: -len(suffix)]
        if name.startswith(COMFY_PREFIX):
            name = PREFIX + name[len(COMFY_PREFIX) :].replace(".", "_")
        try:
            diffusers_parts(name)
        except FluxKeyError as error:
            raise FluxKeyError(f"unrecognised FLUX.1 LoRA tensor {key!r}: {error}") from None
        modules.setdefault(name, {})[suffix] = tensor
    for name, tensors in modules.items():
        if DOWN not in tensors or UP not in tensors:
            raise FluxKeyError(f"FLUX.1 LoRA module {name!r} lacks lora_down or lora_up")
    return modules


def kohya_flux_to_peft(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The inverse of `peft_to_kohya_flux`, for files from sd-scripts, ComfyUI or this module:
    (peft state dict of the transformer, keys without `transformer.`; module path -> lora_alpha).

    A module without `.alpha` gets alpha = rank, as sd-scripts reads it. Fused modules are split
    (see the module doc); every part's delta equals its rows of the fused delta."""
    lora: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for name, tensors in _kohya_modules(state_dict).items():
        down, up = tensors[DOWN], tensors[UP]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise FluxKeyError(f"{name}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} do not fit")
        alpha = float(tensors[ALPHA].item()) if ALPHA in tensors else float(down.shape[0])
        layout = diffusers_parts(name)
        if layout[0][1] is None:
            path = layout[0][0]
            parts = {path: (down, swap_halves(up) if path in SWAPPED else up, alpha)}
        else:
            parts = _split(name, layout, down, up, alpha)
        for path, (part_down, part_up, part_alpha) in parts.items():
            lora[path + PEFT_A] = part_down.contiguous()
            lora[path + PEFT_B] = part_up.contiguous()
            alphas[path] = part_alpha
    return lora, alphas


def _split(
    name: str, layout: tuple[tuple[str, int | None], ...], down: torch.Tensor, up: torch.Tensor, alpha: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    width_in, rank = down.shape[1], down.shape[0]
    rows = [int(n) * width_in for _, n in layout]
    if up.shape[0] != sum(rows):
        raise FluxKeyError(
            f"{name}: lora_up has {up.shape[0]} rows, expected {sum(rows)} for input width {width_in} "
            f"({' + '.join(str(r) for r in rows)})"
        )
    tops = [sum(rows[:i]) for i in range(len(rows))]
    count = len(layout)
    width = rank // count
    blocky = rank % count == 0 and all(
        not up[top : top + n, : i * width].any() and not up[top : top + n, (i + 1) * width :].any()
        for i, (top, n) in enumerate(zip(tops, rows))
    )
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for i, ((path, _), top, n) in enumerate(zip(layout, tops, rows)):
        if not blocky:  # dense: every part reads the whole lora_down
            out[path] = (down.clone(), up[top : top + n].clone(), alpha)
            continue
        part_down, part_up = down[i * width : (i + 1) * width], up[top : top + n, i * width : (i + 1) * width]
        keep = part_down.any(dim=1) | part_up.any(dim=0)  # zero rows and columns: padding, no update
        if keep.any():
            out[path] = (part_down[keep].clone(), part_up[:, keep].clone(), alpha / rank * int(keep.sum()))
    return out
