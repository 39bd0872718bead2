"""models/families/zimage_keys.py: Z-Image LoRA keys from peft on ZImageTransformer2DModel to the ComfyUI
layout (`lora_unet_layers_N_attention_qkv`, q, k, v fused; the original Tongyi-MAI/Z-Image module names)."""

from __future__ import annotations

import re

import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.models.families.zimage_keys import ZImageKeyError, kohya_module, peft_to_kohya_zimage
from test_flux_keys import assert_close, lora_on, peft_deltas

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' Z-Image LoRA example's targets

# Z-Image-Turbo's transformer, as its hub config gives it (https://huggingface.co/Tongyi-MAI/Z-Image-Turbo,
# transformer/config.json, quoted in the public Z-Image MLX ports' conversion scripts; the same values as
# ZImageTransformer2DModel's defaults in diffusers 0.42 but axes_lens).
Z_IMAGE_TURBO = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    norm_eps=1e-05,
    qk_norm=True,
    cap_feat_dim=2560,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)


def native_path(path: str) -> str:
    """A diffusers module path as the original Z-Image modules (ComfyUI's) name it: the test's own reading of
    ComfyUI's `z_image_to_diffusers` (q, k, v into one qkv; to_out.0 is out; one embedder and final layer)."""
    for diffusers, original in (
        ("all_x_embedder.2-1", "x_embedder"),
        ("all_final_layer.2-1.", "final_layer."),
        (".attention.to_out.0", ".attention.out"),
    ):
        path = path.replace(diffusers, original)
    return re.sub(r"\.attention\.to_[qkv]$", ".attention.qkv", path)


def linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


@pytest.fixture(scope="module")
def tiny_transformer():
    from sdlora.models.tiny import tiny_zimage

    return tiny_zimage().transformer


def comfy_deltas(kohya: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The update ComfyUI applies, up @ down * alpha / rank, on the original module `lora_unet_<path with _>`
    names, given back per diffusers module: a qkv module's rows split [q; k; v]."""
    by_name: dict[str, list[tuple[str, int]]] = {}
    for path, module in linears(transformer).items():
        by_name.setdefault("lora_unet_" + native_path(path).replace(".", "_"), []).append((path, module.out_features))
    out = {}
    for key in kohya:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        down, up = kohya[key].double(), kohya[name + ".lora_up.weight"].double()
        delta = up @ down * (kohya[name + ".alpha"].item() / down.shape[0])
        top = 0
        for path, rows in by_name[name]:  # q, k, v in the model's order
            out[path] = delta[top : top + rows]
            top += rows
        assert top == delta.shape[0], name
    return out


@pytest.mark.parametrize(
    "targets, config",
    [
        (ATTENTION, dict(r=4, lora_alpha=8)),
        ("all-linear", dict(r=4, lora_alpha=4)),
        # parts of one fused module with other ranks and alphas (peft's rank_pattern / alpha_pattern)
        (
            "all-linear",
            dict(
                r=4,
                lora_alpha=8,
                rank_pattern={"layers.0.attention.to_k": 2, "noise_refiner.0.attention.to_v": 3},
                alpha_pattern={"layers.1.attention.to_q": 2, "context_refiner.0.feed_forward.w2": 16},
            ),
        ),
    ],
    ids=["attention", "all-linear", "mixed-ranks"],
)
def test_the_comfyui_file_makes_the_delta_peft_applies_module_by_module(tiny_transformer, targets, config):
    if targets == "all-linear":
        targets = list(linears(tiny_transformer))
    model, state_dict, alphas = lora_on(tiny_transformer, targets, **config)
    expected = peft_deltas(model)
    assert all(delta.abs().max() > 0 for delta in expected.values())

    kohya = peft_to_kohya_zimage(state_dict, alphas)
    actual = comfy_deltas(kohya, tiny_transformer)
    for path, delta in expected.items():
        assert_close(actual.pop(path), delta, path)
    assert actual == {}  # q, k, v are all trained wherever one of them is: no padding part here
    if targets == ATTENTION:  # the main layers and both refiners: a qkv and an out module each
        assert sorted({k.rsplit(".", 2)[0] for k in kohya if k.endswith(".weight")}) == [
            f"lora_unet_{block}_attention_{m}"
            for block in ("context_refiner_0", "layers_0", "layers_1", "noise_refiner_0")
            for m in ("out", "qkv")
        ]
    # The same with the `transformer.` prefix diffusers' save_lora_weights writes.
    prefixed = peft_to_kohya_zimage({f"transformer.{k}": v for k, v in state_dict.items()}, alphas)
    assert prefixed.keys() == kohya.keys() and all(torch.equal(prefixed[k], kohya[k]) for k in kohya)


def test_qkv_is_block_diagonal_with_alpha_per_part_and_an_untrained_part_is_zero(tiny_transformer):
    """q, k, v trained at rank 4, alpha 8: lora_down is the three downs stacked, lora_up block-diagonal, alpha 24
    over rank 12 (each part's 8 / 4), as musubi-tuner's ComfyUI conversion writes it; with q and v alone, k's
    rows and columns are zero and it changes nothing."""
    model, state_dict, alphas = lora_on(tiny_transformer, ATTENTION, r=4, lora_alpha=8)
    kohya = peft_to_kohya_zimage(state_dict, alphas)
    name = "lora_unet_layers_1_attention_qkv"
    downs = [state_dict[f"layers.1.attention.{p}.lora_A.weight"] for p in ("to_q", "to_k", "to_v")]
    assert torch.equal(kohya[name + ".lora_down.weight"], torch.cat(downs))
    assert kohya[name + ".alpha"].item() == 24.0 and kohya[name + ".alpha"].dtype == torch.float32
    up = kohya[name + ".lora_up.weight"]
    assert up.shape == (96, 12) and not up[:32, 4:].any() and not up[32:64, :4].any() and not up[64:, :8].any()

    model, state_dict, alphas = lora_on(tiny_transformer, ["to_q", "to_v"], r=4, lora_alpha=8)
    kohya = peft_to_kohya_zimage(state_dict, alphas)
    actual = comfy_deltas(kohya, tiny_transformer)
    for path, delta in peft_deltas(model).items():
        assert_close(actual.pop(path), delta, path)
    assert sorted(actual) == [
        f"{b}.attention.to_k" for b in ("context_refiner.0", "layers.0", "layers.1", "noise_refiner.0")
    ]
    assert all(not delta.any() for delta in actual.values())


def test_what_has_no_place_in_the_file_is_one_line():
    with pytest.raises(ZImageKeyError, match="siglip_embedder.1") as info:
        kohya_module("siglip_embedder.1")  # Z-Image-Omni's, not in the layout
    assert isinstance(info.value, SdloraError) and "\n" not in str(info.value)
    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    dora = {
        "layers.0.attention.to_q.lora_A.weight": a,
        "layers.0.attention.to_q.lora_B.weight": b,
        "layers.0.attention.to_q.lora_magnitude_vector": torch.ones(8),
    }
    with pytest.raises(ZImageKeyError, match="DoRA"):
        peft_to_kohya_zimage(dora, {"layers.0.attention.to_q": 2.0})
    with pytest.raises(ZImageKeyError, match="lacks lora_A or lora_B"):
        peft_to_kohya_zimage({"layers.0.attention.to_q.lora_A.weight": a}, {"layers.0.attention.to_q": 2.0})
    with pytest.raises(ZImageKeyError, match="do not fit"):  # the shared fusing's check, under this family's error
        peft_to_kohya_zimage(
            {"layers.0.attention.to_q.lora_A.weight": a, "layers.0.attention.to_q.lora_B.weight": torch.zeros(9, 2)},
            {"layers.0.attention.to_q": 2.0},
        )


def test_every_name_at_z_image_turbo_size_is_an_original_module_and_its_rows_land_where_diffusers_reads_them():
    """A rank-1 LoRA on every linear layer of the full-size Z-Image-Turbo transformer (built on the meta device
    for its shapes), lora_A all ones and lora_B a distinct number per output row. The ComfyUI file's update, as
    one column per module under its original key, is an original checkpoint: diffusers' own converter for such
    checkpoints (`convert_z_image_transformer_checkpoint_to_diffusers`, what `from_single_file` uses) gives back
    each module's numbers in its own rows, under keys the model has: so every name is an original module
    (ComfyUI's `lora_unet_<path>` lookup) and q, k, v sit in the qkv rows where the original has them."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**Z_IMAGE_TURBO)
    modules = linears(model)
    assert len(modules) == 30 * 8 + 2 * 8 + 2 * 7 + 6  # layers and noise refiners 8 linears, context refiners 7
    state_dict, alphas, codes, start = {}, {}, {}, 0
    for path, module in modules.items():
        codes[path] = torch.arange(start, start + module.out_features, dtype=torch.float64)
        start += module.out_features
        state_dict[path + ".lora_A.weight"] = torch.ones(1, module.in_features, dtype=torch.float64)
        state_dict[path + ".lora_B.weight"] = codes[path][:, None]
        alphas[path] = 1.0
    kohya = peft_to_kohya_zimage(state_dict, alphas)
    names = {k.rsplit(".", 2)[0] for k in kohya if k.endswith(".weight")}
    assert len(names) == len(modules) - 2 * 34  # q, k, v fused in each of the 34 blocks

    originals = {native_path(path) for path in modules}
    by_name = {"lora_unet_" + o.replace(".", "_"): o for o in originals}
    assert len(by_name) == len(originals)  # underscores are unambiguous among Z-Image's modules
    assert names == by_name.keys(), sorted(names ^ by_name.keys())[:5]

    columns = {}
    for name in names:
        down, up = kohya[name + ".lora_down.weight"], kohya[name + ".lora_up.weight"]
        columns[by_name[name] + ".weight"] = (up @ down[:, :1]) * (kohya[name + ".alpha"].item() / down.shape[0])
    converted = convert_z_image_transformer_checkpoint_to_diffusers(dict(columns))
    assert converted.keys() == {path + ".weight" for path in modules}
    assert converted.keys() <= model.state_dict().keys()
    for path, code in codes.items():
        assert torch.equal(converted[path + ".weight"][:, 0], code), path
