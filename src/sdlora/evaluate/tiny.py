"""Tiny random-weight scorer models of the real architectures, built offline in-process.

`tiny-dino` is a 2-layer, 32-wide transformers ViT (224 px, 16 px patches: the ViT-S/16 layout
shrunk); `tiny-clip` is an open_clip CLIP built from a small config dict, with open_clip's own
BPE tokenizer (shipped inside the package, so no download). Weights come from a fixed seed, so
every process builds the same model and embedding caches stay valid across processes. Their
scores are arithmetic checks and demo numbers only, not measures of likeness.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_DINO = "tiny-dino"
TINY_CLIP = "tiny-clip"
SEED = 0

TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_dino_config():
    from transformers import ViTConfig

    return ViTConfig(
        image_size=224,
        patch_size=16,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        qkv_bias=True,
    )


def tiny_dino() -> torch.nn.Module:
    """A random ViT (no pooler head) with the DINO ViT-S/16 input layout; same weights every call."""
    from transformers import ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return ViTModel(tiny_dino_config(), add_pooling_layer=False).eval()


def tiny_clip() -> tuple[torch.nn.Module, Any, Any]:
    """(model, preprocess, tokenizer) of a random open_clip CLIP; same weights every call."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = open_clip.CLIP(**TINY_CLIP_CONFIG).eval()
    preprocess = image_transform_v2(PreprocessCfg(size=TINY_CLIP_CONFIG["vision_cfg"]["image_size"]), is_train=False)
    tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP_CONFIG["text_cfg"]["context_length"])
    return model, preprocess, tokenizer
