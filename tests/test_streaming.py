"""models/streaming.py: a model folder's weights read tensor by tensor into their storage dtype give the model
diffusers' own `from_pretrained(dtype=...)` gives, from one file, shards or a variant; anything it cannot
read exactly is left to diffusers (None)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdlora.models.streaming import load_model
from sdlora.models.tiny import tiny_flux, tiny_sd


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """tiny-sd's UNet and tiny-flux's transformer saved as diffusers folders: whole, in shards, as variant fp16."""
    root = tmp_path_factory.mktemp("streaming")
    folders = {}
    for name, build, part in (("unet", tiny_sd, "unet"), ("transformer", tiny_flux, "transformer")):
        model = getattr(build(), part)
        model.save_pretrained(root / name)
        model.save_pretrained(root / f"{name}-shards", max_shard_size="200KB")
        model.save_pretrained(root / f"{name}-fp16", variant="fp16")
        folders[name] = root / name
    return folders


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("part", ["unet", "transformer"])
@pytest.mark.parametrize("layout", ["", "-shards", "-fp16"])
def test_the_streamed_model_is_diffusers_own_in_the_same_dtype(saved, part, layout):
    folder = saved[part].with_name(part + layout)
    variant = "fp16" if layout == "-fp16" else None
    if layout == "-shards":
        assert len(list(folder.glob("*.safetensors"))) > 1
    got = load_model(folder, torch.bfloat16, variant)
    assert got is not None and not got.training
    reference = type(got).from_pretrained(folder, torch_dtype=torch.bfloat16, variant=variant)
    assert same(got, reference)
    assert {p.device.type for p in got.parameters()} == {"cpu"}  # nothing left on the meta device


def test_it_maps_no_file(saved, monkeypatch):
    """Plain reads, never a memory map of the file (whose converted pages would all stay mapped)."""
    import mmap

    import safetensors

    def refused(*args, **kwargs):
        raise AssertionError("mapped")

    monkeypatch.setattr(mmap, "mmap", refused)
    monkeypatch.setattr(safetensors, "safe_open", refused)
    monkeypatch.setattr(safetensors.torch, "load_file", refused)
    assert load_model(saved["unet"], torch.bfloat16) is not None


def test_what_it_cannot_read_exactly_is_left_to_diffusers(saved, tmp_path):
    # No safetensors file (a .bin folder): None.
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((saved["unet"] / "config.json").read_text())
    assert load_model(bin_folder, torch.bfloat16) is None
    # Keys that are not the model's (a legacy layout diffusers converts): None.
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((saved["unet"] / "config.json").read_text())
    weights = load_file(saved["unet"] / "diffusion_pytorch_model.safetensors")
    save_file({f"old.{k}": v for k, v in weights.items()}, renamed / "diffusion_pytorch_model.safetensors")
    assert load_model(renamed, torch.bfloat16) is None
    # A dtype the reader has no table entry for (here one tensor stored as unsigned 16-bit): None, not a KeyError.
    unknown = tmp_path / "unknown-dtype"
    unknown.mkdir()
    (unknown / "config.json").write_text((saved["unet"] / "config.json").read_text())
    first = next(iter(weights))
    save_file({**weights, first: weights[first].to(torch.uint16)}, unknown / "diffusion_pytorch_model.safetensors")
    assert load_model(unknown, torch.bfloat16) is None


@pytest.mark.parametrize("part", ["unet", "transformer"])
def test_each_linear_layer_quantizes_as_it_comes_in_to_what_quantizing_the_loaded_model_gives(saved, part):
    """--base-precision fp8: each Linear layer quantized as soon as its tensors are read (never the whole model
    in bf16 first), to exactly the weights that quantizing the whole loaded model gives."""
    pytest.importorskip("torchao")
    from sdlora.models.precision import quantize_fp8

    layers = []

    def spy(module):
        layers.append(module)
        quantize_fp8(module)

    got = load_model(saved[part], torch.bfloat16, quantize=spy)
    reference = load_model(saved[part], torch.bfloat16)
    quantize_fp8(reference)
    linears = [m for m in got.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == len(linears) and all(any(m is layer for layer in layers) for m in linears)
    for (name, a), (_, b) in zip(got.state_dict().items(), reference.state_dict().items()):
        if hasattr(a, "qdata"):
            assert torch.equal(a.qdata.view(torch.uint8), b.qdata.view(torch.uint8)) and torch.equal(a.scale, b.scale)
        else:
            assert torch.equal(a, b), name
