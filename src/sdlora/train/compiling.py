"""--compile: regional torch.compile of the UNet (each transformer block compiled in place).

Compiling the repeated blocks, not the whole UNet, is what diffusers recommends
(`ModelMixin.compile_repeated_blocks`): the blocks share a few shapes, so compile time stays
small, and `nn.Module.compile` works in place, so parameter names (and the exported LoRA's keys)
do not change. Text encoders are not compiled.
"""

from __future__ import annotations

from typing import Any

from sdlora.config import Config

REPEATED_BLOCKS = ("BasicTransformerBlock",)  # UNet2DConditionModel._repeated_blocks in diffusers >= 0.38


def compile_unet(cfg: Config, unet: Any) -> int:
    """Compile the UNet's transformer blocks in place when --compile is on; how many were compiled."""
    if not cfg.train.compile:
        return 0
    names = tuple(getattr(unet, "_repeated_blocks", None) or REPEATED_BLOCKS)
    blocks = [module for module in unet.modules() if type(module).__name__ in names]
    for block in blocks:
        block.compile()
    return len(blocks)
