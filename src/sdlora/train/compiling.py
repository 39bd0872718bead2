"""--compile: regional torch.compile of the UNet (its transformer blocks), for the training steps.

Compiling the repeated blocks, not the whole UNet, is what diffusers recommends
(`ModelMixin.compile_repeated_blocks`): the blocks share one forward, so one `torch.compile` of it
serves them all (a graph per block shape) and compile time stays small. The compiled forward is
set on each block as its own `forward`; no module is wrapped or renamed, so parameter names, the
checkpoint and the exported LoRA's keys stay as they are (no `_orig_mod.`). Text encoders are not
compiled.

Only training steps run the compiled code: a block in eval mode (validation loss and samples, which
`validate` runs with the models in eval) runs eagerly, so validation neither recompiles for its
no-grad batch shapes nor hits dynamo's recompile limit. An error of torch.compile itself (inductor
without a C++ compiler, an unsupported op) is one line naming --compile, not a traceback.
"""

from __future__ import annotations

import logging
import re
import types
from typing import Any, Callable

import torch

from sdlora.config import Config
from sdlora.errors import ConfigError

REPEATED_BLOCKS = ("BasicTransformerBlock",)  # UNet2DConditionModel._repeated_blocks in diffusers >= 0.38
# All blocks share one forward, so one code object holds the graphs of every block width x whether the
# block's inputs need gradients (the first block's do not; the text embeddings stop needing them when the
# token's embedding freezes): SD 1.5 with pivotal tuning needs 10 (measured at 64 px), over dynamo's
# default limit of 8, past which it would fall back to eager with a warning. Sizes other than the
# weights' are dynamic from the start (aspect buckets, prior batches, each level's sequence length).
RECOMPILE_LIMIT = 64


def compile_unet(cfg: Config, unet: Any) -> int:
    """Compile the UNet's transformer blocks in place when --compile is on; how many were compiled."""
    if not cfg.train.compile:
        return 0
    device = next(unet.parameters()).device
    if device.type == "mps":
        raise ConfigError("--compile: torch.compile does not support Apple GPUs (MPS); train without --compile")
    # torch's note that a machine without CUDA has no CUDA_HOME, printed when inductor first builds: noise here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    names = tuple(getattr(unet, "_repeated_blocks", None) or REPEATED_BLOCKS)
    blocks = [module for module in unet.modules() if type(module).__name__ in names]
    compiled: dict[type, Callable[..., Any]] = {}
    for block in blocks:
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = _training_forward(cls.forward, torch.compile(cls.forward, dynamic=True))
        block.forward = types.MethodType(compiled[cls], block)
    return len(blocks)


def _training_forward(eager: Callable[..., Any], compiled: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.training:  # validation and samples: eager
            return eager(self, *args, **kwargs)
        try:
            return compiled(self, *args, **kwargs)
        except Exception as exc:
            if not type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise  # the model's own error (out of memory, a bad shape): as without --compile
            raise ConfigError(
                f"--compile: torch.compile failed ({compile_problem(exc)}); train without --compile"
            ) from exc

    forward.sdlora_compiled = True  # type: ignore[attr-defined]
    return forward


def compiled_blocks(unet: Any) -> int:
    """How many of the UNet's blocks `compile_unet` compiled (0 without --compile)."""
    return sum(bool(getattr(module.__dict__.get("forward"), "sdlora_compiled", False)) for module in unet.modules())


def compile_problem(exc: BaseException) -> str:
    """The gist of a torch.compile error: its innermost cause's first line (with the error's name), cut to 200."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = line if re.match(r"^\w+: ", line) else f"{type(exc).__name__}: {line}".rstrip(": ")
    return text if len(text) <= 200 else text[:197] + "..."
