"""Z-Image LoRA keys: peft on diffusers' ZImageTransformer2DModel -> the ComfyUI layout.

Pure functions on state dicts (no I/O, no model). ComfyUI runs Z-Image on its own port of the original
Tongyi-MAI/Z-Image modules (its Lumina 2 `NextDiT` code) and reaches every model weight
`diffusion_model.<path>.weight` as the LoRA module `lora_unet_<path with dots turned into underscores>`
(`.lora_down.weight` / `.lora_up.weight` / `.alpha`; the update is up @ down * alpha / rank, rank = lora_down's
rows). Those original modules differ from diffusers' in a few names and in one fused layer: each block's
attention has one `attention.qkv` (q, k, v rows in that order, each `dim` tall) where diffusers has `to_q`,
`to_k`, `to_v`; `attention.out` is diffusers' `to_out.0`; the patch embedder and final layer are
`x_embedder` / `final_layer.*` where diffusers keeps one per patch size (`all_x_embedder.2-1`, ...). The
fused LoRA is built as FLUX.1's (models/families/fused_lora.py `fuse`): lora_down the parts' downs
stacked, lora_up block-diagonal, alpha = (alpha / r of the parts) * fused rank; an untrained part gets zero
rows. Blocks: `layers.N` (30 in Z-Image-Turbo), `noise_refiner.N` and `context_refiner.N` (2 each; the
context refiner has no adaLN modulation).

Sources read (2026 snapshots):
- ComfyUI `comfy/lora.py::model_lora_keys_unet`: `key_map["lora_unet_{}".format(key_lora)] = k` for every
  `diffusion_model.` weight (so these names), and in the `comfy.model_base.Lumina2` branch the diffusers names
  `transformer.<diffusers path>` (so sdlora's diffusers file loads there too) through
  `comfy/utils.py::z_image_to_diffusers`, which maps `attention.to_q/to_k/to_v` to row slices (0, h, 2h) of
  `attention.qkv`, `attention.to_out.0` to `attention.out`, `all_x_embedder.2-1` to `x_embedder` and
  `all_final_layer.2-1.*` to `final_layer.*`, every other linear layer to its own name.
- musubi-tuner `networks/convert_z_image_lora_to_comfy.py` (its "sd-scripts -> ComfyUI" conversion of Z-Image
  LoRAs): `attention_to_out_0` -> `attention_out`, and to_q/k/v fused into `attention_qkv` as cat(downs) and a
  block-diagonal up with alpha * 3 (sd-scripts issue #2204), which is what `fuse` writes.
- diffusers `loaders/single_file_utils.py::convert_z_image_transformer_checkpoint_to_diffusers` (0.42): the same
  renames for whole checkpoints and `attention.qkv` chunked in three; tests/test_zimage_keys.py runs it on this
  module's output for the full-size Z-Image-Turbo transformer.
- diffusers `loaders/lora_conversion_utils.py::_convert_non_diffusers_z_image_lora_to_diffusers` (0.42), what
  `ZImagePipeline.load_lora_weights` calls for `lora_unet_` keys: splitting the name at every underscore turns
  `..._attention_qkv.lora_down.weight` into its dotted `attention.qkv.lora.down` form, and that path gives q, k
  and v the whole lora_down and a third of lora_up's rows each (exact), `out` becoming `to_out.0`: diffusers
  reads this file too (tests/test_zimage_family.py loads it).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from sdlora.errors import SdloraError
from sdlora.models.families.fused_lora import PREFIX, Layout, peft_to_fused_kohya

# diffusers path inside a block -> the original module path, and the original fused module -> its parts in row
# order (diffusers path, output rows per input width).
BLOCK = {
    "attention.to_out.0": "attention.out",
    "feed_forward.w1": "feed_forward.w1",
    "feed_forward.w2": "feed_forward.w2",
    "feed_forward.w3": "feed_forward.w3",
    "adaLN_modulation.0": "adaLN_modulation.0",
}
BLOCK_FUSED = {"attention.qkv": (("attention.to_q", 1), ("attention.to_k", 1), ("attention.to_v", 1))}
TOP = {
    "all_x_embedder.2-1": "x_embedder",
    "all_final_layer.2-1.linear": "final_layer.linear",
    "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
    "cap_embedder.1": "cap_embedder.1",
    "t_embedder.mlp.0": "t_embedder.mlp.0",
    "t_embedder.mlp.2": "t_embedder.mlp.2",
}
_BLOCK_PATH = re.compile(r"(layers|noise_refiner|context_refiner)\.(\d+)\.(.+)")


class ZImageKeyError(SdloraError, ValueError):
    """A Z-Image LoRA module or tensor that has no place in the ComfyUI layout."""


def _name(path: str) -> str:
    return PREFIX + path.replace(".", "_")


def _place(path: str) -> tuple[str, int, Layout | None]:
    """(ComfyUI module name, index among the fused parts, the fused module's parts in row order or None)."""
    if match := _BLOCK_PATH.fullmatch(path):
        blocks, index, inner = match.groups()
        if inner in BLOCK:
            return _name(f"{blocks}.{index}.{BLOCK[inner]}"), 0, None
        for fused, parts in BLOCK_FUSED.items():
            for i, (part, _) in enumerate(parts):
                if part == inner:
                    layout = tuple((f"{blocks}.{index}.{p}", rows) for p, rows in parts)
                    return _name(f"{blocks}.{index}.{fused}"), i, layout
    elif path in TOP:
        return _name(TOP[path]), 0, None
    raise ZImageKeyError(f"Z-Image transformer module {path!r} has no place in the ComfyUI layout")


def kohya_module(path: str) -> tuple[str, int]:
    """(ComfyUI module name, index of `path` among the fused parts, 0 if unfused) of a diffusers module path.

    Raises `ZImageKeyError` for a module the original layout has no linear layer for."""
    name, index, _ = _place(path)
    return name, index


def peft_to_kohya_zimage(
    state_dict: Mapping[str, torch.Tensor], alphas: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """ComfyUI state dict (`lora_down`, `lora_up`, `alpha` per module) of a peft LoRA on ZImageTransformer2DModel
    (`get_peft_model_state_dict` keys, with or without a leading `transformer.`).

    `alphas[module path]` is each module's lora_alpha (rsLoRA: alpha * sqrt(r), as `module_alphas` gives it).
    Raises `ZImageKeyError` naming the first key it cannot place."""
    return peft_to_fused_kohya(
        state_dict, alphas, label="Z-Image", file="Z-Image ComfyUI file", place=_place, error=ZImageKeyError
    )
