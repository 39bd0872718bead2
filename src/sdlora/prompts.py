"""Prompt and caption templates: the one place `{token}` and `{class}` are filled in."""

from __future__ import annotations

DEFAULT_PROMPT = "a photo of {token} {class}"
"""The default caption template, validation prompt and scoring prompt."""


def fill_prompt(template: str, token: str, class_word: str) -> str:
    """`a photo of {token} {class}` -> `a photo of sksToy toy`; other text (and braces) is left as written."""
    return template.replace("{token}", str(token)).replace("{class}", str(class_word))
