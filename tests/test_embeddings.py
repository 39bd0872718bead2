"""train/embeddings.py: the token's own embedding on tiny SD, SDXL and FLUX.1, and its file round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from sdlora.errors import ConfigError
from sdlora.generate import load_embeddings
from sdlora.models import load_pipeline
from sdlora.train.embeddings import add_token, is_new_token, save_embeddings

TOKEN, PROMPT = "sksToy", "a photo of sksToy toy on a beach"


def encode(pipe, arch, prompt: str = PROMPT):
    with torch.no_grad():
        return arch.encode_prompts(pipe, [prompt])


def table(pipe, arch) -> list[torch.Tensor]:
    return [getattr(pipe, name).get_input_embeddings().weight.detach().clone() for name in arch.text_encoders]


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_token_is_one_new_token_starting_at_the_init_word(model):
    pipe, arch = load_pipeline(model)
    toy = {
        name: getattr(pipe, name)
        .get_input_embeddings()
        .weight[getattr(pipe, tok)("toy", add_special_tokens=False).input_ids[0]]
        .clone()
        for tok, name in zip(arch.tokenizers, arch.text_encoders)
    }
    tokens = add_token(pipe, arch, TOKEN, "toy")
    for tok_name, enc_name in zip(arch.tokenizers, arch.text_encoders):
        tokenizer = getattr(pipe, tok_name)
        ids = tokenizer(f"a {TOKEN} toy", add_special_tokens=False).input_ids
        assert ids[1] == tokens.token_ids[enc_name] == len(tokenizer) - 1  # one new token now, not sk/sto/y
        assert torch.equal(tokens.vectors[enc_name].detach(), toy[enc_name])
    # The prompt with the token now encodes like the prompt with the init word in its place.
    with_token, _ = encode(pipe, arch)
    with_word, _ = encode(pipe, arch, PROMPT.replace(TOKEN, "toy"))
    assert torch.allclose(with_token, with_word, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl", "tiny-flux"])
def test_training_changes_only_the_token_vectors(model):
    pipe, arch = load_pipeline(model)
    tokens = add_token(pipe, arch, TOKEN, "toy")
    before, start = table(pipe, arch), {k: v.detach().clone() for k, v in tokens.vectors.items()}
    encoders = [getattr(pipe, name) for name in arch.text_encoders]
    for encoder in encoders:
        encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW(tokens.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        embeds, pooled = arch.encode_tokens(encoders, arch.tokenize(pipe, [PROMPT]))
        loss = embeds.pow(2).mean() + (0 if pooled is None else pooled.pow(2).mean())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name in arch.text_encoders:
        assert not torch.equal(tokens.vectors[name].detach(), start[name])
    for old, new in zip(before, table(pipe, arch)):
        assert torch.equal(old, new)  # no row of any embedding matrix moved
    assert all(p.grad is None for e in encoders for p in e.parameters())


KEYS = {"tiny-sd": {"emb_params"}, "tiny-sdxl": {"clip_l", "clip_g"}, "tiny-flux": {"clip_l", "t5", "t5xxl"}}


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl", "tiny-flux"])
def test_saved_file_loads_into_a_fresh_pipeline_with_the_same_encoding(model, tmp_path):
    pipe, arch = load_pipeline(model)
    tokens = add_token(pipe, arch, TOKEN, "toy")
    with torch.no_grad():
        for vector in tokens.vectors.values():
            vector.add_(torch.randn(vector.shape, generator=torch.Generator().manual_seed(1)))
    trained = encode(pipe, arch)
    path = tmp_path / "embeddings.safetensors"
    save_embeddings(path, tokens, arch, {"sdlora.token": TOKEN})

    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == KEYS[model]  # what A1111 / ComfyUI / diffusers read
        assert f.metadata()["sdlora.token"] == TOKEN

    fresh, _ = load_pipeline(model)
    load_embeddings(fresh, arch, path, TOKEN)
    loaded = encode(fresh, arch)
    assert torch.allclose(trained[0], loaded[0], atol=1e-6)
    if arch.uses_pooled:
        assert torch.allclose(trained[1], loaded[1], atol=1e-6)


def test_new_token_detection():
    pipe, _ = load_pipeline("tiny-sd")
    assert is_new_token(pipe.tokenizer, "sksToy")  # split into pieces: worth its own embedding
    assert not is_new_token(pipe.tokenizer, "sks")  # one known token: classic DreamBooth, nothing to add


def test_token_already_in_the_vocabulary_is_a_clear_error():
    pipe, arch = load_pipeline("tiny-sd")
    pipe.tokenizer.add_tokens(TOKEN)
    with pytest.raises(ConfigError, match="already in the tokenizer's vocabulary"):
        add_token(pipe, arch, TOKEN, "toy")
