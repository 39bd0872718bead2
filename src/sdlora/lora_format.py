"""The LoRA files' own format: the names training writes and sampling reads, declared once.

The file names live in the run-folder contract (`sdlora.run`: pytorch_lora_weights.safetensors,
embeddings.safetensors); this module holds what is inside them: sdlora's metadata keys in the
safetensors headers, and the keys of the token's embedding per text encoder.
"""

from __future__ import annotations

from typing import Any

META_PREFIX = "sdlora."  # sdlora's own header keys; kohya's `ss_*` and modelspec keys sit beside them
STEPS = f"{META_PREFIX}steps"  # the training step each exported file was written at
PEFT_CONFIG = f"{META_PREFIX}peft_config"  # a LoKr/LoHa run's peft configs (JSON), to rebuild its adapters

# The token embedding's key per text encoder, as A1111 / ComfyUI / diffusers' advanced SDXL script write them.
SD1_EMBEDDING_KEY = "emb_params"
SDXL_EMBEDDING_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def embedding_keys(arch: Any) -> dict[str, str]:
    """Pipeline text-encoder attribute -> key in embeddings.safetensors."""
    return SDXL_EMBEDDING_KEYS if arch.is_sdxl else {arch.text_encoders[0]: SD1_EMBEDDING_KEY}
