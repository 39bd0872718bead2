"""FLUX.2 [klein] LoRA keys: peft on diffusers' Flux2Transformer2DModel -> the layout ComfyUI loads.

ComfyUI runs FLUX.2 on Black Forest Labs' own module layout and finds a LoRA module under
`lora_unet_` + the BFL path with dots turned into underscores, as for FLUX.1
(`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` / `.lora_up.weight` / `.alpha`; the update is
up @ down * alpha / rank). The one fused layer that diffusers splits is a double block's q, k, v, on the
image (`img_attn.qkv`) and text (`txt_attn.qkv`) stream: fused exactly as for FLUX.1, by flux_keys.py's
`fuse` (fused_lora.py: block-diagonal lora_up, alpha per part). A single block's two layers are fused in diffusers too
(`attn.to_qkv_mlp_proj` = BFL's `linear1`, `attn.to_out` = `linear2`), so they keep their LoRA as it is.
Transformer only (text-encoder LoRAs are refused for FLUX.2 [klein] in this sdlora); DoRA has no place.

Sources read (2026 snapshots):
- ComfyUI `comfy/lora.py::model_lora_keys_unet`: its first loop maps every model weight
  `diffusion_model.<path>.weight` to `lora_unet_<path with _>` (and to `diffusion_model.<path>`), for
  every model; FLUX.2 is `comfy.model_base.Flux2(Flux)`, whose transformer (`comfy/ldm/flux/model.py`
  with `global_modulation`) has BFL's names: `double_blocks.N.{img,txt}_attn.{qkv,proj}`,
  `{img,txt}_mlp.{0,2}`, `single_blocks.N.linear{1,2}`, `double_stream_modulation_{img,txt}.lin`,
  `single_stream_modulation.lin`, `final_layer.{linear,adaLN_modulation.1}`, `img_in`, `txt_in`, `time_in.*`.
  (Its `flux_to_diffusers` map for diffusers-format `transformer.` keys is FLUX.1's table: FLUX.2's
  `ff.linear_in` and `to_qkv_mlp_proj` are not in it, so the diffusers file does not fully load there.)
- diffusers 0.42 `loaders/lora_conversion_utils.py::_convert_kohya_flux2_lora_to_diffusers`, what
  `Flux2KleinPipeline.load_lora_weights` runs on `lora_down` keys: this table, alpha / rank read for every
  module, `img_attn_qkv` / `txt_attn_qkv` split in three equal row blocks (by blocks of lora_down when
  lora_up is block-diagonal), `linear1` / `linear2` unsplit.
- diffusers `loaders/single_file_utils.py::convert_flux2_transformer_checkpoint_to_diffusers`: the BFL ->
  diffusers names of whole checkpoints; `final_layer.adaLN_modulation.1` rows are (shift, scale) where
  diffusers' `norm_out.linear` has (scale, shift). tests/test_flux2_keys.py runs it on this module's output
  for the full-size FLUX.2 [klein] 4B.
- musubi-tuner `networks/lora_flux_2.py` (kohya-ss' FLUX.2 trainer): prefix `lora_unet`, the BFL modules of
  the double and single blocks: the same names.
"""

from __future__ import annotations

from typing import Mapping

import torch

from sdlora.models.families.flux_keys import DIFFUSERS_BLOCK, DOUBLE_FUSED, FluxKeyError, bfl_module
from sdlora.models.families.fused_lora import PREFIX, Layout, Part, peft_to_fused_kohya, swap_halves

# diffusers path inside a block (or the model) -> BFL path.
DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
SWAPPED = {"norm_out.linear"}  # output rows BFL orders (shift, scale) and diffusers (scale, shift)

_BLOCKS = {
    "transformer_blocks": ("double_blocks", DOUBLE, DOUBLE_FUSED),
    "single_transformer_blocks": ("single_blocks", SINGLE, {}),
}


def kohya_module(path: str) -> tuple[str, int]:
    """(kohya module name, index of `path` among the fused parts, 0 if unfused) of a diffusers module path
    of Flux2Transformer2DModel, by `flux_keys.bfl_module`. Raises `FluxKeyError` for a module the BFL layout
    has no linear layer for."""
    return bfl_module(path, _BLOCKS, TOP, "FLUX.2 [klein]", "ComfyUI")


def _layout(name: str, path: str) -> tuple[tuple[str, int | None], ...]:
    """The diffusers parts of kohya module `name` (one of whose parts is `path`), in row order."""
    match = DIFFUSERS_BLOCK.fullmatch(path)
    if match:
        blocks, index, _ = match.groups()
        bfl_blocks, _, fused = _BLOCKS[blocks]
        for bfl, parts in fused.items():
            if name == f"{PREFIX}{bfl_blocks}_{index}_{bfl.replace('.', '_')}":
                return tuple((f"{blocks}.{index}.{part}", rows) for part, rows in parts)
    return ((path, None),)


def _place(path: str) -> tuple[str, int, Layout | None]:
    name, part = kohya_module(path)
    layout = _layout(name, path)
    return name, part, None if layout[0][1] is None else layout  # type: ignore[return-value]


def _own_convention(path: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> Part:
    """The final layer's rows in BFL's (shift, scale) order."""
    return down, swap_halves(up) if path in SWAPPED else up, alpha


def peft_to_kohya_flux2(state_dict: Mapping[str, torch.Tensor], alphas: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """ComfyUI state dict (`lora_down`, `lora_up`, `alpha` per module) of a peft LoRA on Flux2Transformer2DModel
    (`get_peft_model_state_dict` keys, with or without a leading `transformer.`).

    `alphas[module path]` is each module's lora_alpha (rsLoRA: alpha * sqrt(r), as `module_alphas` gives
    it). Raises `FluxKeyError` naming the first key it cannot place."""
    return peft_to_fused_kohya(
        state_dict, alphas, label="FLUX.2 [klein]", file="FLUX.2 [klein] ComfyUI file", place=_place,
        error=FluxKeyError, unfused=_own_convention,
    )  # fmt: skip
