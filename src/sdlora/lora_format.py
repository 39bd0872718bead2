"""The LoRA files' own format: the names training writes and sampling reads, declared once.

The file names live in the run-folder contract (`sdlora.run`: pytorch_lora_weights.safetensors,
embeddings.safetensors); this module holds what is inside them: sdlora's metadata keys in the
safetensors headers, and how the keys of the token's embedding are read off the model family.
"""

from __future__ import annotations

from typing import Any

META_PREFIX = "sdlora."  # sdlora's own header keys; kohya's `ss_*` and modelspec keys sit beside them
STEPS = f"{META_PREFIX}steps"  # the training step each exported file was written at
PEFT_CONFIG = f"{META_PREFIX}peft_config"  # a LoKr/LoHa run's peft configs (JSON), to rebuild its adapters


def embedding_keys(family: Any) -> dict[str, str]:
    """Pipeline text-encoder attribute -> the key in embeddings.safetensors its vector is read from (each family
    declares its own, as A1111 / ComfyUI / diffusers' scripts write them; the first where it names two), in the
    family's text-encoder order."""
    keys: dict[str, str] = {}
    for encoder, key in family.embedding_keys:
        keys.setdefault(encoder, key)
    return keys


def embedding_file_keys(family: Any) -> list[tuple[str, str]]:
    """(text-encoder attribute, key) of every tensor embeddings.safetensors holds: a vector is written under a
    second key where another reader looks there (FLUX.1's T5: diffusers' scripts read `t5`, ComfyUI `t5xxl`)."""
    return list(family.embedding_keys)
