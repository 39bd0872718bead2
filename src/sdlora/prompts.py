"""Prompt and caption templates: the one place `{token}` and `{class}` are filled in."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEFAULT_PROMPT = "a photo of {token} {class}"
"""The default caption template, validation prompt and scoring prompt."""


def fill_prompt(template: str, token: str, class_word: str) -> str:
    """`a photo of {token} {class}` -> `a photo of sksToy toy`; other text (and braces) is left as written."""
    return template.replace("{token}", str(token)).replace("{class}", str(class_word))


def expand_prompt(prompt: str, token: str, class_word: str) -> str:
    """Put the class word after the token where the prompt omits it.

    "sksToy on a beach" -> "sksToy toy on a beach"; "a sksToy toy" and prompts without the
    token are left as they are. Whitespace is tidied.
    """
    prompt = " ".join(prompt.split())
    if not token or not class_word:
        return prompt
    followed = re.compile(rf"(?<![\w]){re.escape(token)}(?![\w])(?!\s+{re.escape(class_word)}(?![\w]))", re.IGNORECASE)
    return followed.sub(lambda m: f"{m.group(0)} {class_word}", prompt)


@dataclass(frozen=True)
class PromptFit:
    """How a prompt fits a tokenizer's window (CLIP's: 77 tokens with the start and end markers)."""

    tokens: int  # text tokens, without the start/end markers
    limit: int  # text tokens that fit
    token_cut: bool  # the identifier token (or part of it) falls past the limit and is lost

    @property
    def over(self) -> bool:
        return self.tokens > self.limit


def prompt_fit(tokenizer: Any, prompt: str, token: str | None = None, window: int | None = None) -> PromptFit:
    """Whether `prompt` fits `tokenizer` (a transformers tokenizer: CLIP's, T5's), and whether `token` survives.

    The text encoder sees at most `window` ids (default: the tokenizer's `model_max_length`), the markers
    the tokenizer adds included (CLIP: start and end; T5: the end); what is past that is cut silently by
    the diffusers pipelines.
    """
    markers = len(tokenizer("", truncation=False)["input_ids"])
    limit = int(window if window is not None else tokenizer.model_max_length) - markers
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"]
    cut = False
    if token:
        piece = tokenizer(token, add_special_tokens=False, truncation=False)["input_ids"]
        ends = [i + len(piece) for i in range(len(ids) - len(piece) + 1) if ids[i : i + len(piece)] == piece]
        cut = bool(ends) and min(ends) > limit  # every occurrence ends past the window
    return PromptFit(tokens=len(ids), limit=limit, token_cut=cut)
