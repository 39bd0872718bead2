"""--lora-type lokr|loha: peft's adapters, exported in the LyCORIS layout ComfyUI / A1111 / Forge read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import one_line_error
from recipe_helpers import invoke, print_config, straight_and_resumed
from sdlora.train import kohya
from sdlora.train.lora import adapter_config


@pytest.fixture(scope="module")
def tiny_sd():
    from sdlora.models.loading import load_pipeline

    return load_pipeline("tiny-sd", dtype=torch.float32)


def lycoris_delta(tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """A module's weight delta by the LyCORIS formula, as ComfyUI's and A1111's LoKr/LoHa loaders apply it."""
    alpha = float(tensors["alpha"])
    if "hada_w1_a" in tensors:
        w1 = tensors["hada_w1_a"] @ tensors["hada_w1_b"]
        w2 = tensors["hada_w2_a"] @ tensors["hada_w2_b"]
        return (w1 * w2 * alpha / tensors["hada_w1_b"].shape[0]).reshape(shape)
    w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    w2 = tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
    dim = next((tensors[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in tensors), None)
    return (torch.kron(w1, w2) * (alpha / dim if dim else 1.0)).reshape(shape)


def adapted(pipe, arch, flags: dict, seed: int = 0):
    """A deep copy of tiny-sd's UNet with a randomly initialised adapter of `flags`."""
    import copy

    from peft import inject_adapter_in_model

    from sdlora.config import load_config

    cfg = load_config(None, {"model.name": "tiny-sd", **flags}, [])
    config = adapter_config(cfg, ["to_q", "to_k", "to_v", "to_out.0"])
    config.init_weights = False  # random factors: a non-zero delta to compare
    unet = copy.deepcopy(pipe.unet)
    torch.manual_seed(seed)
    inject_adapter_in_model(config, unet, "default")
    return unet


@pytest.mark.parametrize(
    "flags, factors",
    [
        ({"lora.lora_type": "lokr", "lora.rank": 2, "lora.alpha": 3.0}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
        ({"lora.lora_type": "lokr", "lora.rank": 8, "lora.alpha": 3.0}, {"lokr_w1", "lokr_w2"}),  # both full
        (
            {"lora.lora_type": "lokr", "lora.rank": 2, "lora.lokr_factor": 16, "lora.lokr_decompose_both": True},
            {"lokr_w1_a", "lokr_w1_b", "lokr_w2"},  # 64 = 16 x 4: the 16x16 factor low-rank, the 4x4 full
        ),
        (
            {"lora.lora_type": "loha", "lora.rank": 2, "lora.alpha": 3.0},
            {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
        ),
    ],
)
def test_lycoris_file_round_trips_and_its_delta_is_peft_s(tiny_sd, flags, factors):
    from peft import get_peft_model_state_dict

    pipe, arch = tiny_sd
    unet = adapted(pipe, arch, flags)
    names = kohya.KohyaNames.for_models(arch, unet.config)
    peft_sd = get_peft_model_state_dict(unet, adapter_name="default")
    scales = kohya.lycoris_scales(unet)
    out = kohya.peft_to_lycoris({kohya.UNET: peft_sd}, {kohya.UNET: scales}, names)

    # Names, both ways: every module's kohya name reads back as its path, and every tensor comes back.
    for path in scales:
        assert names.from_kohya(names.to_kohya(kohya.UNET, path)) == (kohya.UNET, path)
    back, alphas = kohya.lycoris_to_peft(out, names)
    assert set(back[kohya.UNET]) == set(peft_sd) and set(alphas[kohya.UNET]) == set(scales)
    assert {k.rpartition(".")[2] for k in out} == factors | {"alpha"}

    # Each module's delta by the LyCORIS formula (what ComfyUI / A1111 add to the weight) is peft's own.
    modules = dict(unet.named_modules())
    for path in scales:
        name = names.to_kohya(kohya.UNET, path)
        tensors = {k.rpartition(".")[2]: v for k, v in out.items() if k.rpartition(".")[0] == name}
        module = modules[path]
        expected = module.get_delta_weight("default")
        torch.testing.assert_close(
            lycoris_delta(tensors, module.get_base_layer().weight.shape), expected, atol=1e-6, rtol=1e-5
        )


def test_lokr_trains_resumes_exactly_and_exports_lycoris(tmp_path: Path, tiny_dataset: Path):
    flags = {"lora.lora_type": "lokr", "lora.rank": 2, "lora.lokr_factor": 8, "lora.train_text_encoder": True}
    _, resumed = straight_and_resumed(tmp_path, tiny_dataset, flags)
    path = resumed.lora_dir / f"{resumed.run_dir.name}.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == "lokr"
    assert any(k.startswith("lora_unet_") and k.endswith(".lokr_w1") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") and ".lokr_w" in k for k in keys)
    with safe_open(str(resumed.lora_dir / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert f.metadata()["sdlora.format"] == "diffusers" and "peft only" in f.metadata()["sdlora.load_in"]
        saved = {k: f.get_tensor(k) for k in f.keys()}
    # `sdlora sample` / `score` load it back (peft's path: diffusers' loader reads no LyCORIS), every weight.
    from peft import get_peft_model_state_dict

    from sdlora.generate import ADAPTER, load_lora
    from sdlora.models.loading import load_pipeline

    pipe, arch = load_pipeline("tiny-sd", dtype=torch.float32)
    load_lora(pipe, arch, resumed.lora_dir, "sksToy")
    for name in ("unet", "text_encoder"):
        loaded = get_peft_model_state_dict(getattr(pipe, name), adapter_name=ADAPTER)
        expected = {k[len(name) + 1 :]: v for k, v in saved.items() if k.startswith(name + ".")}
        assert expected and set(loaded) == set(expected), name
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), name


def test_lycoris_flags_yaml_and_bad_values():
    printed = print_config("--lora-type", "lokr", "--lokr-factor", "4", "--lokr-decompose-both")["lora"]
    assert (printed["lora_type"], printed["lokr_factor"], printed["lokr_decompose_both"]) == ("lokr", 4, True)
    one_line_error(invoke("--config", "tiny", "--lora-type", "lycoris"), "lycoris")
    one_line_error(invoke("--config", "tiny", "--lora-type", "loha", "--dora"), "--dora needs --lora-type lora")
    one_line_error(
        invoke("--config", "tiny", "--lora-type", "lokr", "--lokr-factor", "0"), "--lokr-factor must be at least 1"
    )
    one_line_error(
        invoke("--config", "tiny", "--lora-type", "lokr", "--loraplus-ratio", "16"),
        "--loraplus-ratio needs --lora-type lora",
    )
