"""How the frozen denoiser (UNet or transformer) is stored while a LoRA trains on it: `--base-precision`.

- auto: in the compute dtype of `--mixed-precision` (fp32, fp16 or bf16), as sdlora always stored it.
- bf16: in bfloat16 (2 bytes a weight); it computes in bf16 too, so it needs `--mixed-precision bf16`.
- fp8: the Linear layers' weights in float8 e4m3 with a scale per output row (1 byte a weight), through
  torchao's `Float8WeightOnlyConfig`; each forward dequantizes a layer's weight to the compute dtype. Runs
  on a CPU too. The other layers (convolutions, norms, embeddings) stay in the compute dtype.
- nf4: the Linear layers' weights in 4-bit NormalFloat (QLoRA's), through bitsandbytes: CUDA only.

The names follow the field: SimpleTuner's `base_model_precision` option (`fp8-torchao`, `nf4-bnb`,
`int8-quanto`), ai-toolkit's `quantize: true` (optimum-quanto's `qfloat8`), OneTrainer's weight dtypes
(`FLOAT_8`, `NFLOAT_4`) and diffusers' QLoRA example (bitsandbytes `bnb_4bit_quant_type="nf4"`) all name
the storage format; sdlora names it without the backend, since there is one for each.

fp8 uses torchao rather than optimum-quanto (both train a peft LoRA over their fp8 weights on a CPU): peft
has a LoRA layer of its own for torchao's weights (`TorchaoLoraLinear`), torchao is PyTorch's own and
maintained, and optimum-quanto's last release was in March 2025.

The LoRA's weights stay float32 and trainable whatever the base's storage; nothing of it reaches the
exported files (the LoRA's keys and tensors are the same as over an unquantized base).
"""

from __future__ import annotations

from typing import Any

import torch

from sdlora.errors import ConfigError

BASE_PRECISIONS = ("auto", "bf16", "fp8", "nf4")
FLAG = "--base-precision"


def check(base_precision: str, mixed_precision: str) -> None:
    """ConfigError (one line) for a base precision this machine or the resolved `--mixed-precision` cannot
    train with; called before anything loads."""
    if base_precision == "bf16" and mixed_precision != "bf16":
        raise ConfigError(
            f"{FLAG} bf16 computes in bf16: it needs --mixed-precision bf16 (got {mixed_precision}); "
            f"or {FLAG} fp8, which works with any"
        )
    if base_precision == "fp8":
        _torchao()
    if base_precision == "nf4":
        _bitsandbytes()


def _torchao() -> Any:
    try:
        import torchao.quantization
    except ImportError:
        raise ConfigError(
            f"{FLAG} fp8 needs torchao (pip install 'sdlora[fp8]' or pip install torchao); or {FLAG} bf16"
        ) from None
    return torchao.quantization


def _bitsandbytes() -> Any:
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{FLAG} nf4 needs a CUDA GPU and bitsandbytes (pip install 'sdlora[bnb]'); on this machine use {FLAG} fp8"
        )
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(f"{FLAG} nf4 needs bitsandbytes (pip install 'sdlora[bnb]'); or {FLAG} fp8") from None
    return bitsandbytes


def storage_dtype(base_precision: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype the denoiser's weights load in: bf16's, else the compute dtype (fp8 and nf4 quantize the
    Linear weights from it, and dequantize back to it)."""
    return torch.bfloat16 if base_precision == "bf16" else compute_dtype


def nf4_config(denoiser: str, compute_dtype: torch.dtype) -> Any:
    """diffusers' load-time quantization of the pipeline's `denoiser` to NF4 (bitsandbytes): each weight is
    quantized as it loads, as diffusers' QLoRA example for FLUX does (BitsAndBytesConfig, nf4)."""
    from diffusers import PipelineQuantizationConfig

    _bitsandbytes()
    return PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute_dtype},
        components_to_quantize=[denoiser],
    )


def quantize_fp8(denoiser: Any) -> None:
    """The denoiser's Linear weights to float8 e4m3, in place, one layer at a time (torchao's
    `Float8WeightOnlyConfig`: a scale per output row; the forward dequantizes to the weight's dtype); each
    such layer then computes through `Fp8Linear`."""
    quantization = _torchao()
    quantization.quantize_(denoiser, quantization.Float8WeightOnlyConfig())
    for module in denoiser.modules():
        if type(module) is torch.nn.Linear and _quantized(module.weight):
            module.__class__ = Fp8Linear


def _quantized(tensor: torch.Tensor) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return is_traceable_wrapper_subclass(tensor)


class _FrozenFp8Linear(torch.autograd.Function):
    """y = x W^T + b for a frozen fp8 W, keeping only W itself for the backward.

    torchao's weight-only fp8 Linear computes `x @ W.dequantize()`, and autograd keeps that dequantized
    copy for the input's gradient: every layer's weight in the compute dtype until the backward, more than
    a bf16 base holds (it keeps references to its own weights). Here the backward dequantizes again, as
    optimum-quanto's QLinear does (`QuantizedLinearFunction`). W and b are frozen: no gradient of theirs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # the frozen parameter itself: nothing new stays alive
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight = ctx.weight.dequantize()
        return grad.to(weight.dtype) @ weight, None, None


class Fp8Linear(torch.nn.Linear):
    """A Linear layer whose weight torchao stores in fp8: `_FrozenFp8Linear`'s forward (peft's LoRA wraps
    it as it wraps any Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenFp8Linear.apply(x, self.weight, self.bias)


def keep_from_ddp(model: Any) -> None:
    """DDP leaves the quantized weights alone: it broadcasts every parameter from the first process as it
    wraps a model, and cannot flatten a torchao weight ("Only support reshaping from 2D to 3D"); every
    process loaded the same frozen base, so there is nothing to sync. Call with the LoRA in (its names)."""
    quantized = [name for name, p in model.named_parameters() if _quantized(p)]
    if quantized:
        model._ddp_params_and_buffers_to_ignore = (
            quantized  # what DDP's _set_params_and_buffers_to_ignore_for_model sets
        )


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes a (possibly quantized) weight takes: the tensors a torchao weight keeps inside
    (float8 data and its scales), else its own."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
