"""models/families/flux2_keys.py: FLUX.2 [klein] LoRA keys from peft on Flux2Transformer2DModel to the layout
ComfyUI loads (`lora_unet_` + BFL's module path: `lora_unet_double_blocks_N_img_attn_qkv`, q, k, v fused)."""

from __future__ import annotations

import re

import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.models.families.flux2_keys import FluxKeyError, kohya_module, peft_to_kohya_flux2
from test_flux_keys import assert_close, linear_paths, lora_on, peft_deltas

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# What the tests know independently of the module: the rows of a fused kohya module, in order.
FUSED_ROWS = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
# FLUX.2 [klein] 4B's transformer config: diffusers' scripts/convert_flux2_to_diffusers.py,
# get_flux2_transformer_config("klein-4b") (the config BFL's checkpoint converts with).
KLEIN_4B = dict(
    patch_size=1,
    in_channels=128,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)
# BFL's linear layers of a FLUX.2 [klein] transformer, as ComfyUI (comfy/ldm/flux/model.py with global
# modulation) and BFL's flux2 repository name them: per double block, per single block, and outside the blocks.
BFL_DOUBLE = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "img_mlp.0", "img_mlp.2")
BFL_DOUBLE += ("txt_mlp.0", "txt_mlp.2")
BFL_SINGLE = ("linear1", "linear2")
BFL_TOP = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "final_layer.linear")
BFL_TOP += ("final_layer.adaLN_modulation.1", "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin")
BFL_TOP += ("single_stream_modulation.lin",)


@pytest.fixture(scope="module")
def tiny_transformer():
    from sdlora.models.families import FLUX2_KLEIN

    return FLUX2_KLEIN.build_tiny().transformer


def kohya_deltas(kohya: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """The update a reader (ComfyUI) applies, up @ down * alpha / rank, per diffusers module: fused modules split
    by rows ([q; k; v]), the final layer's (shift, scale) rows swapped back."""
    from sdlora.models.families.flux2_keys import DOUBLE, SINGLE, TOP

    unfused = {f"lora_unet_{bfl.replace('.', '_')}": path for path, bfl in TOP.items()}
    out = {}
    for key in kohya:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        down, up = kohya[key].double(), kohya[name + ".lora_up.weight"].double()
        delta = up @ down * (kohya[name + ".alpha"].item() / down.shape[0])
        if name in unfused:
            if unfused[name] == "norm_out.linear":
                shift, scale = delta.chunk(2)
                delta = torch.cat([scale, shift])
            out[unfused[name]] = delta
            continue
        kind, index, inner = re.fullmatch(r"lora_unet_(double|single)_blocks_(\d+)_(.+)", name).groups()
        block = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
        if inner in FUSED_ROWS:
            top = 0
            for part in FUSED_ROWS[inner]:
                path = f"{block}.{index}.{part}"
                out[path] = delta[top : top + sizes[path]]
                top += sizes[path]
            assert top == delta.shape[0], name
        else:
            table = DOUBLE if kind == "double" else SINGLE
            (path,) = [p for p, bfl in table.items() if bfl.replace(".", "_") == inner]
            out[f"{block}.{index}.{path}"] = delta
    return out


@pytest.mark.parametrize(
    "targets, config",
    [
        ([*ATTENTION, "to_qkv_mlp_proj"], dict(r=4, lora_alpha=8)),
        ("all-linear", dict(r=4, lora_alpha=4)),
        (
            "all-linear",
            dict(
                r=4,
                lora_alpha=8,
                rank_pattern={"transformer_blocks.0.attn.to_k": 2, "transformer_blocks.0.attn.add_v_proj": 3},
                alpha_pattern={"transformer_blocks.0.attn.to_q": 2, "norm_out.linear": 16},
            ),
        ),
    ],
    ids=["attention", "all-linear", "mixed-ranks"],
)
def test_the_comfyui_file_makes_the_delta_peft_applies_module_by_module(tiny_transformer, targets, config):
    if targets == "all-linear":
        targets = linear_paths(tiny_transformer)
    model, state_dict, alphas = lora_on(tiny_transformer, targets, **config)
    expected = peft_deltas(model)
    assert all(delta.abs().max() > 0 for delta in expected.values())

    kohya = peft_to_kohya_flux2(state_dict, alphas)
    assert all(key.startswith("lora_unet_") for key in kohya)
    sizes = {p: m.out_features for p, m in tiny_transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    actual = kohya_deltas(kohya, sizes)
    assert actual.keys() == expected.keys()
    for path, delta in expected.items():
        assert_close(actual[path], delta, path)
    # The same with the `transformer.` prefix diffusers' save_lora_weights writes.
    prefixed = peft_to_kohya_flux2({f"transformer.{k}": v for k, v in state_dict.items()}, alphas)
    assert prefixed.keys() == kohya.keys() and all(torch.equal(prefixed[k], kohya[k]) for k in kohya)


def test_fused_qkv_is_block_diagonal_with_alpha_per_part(tiny_transformer):
    _, state_dict, alphas = lora_on(tiny_transformer, ATTENTION, r=4, lora_alpha=8)
    kohya = peft_to_kohya_flux2(state_dict, alphas)
    name = "lora_unet_double_blocks_0_txt_attn_qkv"
    downs = [
        state_dict[f"transformer_blocks.0.attn.{p}.lora_A.weight"] for p in ("add_q_proj", "add_k_proj", "add_v_proj")
    ]
    assert torch.equal(kohya[name + ".lora_down.weight"], torch.cat(downs))
    assert kohya[name + ".alpha"].item() == 24.0 and kohya[name + ".alpha"].dtype == torch.float32
    up = kohya[name + ".lora_up.weight"]
    assert up.shape == (96, 12) and not up[:32, 4:].any() and not up[32:64, :4].any() and not up[64:, :8].any()


def _coded_lora(model: torch.nn.Module, alpha: float):
    """A rank-1 LoRA on every linear layer: lora_A all ones, lora_B a distinct number per output row."""
    state_dict, alphas, codes, start = {}, {}, {}, 0
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            codes[path] = torch.arange(start, start + module.out_features, dtype=torch.float64)
            start += module.out_features
            state_dict[path + ".lora_A.weight"] = torch.ones(1, module.in_features, dtype=torch.float64)
            state_dict[path + ".lora_B.weight"] = codes[path][:, None]
            alphas[path] = alpha
    return state_dict, alphas, codes


def test_every_name_for_klein_4b_is_a_bfl_module_and_its_rows_land_where_diffusers_reads_them():
    """A coded rank-1 LoRA on every linear layer of the full-size FLUX.2 [klein] 4B transformer (built on the
    meta device for its shapes). Its file names exactly BFL's linear layers, `lora_unet_` + path with `_`
    (ComfyUI's lookup); and the update, as one column per module, is a BFL checkpoint that diffusers' own
    BFL -> diffusers converter (the one `from_single_file` uses) takes whole, giving back each module's
    numbers in its rows: q, k, v and the final layer's (shift, scale) rows sit where BFL has them."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**KLEIN_4B)
    state_dict, alphas, codes = _coded_lora(model, 1.0)
    assert len(codes) == 5 * 12 + 20 * 2 + 9  # double: q, k, v, out and the MLP per stream
    kohya = peft_to_kohya_flux2(state_dict, alphas)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}

    bfl = [f"double_blocks.{i}.{m}" for i in range(5) for m in BFL_DOUBLE]
    bfl += [f"single_blocks.{i}.{m}" for i in range(20) for m in BFL_SINGLE] + list(BFL_TOP)
    by_kohya_name = {"lora_unet_" + b.replace(".", "_"): b for b in bfl}
    assert len(by_kohya_name) == len(bfl)  # underscores are unambiguous among FLUX.2's modules
    assert names == by_kohya_name.keys(), sorted(names ^ by_kohya_name.keys())[:5]

    columns = {}
    for name in names:
        down, up = kohya[name + ".lora_down.weight"], kohya[name + ".lora_up.weight"]
        scale = kohya[name + ".alpha"].item() / down.shape[0]
        columns[by_kohya_name[name] + ".weight"] = (up @ down[:, :1]) * scale
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(columns))
    assert converted.keys() == {path + ".weight" for path in codes}  # the BFL list is the checkpoint's linears
    for path, code in codes.items():
        assert torch.equal(converted[path + ".weight"][:, 0], code), path


def test_diffusers_reads_the_file_as_peft_wrote_it_at_klein_4b_size():
    """diffusers' kohya FLUX.2 loader (`_convert_kohya_flux2_lora_to_diffusers`, what `load_lora_weights` calls
    for `lora_down` keys) turns the file back into per-module LoRAs whose update equals peft's, alpha / rank 2
    included, the fused q, k, v through its block-diagonal path. It has no place for the modulation layers and
    the final layer's modulation (it warns and leaves them): for those, diffusers loads the diffusers file."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**KLEIN_4B)
    state_dict, alphas, codes = _coded_lora(model, 2.0)
    kohya = peft_to_kohya_flux2(state_dict, alphas)
    loaded = _convert_kohya_flux2_lora_to_diffusers(kohya)  # takes what it reads out of `kohya`
    assert {k.split(".")[0] for k in kohya} == {
        "lora_unet_final_layer_adaLN_modulation_1",
        "lora_unet_double_stream_modulation_img_lin",
        "lora_unet_double_stream_modulation_txt_lin",
        "lora_unet_single_stream_modulation_lin",
    }
    assert all(k.startswith("transformer.") for k in loaded)
    loaded = {k.removeprefix("transformer."): v for k, v in loaded.items()}
    skipped = {
        "norm_out.linear",
        *(f"{m}.linear" for m in ("double_stream_modulation_img", "double_stream_modulation_txt")),
    }
    skipped.add("single_stream_modulation.linear")
    assert {k.rsplit(".", 2)[0] for k in loaded} == set(codes) - skipped
    for path, code in codes.items():
        if path in skipped:
            continue
        a, b = loaded[f"{path}.lora_A.weight"], loaded[f"{path}.lora_B.weight"]
        assert a.shape[0] == 1, path  # the block-diagonal path: each part its own rank-1 LoRA
        assert torch.equal((b @ a[:, :1])[:, 0], 2 * code), path


@pytest.mark.parametrize(
    "key",
    [
        "transformer_blocks.0.attn.norm_q.lora_A.weight",  # not a linear layer BFL has
        "transformer_blocks.0.attn.to_q.lora_magnitude_vector",  # DoRA
        "transformer_blocks.0.attn.to_q.lora_B.bias",
        "transformer_blocks.0.ff.net.0.proj.lora_A.weight",  # FLUX.1's name, not FLUX.2's
        "text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight",
    ],
)
def test_a_peft_key_without_a_place_is_a_one_line_error_naming_it(key):
    state_dict = {key: torch.zeros(2, 2), "x_embedder.lora_A.weight": torch.zeros(2, 4)}
    state_dict["x_embedder.lora_B.weight"] = torch.zeros(4, 2)
    if key.endswith(".lora_A.weight"):
        state_dict[key.replace("lora_A", "lora_B")] = torch.zeros(2, 2)
    alphas = {k.rsplit(".", 2)[0]: 1.0 for k in state_dict}
    with pytest.raises(SdloraError) as error:
        peft_to_kohya_flux2(state_dict, alphas)
    message = str(error.value)
    assert "\n" not in message and key in message, message


def test_names_and_their_errors():
    assert kohya_module("single_transformer_blocks.3.attn.to_qkv_mlp_proj") == ("lora_unet_single_blocks_3_linear1", 0)
    assert kohya_module("transformer_blocks.4.attn.add_v_proj") == ("lora_unet_double_blocks_4_txt_attn_qkv", 2)
    assert kohya_module("norm_out.linear") == ("lora_unet_final_layer_adaLN_modulation_1", 0)
    with pytest.raises(FluxKeyError, match="no lora_alpha known for FLUX.2 \\[klein\\] module 'x_embedder'"):
        peft_to_kohya_flux2(
            {"x_embedder.lora_A.weight": torch.zeros(2, 4), "x_embedder.lora_B.weight": torch.zeros(4, 2)}, {}
        )
    with pytest.raises(FluxKeyError, match="lacks lora_A or lora_B"):
        peft_to_kohya_flux2({"x_embedder.lora_A.weight": torch.zeros(2, 4)}, {"x_embedder": 1.0})
