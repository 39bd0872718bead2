"""The prompt cache is encoded in bf16 under bf16 training (train/encode.py `text_dtype`), as diffusers' LoRA
examples run their text encoders in the weight dtype: half the device memory of the caching phase, which is
the peak on a small card for the transformer families (T5-XXL, Qwen3-4B). fp16 and fp32 runs keep fp32."""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.models.families import FLUX1
from sdlora.train import cache as cache_mod
from sdlora.train.encode import text_dtype


def test_bf16_training_caches_prompts_in_bf16_and_fp16_keeps_fp32():
    assert text_dtype(torch.bfloat16) == torch.bfloat16
    assert text_dtype(torch.float16) == torch.float32  # T5 overflows in fp16
    assert text_dtype(torch.float32) == torch.float32


def test_encoders_run_in_the_cache_dtype_and_entries_of_another_dtype_are_not_reused(tmp_path: Path, monkeypatch):
    pipe = FLUX1.build_tiny()
    seen: list[set[torch.dtype]] = []
    encode_tokens = FLUX1.encode_tokens

    def spy(self, encoders, token_ids):
        seen.append({p.dtype for encoder in encoders for p in encoder.parameters()})
        return encode_tokens(encoders, token_ids)

    monkeypatch.setattr(type(FLUX1), "encode_tokens", spy)
    cache = cache_mod.TensorCache(tmp_path)
    common = dict(key_parts=("tiny-flux",), cache=cache, device=torch.device("cpu"))
    bf16, stats = cache_mod.encode_texts(FLUX1, pipe, ["sksToy toy on the beach"], dtype=torch.bfloat16, **common)
    assert seen == [{torch.bfloat16}] and stats.encoded == 1
    embeds, pooled = bf16["sksToy toy on the beach"]
    assert embeds.dtype == pooled.dtype == torch.float32  # the cache holds float32 whatever encoded it

    _, again = cache_mod.encode_texts(FLUX1, pipe, ["sksToy toy on the beach"], dtype=torch.bfloat16, **common)
    assert again.reused == 1 and len(seen) == 1
    fp32, other = cache_mod.encode_texts(FLUX1, pipe, ["sksToy toy on the beach"], dtype=torch.float32, **common)
    assert other.encoded == 1 and seen[-1] == {torch.float32}
    # bf16 encoding is close to fp32's, not equal: the dtype is part of the key for that reason.
    difference = (fp32["sksToy toy on the beach"][0] - embeds).abs().max()
    assert 0 < difference < 0.05 * fp32["sksToy toy on the beach"][0].abs().max()
