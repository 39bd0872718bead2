"""`--base-precision` (models/precision.py): the frozen denoiser stored in fp8 (torchao) trains a LoRA whose
files are those of an unquantized base; its Linear weights really take one byte each; nf4 (bitsandbytes,
CUDA) and a bf16 base under fp32 compute are refused with one line, before anything loads."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.config import load_config
from sdlora.errors import ConfigError
from sdlora.models import precision
from sdlora.models.loading import load_pipeline
from sdlora.run import DIFFUSERS_LORA, LORA_DIR, read_metrics
from sdlora.train import loop, resolve

# --base-precision fp8 needs torchao (the test extra installs it); the refusals do not.
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")

runner = CliRunner()


def cfg_for(tmp_path: Path, dataset: Path, model: str, name: str, **flags):
    return load_config(
        None,
        {
            "model.name": model,
            "data.dataset": str(dataset),
            "run.runs_dir": str(tmp_path / "runs"),
            "run.name": name,
            "train.max_steps": 2,
            "train.learning_rate": 1e-3,
            "train.mixed_precision": "no",
            "validation.validate_every": 0,
            "validation.prompts": [],
            "checkpoint.checkpoint_every": 0,
            "embedding.train": False,
            **flags,
        },
    )


def lora_file(run_dir: Path) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...]]], dict[str, str]]:
    """(key -> (dtype, shape), metadata) of a run's diffusers LoRA file."""
    with safe_open(str(run_dir / LORA_DIR / DIFFUSERS_LORA), "pt") as f:
        tensors = {k: (f.get_tensor(k).dtype, tuple(f.get_tensor(k).shape)) for k in f.keys()}
        return tensors, dict(f.metadata() or {})


@needs_torchao
@pytest.mark.parametrize("model", [pytest.param("tiny-sd", marks=pytest.mark.slow), "tiny-flux"])
def test_an_fp8_base_trains_a_lora_whose_file_is_that_of_an_unquantized_base(tmp_path, tiny_dataset, model):
    runs = {}
    for name, base in (("plain", "auto"), ("quantized", "fp8")):
        result = loop.run_training(cfg_for(tmp_path, tiny_dataset, model, name, **{"train.base_precision": base}))
        losses = [r["loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
        runs[base] = result.run_dir
    # The base precision never reaches the LoRA: the same keys, dtypes, shapes and metadata keys.
    (auto, auto_meta), (fp8, fp8_meta) = lora_file(runs["auto"]), lora_file(runs["fp8"])
    assert fp8 == auto and fp8_meta.keys() == auto_meta.keys()
    assert not any(word in value for value in fp8_meta.values() for word in ("fp8", "float8", "precision"))
    # config.yaml records it.
    assert "base_precision: fp8" in (runs["fp8"] / "config.yaml").read_text(encoding="utf-8")
    # The LoRA loads into a plain (unquantized) pipeline of the base.
    pipe, family = load_pipeline(model)
    pipe.load_lora_weights(runs["fp8"] / LORA_DIR)
    assert any("lora" in name for name, _ in getattr(pipe, family.denoiser).named_parameters())


@needs_torchao
def test_fp8_stores_the_denoisers_linear_weights_in_one_byte_each_and_its_lora_trains_in_fp32():
    precision.check("fp8", "no")  # fp8 dequantizes to any compute dtype: fp32 too
    pipe, family = load_pipeline("tiny-sd", base_precision="fp8")
    denoiser = getattr(pipe, family.denoiser)
    linears = [m for m in denoiser.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for layer in linears:
        inner = [getattr(layer.weight, n) for n in layer.weight.__tensor_flatten__()[0]]
        assert torch.float8_e4m3fn in {t.dtype for t in inner}
    numel = sum(layer.weight.numel() for layer in linears)
    stored = sum(precision.stored_bytes(layer.weight) for layer in linears)
    # One byte a weight, plus a float32 scale per output row (tiny-sd's narrowest layers are 32 wide: <= 1/8).
    assert numel <= stored <= 1.2 * numel
    # A LoRA on it: its own weights float32 and trainable, the quantized base frozen.
    from peft import LoraConfig

    denoiser.requires_grad_(False)
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    from diffusers.training_utils import cast_training_params

    cast_training_params(denoiser, dtype=torch.float32)
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def invoke(tmp_path: Path, dataset: Path, *args: str):
    return runner.invoke(
        app,
        ["train", "--model", "tiny-sd", "--dataset", str(dataset), "--runs-dir", str(tmp_path / "runs"), *args],
    )


def test_nf4_on_a_cpu_is_refused_with_one_line_naming_what_it_needs(tmp_path, tiny_dataset, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke(tmp_path, tiny_dataset, "--base-precision", "nf4")
    assert result.exit_code != 0
    line = result.output.strip()
    assert "\n" not in line and "--base-precision nf4" in line and "CUDA" in line and "bitsandbytes" in line
    assert not (tmp_path / "runs").exists()  # refused before the run folder


def test_nf4_without_bitsandbytes_and_bf16_under_fp32_compute_are_refused(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ConfigError, match=r"--base-precision nf4 needs bitsandbytes \(pip install 'sdlora\[bnb\]'\)"):
        precision.check("nf4", "bf16")
    with pytest.raises(ConfigError, match="--base-precision bf16 computes in bf16: it needs --mixed-precision bf16"):
        precision.check("bf16", "no")


def test_fp8_without_torchao_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(ConfigError, match=r"--base-precision fp8 needs torchao \(pip install 'sdlora\[fp8\]'"):
        precision.check("fp8", "bf16")


@needs_torchao
def test_ddp_wraps_an_fp8_base_without_broadcasting_its_quantized_weights(tmp_path, tiny_dataset):
    """DDP broadcasts every parameter as it wraps a model and cannot flatten a torchao weight; the quantized
    ones are left out (each process loaded the same base), the LoRA's gradients still reduce."""
    import os

    import torch.distributed as dist

    from sdlora.train import lora as lora_mod

    if dist.is_initialized():
        pytest.skip("a process group is already up")
    cfg = cfg_for(tmp_path, tiny_dataset, "tiny-sd", "ddp", **{"train.base_precision": "fp8"})
    pipe, family = load_pipeline("tiny-sd", base_precision="fp8")
    cfg = resolve.resolve_family_defaults(cfg, family, pipe)  # the family's --target-modules
    unet, _ = lora_mod.inject_lora(cfg, pipe, family, torch.device("cpu"), torch.float32, torch.device("cpu"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29641")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(unet)
        noisy, t, embeds = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
        ddp(noisy, t, embeds).sample.square().mean().backward()
    finally:
        dist.destroy_process_group()
    grads = [p.grad for p in unet.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


@needs_torchao
def test_an_fp8_layer_keeps_no_dequantized_copy_of_its_weight_for_the_backward():
    """torchao alone keeps `W.dequantize()` for the input's gradient: every layer's weight in bf16 until the
    backward. `Fp8Linear` keeps the fp8 weight itself and dequantizes again, giving the same gradient."""
    import copy

    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(3)]).to(torch.bfloat16)
    layers.requires_grad_(False)
    reference = copy.deepcopy(layers)
    precision.quantize_fp8(layers)
    for layer, plain in zip(layers, reference):
        plain.weight.data = layer.weight.dequantize()  # the same weights, unquantized
    kept = []
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = layers(x)
        out.float().sum().backward()
    assert not [t for t in kept if t.shape == (64, 64)]  # no weight-sized tensor kept
    x2 = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference(x2).float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, x2.grad)
    assert all(isinstance(layer, precision.Fp8Linear) for layer in layers)
