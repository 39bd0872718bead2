"""Prompt templating and the CLIP window: {token}/{class} filled once; a token past 75 tokens is found."""

from __future__ import annotations

from sdlora.models.tiny import clip_tokenizer
from sdlora.prompts import DEFAULT_PROMPT, fill_prompt, prompt_fit


def test_fill_prompt_fills_both_fields_and_leaves_other_text():
    assert fill_prompt(DEFAULT_PROMPT, "sksToy", "toy") == "a photo of sksToy toy"
    assert fill_prompt("{token} in {braces} {class}", "sks", "car") == "sks in {braces} car"


def test_prompt_fit_finds_a_token_cut_off_by_the_window():
    tokenizer = clip_tokenizer()
    short = prompt_fit(tokenizer, "a photo of sksToy toy", "sksToy")
    assert not short.over and not short.token_cut and short.limit == tokenizer.model_max_length - 2
    long_tail = " ".join(["red"] * 80)
    early = prompt_fit(tokenizer, f"sksToy toy, {long_tail}", "sksToy")
    assert early.over and not early.token_cut  # too long, but the token is inside the window
    late = prompt_fit(tokenizer, f"{long_tail} sksToy toy", "sksToy")
    assert late.over and late.token_cut
