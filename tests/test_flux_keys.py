"""models/families/flux_keys.py: FLUX.1 LoRA keys between peft on FluxTransformer2DModel and the
sd-scripts / ComfyUI layout (`lora_unet_double_blocks_N_img_attn_qkv`, q, k, v fused)."""

from __future__ import annotations

import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.models.families.flux_keys import (
    SCALE_FOLDED,
    FluxKeyError,
    diffusers_parts,
    kohya_flux_to_peft,
    kohya_module,
    peft_to_kohya_flux,
)

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' Flux LoRA example's attention targets

# What the tests know independently of the module: the rows of a fused kohya module, in order.
FUSED_ROWS = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}


@pytest.fixture(scope="module")
def tiny_transformer():
    from sdlora.models.tiny import tiny_flux

    return tiny_flux().transformer


def linear_paths(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def lora_on(transformer, targets, **config):
    """A copy of `transformer` with a random-weight LoRA (lora_B non-zero too): (model, peft state dict, alphas)."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict

    from sdlora.train.kohya import module_alphas

    model = copy.deepcopy(transformer)
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(target_modules=targets, init_lora_weights=False, **config))
    return model, get_peft_model_state_dict(model), module_alphas(model)


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """Each LoRA module's merged weight minus its base weight, as peft merges it."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer().weight.detach().clone()
            module.merge()
            deltas[path] = module.get_base_layer().weight.detach() - base
            module.unmerge()
    return deltas


def kohya_deltas(kohya: dict[str, torch.Tensor], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """The update a reader (ComfyUI, sd-scripts) applies, up @ down * alpha / rank, per diffusers module:
    fused modules split by rows ([q; k; v(; mlp)]), final_layer's (shift, scale) rows swapped back."""
    out = {}
    for key in kohya:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        down, up = kohya[key].double(), kohya[name + ".lora_up.weight"].double()
        delta = up @ down * (kohya[name + ".alpha"].item() / down.shape[0])
        body = name[len("lora_unet_") :]
        inner = next((k for k in FUSED_ROWS if body.endswith("_" + k)), None)
        if inner is None:
            ((path, _),) = diffusers_parts(name)
            if path == "norm_out.linear":
                shift, scale = delta.chunk(2)
                delta = torch.cat([scale, shift])
            out[path] = delta
            continue
        block = "transformer_blocks" if body.startswith("double_blocks_") else "single_transformer_blocks"
        index = body.split("_")[2]
        top = 0
        for part in FUSED_ROWS[inner]:
            path = f"{block}.{index}.{part}"
            out[path] = delta[top : top + sizes[path]]
            top += sizes[path]
        assert top == delta.shape[0], name
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(expected.abs().max().item(), 1e-12)
    assert actual.shape == expected.shape, what
    assert (actual.double() - expected.double()).abs().max().item() <= 1e-6 * scale, what


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
                rank_pattern={"single_transformer_blocks.0.attn.to_k": 2, "transformer_blocks.0.attn.add_v_proj": 3},
                alpha_pattern={"transformer_blocks.0.attn.to_q": 2, "single_transformer_blocks.0.proj_mlp": 16},
            ),
        ),
    ],
    ids=["attention", "all-linear", "mixed-ranks"],
)
def test_the_kohya_file_makes_the_delta_peft_applies_module_by_module(tiny_transformer, targets, config):
    if targets == "all-linear":
        targets = linear_paths(tiny_transformer)
    model, state_dict, alphas = lora_on(tiny_transformer, targets, **config)
    expected = peft_deltas(model)
    assert all(delta.abs().max() > 0 for delta in expected.values())

    kohya = peft_to_kohya_flux(state_dict, alphas)
    sizes = {p: m.out_features for p, m in tiny_transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    actual = kohya_deltas(kohya, sizes)
    for path, delta in expected.items():
        assert_close(actual.pop(path), delta, path)
    # What is left are the untrained parts of fused modules (proj_mlp beside an attention LoRA): no update.
    assert all(not delta.any() for delta in actual.values()), sorted(actual)
    if targets == ATTENTION:
        assert sorted(actual) == ["single_transformer_blocks.0.proj_mlp"]
        assert sorted({k.rsplit(".", 2)[0] for k in kohya}) == [
            "lora_unet_double_blocks_0_img_attn_proj",
            "lora_unet_double_blocks_0_img_attn_qkv",
            "lora_unet_single_blocks_0_linear1",
        ]
    # The same with the `transformer.` prefix diffusers' save_lora_weights writes.
    prefixed = peft_to_kohya_flux({f"transformer.{k}": v for k, v in state_dict.items()}, alphas)
    assert prefixed.keys() == kohya.keys() and all(torch.equal(prefixed[k], kohya[k]) for k in kohya)


def test_fused_modules_are_block_diagonal_with_alpha_per_part(tiny_transformer):
    """q, k, v trained at rank 4, alpha 8: lora_down is the three downs stacked, lora_up block-diagonal,
    alpha 24 over rank 12 (each part's 8 / 4); linear1's MLP block, untrained, is zero."""
    model, state_dict, alphas = lora_on(tiny_transformer, ATTENTION, r=4, lora_alpha=8)
    kohya = peft_to_kohya_flux(state_dict, alphas)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    downs = [state_dict[f"transformer_blocks.0.attn.{p}.lora_A.weight"] for p in ("to_q", "to_k", "to_v")]
    assert torch.equal(kohya[name + ".lora_down.weight"], torch.cat(downs))
    assert kohya[name + ".alpha"].item() == 24.0 and kohya[name + ".alpha"].dtype == torch.float32
    up = kohya[name + ".lora_up.weight"]
    assert up.shape == (96, 12) and not up[:32, 4:].any() and not up[32:64, :4].any() and not up[64:, :8].any()
    linear1 = "lora_unet_single_blocks_0_linear1"
    assert kohya[linear1 + ".lora_down.weight"].shape == (16, 32) and kohya[linear1 + ".alpha"].item() == 32.0
    assert not kohya[linear1 + ".lora_up.weight"][96:].any() and not kohya[linear1 + ".lora_down.weight"][12:].any()


# ====================================================================== full-size names


FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


class _Checkpoint(dict):
    """A BFL checkpoint for diffusers' single-file converter that records every key it reads, and
    answers a key it lacks (biases, norm scales) with a meta tensor as tall as its weight (or linear1)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__(tensors)
        self.read: set[str] = set()

    def pop(self, key, *default):
        self.read.add(key)
        if key in self:
            return super().pop(key)
        sibling = self.get(key.rsplit(".", 1)[0] + ".weight")
        rows = sibling.shape[0] if sibling is not None else 7 * 3072  # splits as q, k, v, mlp
        return torch.empty(rows, 1, dtype=torch.float64, device="meta")


def test_every_kohya_name_for_flux1_dev_is_a_bfl_module_and_its_rows_land_where_diffusers_reads_them():
    """A rank-1 LoRA on every linear layer of the full-size FLUX.1 [dev] transformer (built on the meta
    device for its shapes), lora_A all ones and lora_B a distinct number per output row. The kohya
    file's update, as one column per module, is a BFL checkpoint: diffusers' own BFL -> diffusers
    converter (`convert_flux_transformer_checkpoint_to_diffusers`, the one `from_single_file` uses)
    reads every key of it, and gives back each module's numbers in its rows: so each kohya name is the
    BFL module (ComfyUI's `lora_unet_<BFL path>` lookup) and q, k, v, mlp and the final layer's
    (shift, scale) rows sit where BFL has them."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
    linears = {p: m for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 19 * 14 + 38 * 6 + 10
    state_dict, alphas, codes, start = {}, {}, {}, 0
    for path, module in linears.items():
        codes[path] = torch.arange(start, start + module.out_features, dtype=torch.float64)
        start += module.out_features
        state_dict[path + ".lora_A.weight"] = torch.ones(1, module.in_features, dtype=torch.float64)
        state_dict[path + ".lora_B.weight"] = codes[path][:, None]
        alphas[path] = 1.0
    kohya = peft_to_kohya_flux(state_dict, alphas)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    assert len(names) == 19 * 10 + 38 * 3 + 10  # qkv fused in twos of three, linear1 of four

    # The BFL keys the converter reads for this config, and the underscored names ComfyUI looks them up by.
    seed = {"double_blocks.18.x": None, "single_blocks.37.x": None, "guidance_in.x": None}
    probe = _Checkpoint(dict(seed))
    convert_flux_transformer_checkpoint_to_diffusers(probe)
    bfl = {k[: -len(".weight")] for k in probe.read if k.endswith(".weight")}
    by_kohya_name = {"lora_unet_" + b.replace(".", "_"): b for b in bfl}
    assert len(by_kohya_name) == len(bfl)  # underscores are unambiguous among FLUX.1's modules
    assert names <= by_kohya_name.keys(), sorted(names - by_kohya_name.keys())[:5]
    assert names == by_kohya_name.keys()  # every BFL linear layer is reachable (all were trained)

    # Each kohya module's update, column 0 (lora_A is all ones), under its BFL key.
    columns = {}
    for name in names:
        down, up = kohya[name + ".lora_down.weight"], kohya[name + ".lora_up.weight"]
        scale = kohya[name + ".alpha"].item() / down.shape[0]
        columns[by_kohya_name[name] + ".weight"] = (up @ down[:, :1]) * scale
    checkpoint = _Checkpoint({**columns, **seed})
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert not (columns.keys() & checkpoint.keys())  # the converter took every module written
    for path, code in codes.items():
        assert torch.equal(converted[path + ".weight"][:, 0], code), path


def test_diffusers_reads_the_kohya_file_as_peft_wrote_it_at_flux1_dev_size():
    """diffusers' kohya FLUX loader (`_convert_kohya_flux_lora_to_diffusers`, what `load_lora_weights`
    calls for `lora_unet_` keys) turns the file back into per-module LoRAs whose update equals peft's,
    alpha / rank 2 included: the fused modules through its block-diagonal path, the final layer, whose
    alpha it ignores, through the folded scale."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
    state_dict, alphas, codes, start = {}, {}, {}, 0
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            codes[path] = torch.arange(start, start + module.out_features, dtype=torch.float64)
            start += module.out_features
            state_dict[path + ".lora_A.weight"] = torch.ones(1, module.in_features, dtype=torch.float64)
            state_dict[path + ".lora_B.weight"] = codes[path][:, None]
            alphas[path] = 2.0
    loaded = _convert_kohya_flux_lora_to_diffusers(peft_to_kohya_flux(state_dict, alphas))
    # diffusers 0.42 names the modules outside the blocks without `transformer.`, so `load_lora_weights`
    # leaves them out (x_embedder, norm_out.linear, ...): for those, diffusers loads the diffusers file.
    loaded = {k.removeprefix("transformer."): v for k, v in loaded.items()}
    assert {k.rsplit(".", 2)[0] for k in loaded} == set(codes)
    for path, code in codes.items():
        a, b = loaded[f"{path}.lora_A.weight"], loaded[f"{path}.lora_B.weight"]
        assert a.shape[0] == 1, path  # the block-diagonal path: each part its own rank-1 LoRA
        assert torch.equal((b @ a[:, :1])[:, 0], 2 * code), path


# ====================================================================== round trip


@pytest.mark.parametrize("mixed", [False, True], ids=["same-ranks", "mixed-ranks"])
def test_peft_to_kohya_and_back_gives_the_same_lora(tiny_transformer, mixed):
    config = dict(r=4, lora_alpha=8)
    if mixed:
        config |= dict(
            rank_pattern={"single_transformer_blocks.0.attn.to_k": 2},
            alpha_pattern={"transformer_blocks.0.attn.to_q": 2},
        )
    model, state_dict, alphas = lora_on(tiny_transformer, linear_paths(tiny_transformer), **config)
    back, back_alphas = kohya_flux_to_peft(peft_to_kohya_flux(state_dict, alphas))
    assert back.keys() == state_dict.keys() and back_alphas.keys() == alphas.keys()
    fused = {p for p in alphas if kohya_module(p)[0].endswith(("_qkv", "_linear1"))}
    for path, alpha in alphas.items():
        a, b = state_dict[path + ".lora_A.weight"], state_dict[path + ".lora_B.weight"]
        a2, b2 = back[path + ".lora_A.weight"], back[path + ".lora_B.weight"]
        if path not in SCALE_FOLDED and (not mixed or path not in fused):  # same parameters, bit for bit
            assert torch.equal(a2, a) and torch.equal(b2, b) and back_alphas[path] == alpha, path
        # and always the same update
        assert_close(b2 @ a2 * (back_alphas[path] / a2.shape[0]), b @ a * (alpha / a.shape[0]), path)


def test_an_attention_lora_comes_back_without_the_untrained_mlp_part(tiny_transformer):
    _, state_dict, alphas = lora_on(tiny_transformer, ATTENTION, r=4, lora_alpha=8)
    back, back_alphas = kohya_flux_to_peft(peft_to_kohya_flux(state_dict, alphas))
    assert back.keys() == state_dict.keys() and back_alphas == alphas
    assert all(torch.equal(back[k], v) for k, v in state_dict.items())


def test_a_dense_sd_scripts_linear1_splits_into_parts_with_the_whole_down():
    """sd-scripts trains linear1 as one Linear: a dense rank-4 LoRA over 7h rows. Each part reads the
    whole lora_down and its rows of lora_up at the file's alpha; ComfyUI's `diffusion_model.` keys too."""
    torch.manual_seed(1)
    h = 8
    down, up = torch.randn(4, h), torch.randn(7 * h, 4)
    for prefix in ("lora_unet_single_blocks_5_linear1", "diffusion_model.single_blocks.5.linear1"):
        lora, alphas = kohya_flux_to_peft(
            {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up, f"{prefix}.alpha": torch.tensor(2.0)}
        )
        parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
        assert sorted(alphas) == sorted(f"single_transformer_blocks.5.{p}" for p in parts)
        full = up @ down * 0.5
        rows = torch.split(full, [h, h, h, 4 * h])
        for part, expected in zip(parts, rows):
            path = f"single_transformer_blocks.5.{part}"
            assert torch.equal(lora[path + ".lora_A.weight"], down) and alphas[path] == 2.0
            assert_close(lora[path + ".lora_B.weight"] @ down * 0.5, expected, path)
    # No alpha: alpha = rank (scale 1), as sd-scripts reads it.
    lora, alphas = kohya_flux_to_peft(
        {"lora_unet_img_in.lora_down.weight": down, "lora_unet_img_in.lora_up.weight": up}
    )
    assert alphas == {"x_embedder": 4.0} and torch.equal(lora["x_embedder.lora_B.weight"], up)


# ====================================================================== bad keys


@pytest.mark.parametrize(
    "key",
    [
        "transformer_blocks.0.attn.norm_q.lora_A.weight",  # not a linear layer BFL has
        "transformer_blocks.0.attn.to_q.lora_magnitude_vector",  # DoRA
        "transformer_blocks.0.attn.to_q.lora_B.bias",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
    ],
)
def test_a_peft_key_without_a_place_is_a_one_line_error_naming_it(key):
    state_dict = {key: torch.zeros(2, 2), "x_embedder.lora_A.weight": torch.zeros(2, 4)}
    state_dict["x_embedder.lora_B.weight"] = torch.zeros(4, 2)
    if key.endswith(".lora_A.weight"):
        state_dict[key.replace("lora_A", "lora_B")] = torch.zeros(2, 2)
    alphas = {k.rsplit(".", 2)[0]: 1.0 for k in state_dict}
    with pytest.raises(SdloraError) as error:
        peft_to_kohya_flux(state_dict, alphas)
    message = str(error.value)
    assert "\n" not in message and key in message, message


@pytest.mark.parametrize(
    "key",
    [
        "lora_unet_double_blocks_0_img_attn_foo.lora_down.weight",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_unet_single_blocks_0_linear1.dora_scale",
        "lora_unet_double_block_0_img_attn_qkv.lora_down.weight",
    ],
)
def test_a_kohya_key_without_a_place_is_a_one_line_error_naming_it(key):
    with pytest.raises(FluxKeyError) as error:
        kohya_flux_to_peft({key: torch.zeros(2, 2)})
    assert "\n" not in str(error.value) and key in str(error.value)


def test_a_fused_module_of_the_wrong_size_is_a_one_line_error():
    with pytest.raises(
        FluxKeyError, match=r"^lora_unet_double_blocks_0_img_attn_qkv: lora_up has 20 rows, expected 24"
    ):
        kohya_flux_to_peft(
            {
                "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8),
                "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(20, 2),
            }
        )
    with pytest.raises(FluxKeyError, match="no lora_alpha known for FLUX.1 module 'x_embedder'"):
        peft_to_kohya_flux(
            {"x_embedder.lora_A.weight": torch.zeros(2, 4), "x_embedder.lora_B.weight": torch.zeros(4, 2)}, {}
        )
    with pytest.raises(
        FluxKeyError, match=r"^single_transformer_blocks.0.attn.to_k: lora_A \(4, 32\) / lora_B \(30, 4\) do not fit"
    ):
        peft_to_kohya_flux(
            {
                "single_transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(4, 32),
                "single_transformer_blocks.0.attn.to_k.lora_B.weight": torch.zeros(30, 4),
            },
            {"single_transformer_blocks.0.attn.to_k": 4.0},
        )
