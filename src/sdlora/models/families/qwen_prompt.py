"""What the families prompted through a Qwen3 language model share (FLUX.2 [klein], Z-Image): the prompt as
one user turn of Qwen3's chat template, padded to a fixed window, and the part of that window a caption
gets once the template's own tokens are in it."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def chat_text(tokenizer: Any, prompt: str, *, thinking: bool) -> str:
    """`prompt` as the pipelines render it: one user turn, the assistant's turn opened; `thinking` is the
    template's enable_thinking (Z-Image: on, no think block; FLUX.2 [klein]: off, an empty one)."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)


def chat_tokens(tokenizer: Any, prompts: Sequence[str], window: int, *, thinking: bool) -> list[torch.Tensor]:
    """[ids, attention mask], both (N, window): the rendered prompts padded and cut to the window, as the
    pipelines tokenize them."""
    texts = [chat_text(tokenizer, prompt, thinking=thinking) for prompt in prompts]
    tokens = tokenizer(texts, padding="max_length", max_length=window, truncation=True, return_tensors="pt")
    return [tokens.input_ids, tokens.attention_mask]


def chat_windows(tokenizer: Any, window: int, *, thinking: bool) -> list[tuple[str, Any, int]]:
    """`Family.prompt_windows` for a Qwen3-prompted family: the window less the template's tokens around the
    prompt (the tokenizer itself adds none), so a caption whose token would be cut is caught."""
    template = len(tokenizer(chat_text(tokenizer, "", thinking=thinking), add_special_tokens=False)["input_ids"])
    return [("Qwen3", tokenizer, window - template)]
