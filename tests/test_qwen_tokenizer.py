"""The Qwen tokenizer built offline (models/tiny.py `qwen_tokenizer`) for the tiny FLUX.2 [klein] and
Z-Image models: it renders a prompt as their pipelines do (Qwen3's chat template, thinking off) and
round-trips any text byte for byte."""

from sdlora.models.tiny import QWEN_SPECIAL_TOKENS, qwen_tokenizer


def test_the_chat_template_renders_one_user_turn_as_qwen3_does_with_thinking_off():
    tokenizer = qwen_tokenizer()
    messages = [{"role": "user", "content": "a photo of sksToy on the beach"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == (
        "<|im_start|>user\na photo of sksToy on the beach<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_specials_are_single_tokens_and_any_text_round_trips():
    tokenizer = qwen_tokenizer()
    for special in QWEN_SPECIAL_TOKENS:
        assert len(tokenizer(special).input_ids) == 1, special
    text = "sksToy auf dem Schnee, été ☃ 42"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    padded = tokenizer([text], padding="max_length", max_length=64, return_tensors="pt")
    assert padded.input_ids.shape == (1, 64)
    assert padded.input_ids[0, -1].item() == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_the_qwen_families_windows_leave_out_the_chat_template_and_catch_a_cut_token():
    """FLUX.2 [klein] and Z-Image pad the chat-rendered prompt to 512 ids: a caption gets 512 less the
    template's ids, and a token past that is reported cut (the check `train` and `sample` make)."""
    from sdlora.models.families.qwen_prompt import chat_text, chat_tokens, chat_windows
    from sdlora.prompts import prompt_fit

    tokenizer = qwen_tokenizer()
    for thinking in (True, False):
        [(label, _, window)] = chat_windows(tokenizer, 512, thinking=thinking)
        template = len(tokenizer(chat_text(tokenizer, "", thinking=thinking)).input_ids)
        assert label == "Qwen3" and window == 512 - template and template > 5
        fits = "x" * (window - 6) + "sksToy"  # the byte-level tokenizer: one id per character
        assert not prompt_fit(tokenizer, fits, "sksToy", window).token_cut
        ids, mask = chat_tokens(tokenizer, [fits], 512, thinking=thinking)
        assert "sksToy" in tokenizer.decode(ids[0]) and mask.all()  # it does reach the encoder whole
        assert prompt_fit(tokenizer, "x" + fits, "sksToy", window).token_cut
