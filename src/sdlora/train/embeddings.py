"""Pivotal tuning: the token gets a new input embedding of its own, trained beside the LoRA.

A token such as `sksToy` is not in CLIP's vocabulary, so the tokenizer splits it into pieces
(`sk`, `sto`, `y`) that mean other things. `add_token` adds it to each tokenizer as one new
token (SD 1.x: one; SDXL: both; FLUX.1: CLIP-L's and T5's, its `shared` table, as diffusers'
train_dreambooth_lora_flux_advanced.py does with --enable_t5_ti), starting from the embedding of
`--init-token` (the class word). The text encoders stay frozen: a forward hook on each input-embedding layer puts a
trainable float32 vector where the token's id appears, so only that vector learns, no other
row of the embedding matrix can change, and the optimizer holds a few KB instead of a copy of
the whole matrix. Its gradients are all-reduced by hand (it is not inside a DDP module).

`save_embeddings` writes `lora/embeddings.safetensors` in the textual-inversion format that
diffusers' `load_textual_inversion`, AUTOMATIC1111 and ComfyUI read: `emb_params` (1, 768) for
SD 1.x; `clip_l` (1, 768) and `clip_g` (1, 1280) for SDXL; `clip_l` (1, 768) and `t5` (1, 4096) for
FLUX.1 (diffusers' advanced FLUX script's keys), the T5 vector again as `t5xxl` (ComfyUI's key).
Loading it adds the token the same way (`tokenizer.add_tokens`, then the row at the new id), so
inference sees what training saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdlora.errors import ConfigError
from sdlora.fsutil import atomic_path
from sdlora.lora_format import embedding_file_keys


def is_new_token(tokenizer: Any, token: str) -> bool:
    """Whether the tokenizer would split `token` into pieces (sksToy), rather than know it as one word (sks)."""
    return len(tokenizer.tokenize(token)) > 1


class TokenEmbeddings(torch.nn.Module):
    """The trained vectors of one token, one per text encoder, and the hooks that use them.

    A module so that the optimizer sees its parameters and train/checkpoint.py saves its
    `state_dict()` as embeddings.safetensors in each checkpoint; `vectors[name]` is the embedding for the encoder `pipe.<name>`.
    """

    def __init__(self, token: str, token_ids: dict[str, int], initial: dict[str, torch.Tensor]):
        super().__init__()
        self.token = token
        self.token_ids = dict(token_ids)
        self.vectors = torch.nn.ParameterDict(
            {name: torch.nn.Parameter(vector.detach().float().clone()) for name, vector in initial.items()}
        )
        self.trainable = True

    def attach(self, encoders: dict[str, torch.nn.Module]) -> None:
        """Hook each encoder's input-embedding layer: the token's id gets the trained vector."""
        for name, encoder in encoders.items():
            layer = encoder.get_input_embeddings()
            layer.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        token_id = self.token_ids[name]

        def substitute(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            is_token = (args[0] == token_id).unsqueeze(-1)
            vector = self.vectors[name].to(device=output.device, dtype=output.dtype)
            return torch.where(is_token, vector, output)

        return substitute

    def norms(self) -> dict[str, float]:
        return {name: float(vector.detach().norm()) for name, vector in self.vectors.items()}

    def freeze(self) -> None:
        """Stop training (after --embedding-steps-fraction): no gradient flows through the encoders any more."""
        self.trainable = False
        for vector in self.vectors.values():
            vector.requires_grad_(False)
            vector.grad = None


def _init_vector(tokenizer: Any, encoder: torch.nn.Module, init_token: str) -> torch.Tensor:
    ids = tokenizer(init_token, add_special_tokens=False).input_ids
    if not ids:
        raise ConfigError(
            f"--init-token {init_token!r}: the tokenizer finds no tokens in it; give a word such as the class word"
        )
    rows = encoder.get_input_embeddings().weight.detach()
    return rows[torch.tensor(ids, device=rows.device)].float().mean(dim=0)  # several pieces: their mean


def add_token(pipe: Any, arch: Any, token: str, init_token: str) -> TokenEmbeddings:
    """Add `token` to every tokenizer/text encoder of `pipe`; its vectors start at `init_token`'s embedding.

    Done like diffusers' `load_textual_inversion` (`add_tokens`, then resize to the tokenizer's
    length), so the id the token gets here is the id it gets when the file is loaded.
    """
    if not init_token or not init_token.strip():
        raise ConfigError("--init-token is empty; give a word such as the class word")
    ids, initial, encoders = {}, {}, {}
    for tokenizer_name, encoder_name in zip(arch.tokenizers, arch.text_encoders):
        tokenizer, encoder = getattr(pipe, tokenizer_name), getattr(pipe, encoder_name)
        if token in tokenizer.get_vocab():
            raise ConfigError(
                f"the token {token!r} is already in the {tokenizer_name}'s vocabulary; "
                "use --no-train-token-embedding, or another token"
            )
        initial[encoder_name] = _init_vector(tokenizer, encoder, init_token)
        tokenizer.add_tokens(token)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the row is set just below
        ids[encoder_name] = tokenizer.convert_tokens_to_ids(token)
        with torch.no_grad():  # the table's row too, so a hook-less forward (none in sdlora) would agree
            encoder.get_input_embeddings().weight[ids[encoder_name]] = initial[encoder_name]
        encoders[encoder_name] = encoder
    tokens = TokenEmbeddings(token, ids, initial)
    tokens.attach(encoders)
    return tokens


def save_embeddings(path: Path, tokens: TokenEmbeddings, arch: Any, metadata: dict[str, str]) -> None:
    """embeddings.safetensors for diffusers' load_textual_inversion, A1111 and ComfyUI (atomic)."""
    from safetensors.torch import save_file

    tensors = {
        key: tokens.vectors[name].detach().float().cpu()[None].clone()  # a copy each: safetensors refuses shared memory
        for name, key in embedding_file_keys(arch)
    }
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
