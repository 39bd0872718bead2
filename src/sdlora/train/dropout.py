"""Caption dropout (`--caption-dropout P`): a fraction P of the training samples use the empty caption.

The LoRA then also learns the unconditioned prediction that classifier-free guidance subtracts. Which
samples drop is a pure function of (seed, sample position) (its own generator stream, train/data.py's
`sample_generator`), so a resume and N processes drop exactly the samples one uninterrupted process
drops. The empty caption is encoded once: with cached text embeddings it is the cache's own "" entry
(encoded with the captions); when the text encoders run in the loss, its token ids replace the
caption's (so a trained token simply is not there); once the token's embedding freezes and captions
become cached embeddings, "" is encoded once more with the frozen encoders. Class images (prior
preservation) and the validation loss keep their captions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

import torch

from sdlora.train.data import Batch, Conditioning, sample_generator

if TYPE_CHECKING:
    from sdlora.train.state import TrainState

STREAM = 3  # sample_generator streams: 0 instances, 1 class images, 2 validation noise, 3 caption dropout


@dataclass
class EmptyCaption:
    """The empty caption as the loss reads it: token ids per tokenizer (1, 77), or its embedding."""

    token_ids: list[torch.Tensor] | None
    embeds: torch.Tensor | None  # (77, D)
    pooled: torch.Tensor | None  # (Dp,), SDXL


def dropped(seed: int, positions: Sequence[int], p: float) -> list[bool]:
    """Whether each sample (by its global stream position) trains on the empty caption."""
    if p <= 0:
        return [False] * len(positions)
    return [bool(torch.rand((), generator=sample_generator(seed, STREAM, pos)).item() < p) for pos in positions]


def empty_caption(cfg: Any, pipe: Any, arch: Any, negative_cond: Any, encodes_text: bool) -> EmptyCaption | None:
    """The empty caption for the loss (None without --caption-dropout); called while the tokenizers are there.

    `negative_cond` is the text cache's embedding of "" (None when the text encoders run in the loss)."""
    if not cfg.data.caption_dropout:
        return None
    if encodes_text:
        return EmptyCaption(token_ids=arch.tokenize(pipe, [""]), embeds=None, pooled=None)
    embeds, pooled = negative_cond
    return EmptyCaption(token_ids=None, embeds=embeds, pooled=pooled)


@torch.no_grad()
def _empty_embedding(state: TrainState, empty: EmptyCaption) -> None:
    """Encode "" once with the frozen text encoders (the captions became cached embeddings mid-run)."""
    ids = [t.to(state.device) for t in empty.token_ids]  # type: ignore[union-attr]
    embeds, pooled = state.arch.encode_tokens(state.frozen_text_encoders, ids)
    empty.embeds = embeds[0].float().cpu()
    empty.pooled = None if pooled is None else pooled[0].float().cpu()


def apply(state: TrainState, batch: Batch, positions: Sequence[int]) -> Batch:
    """`batch` with its dropped samples' conditioning replaced by the empty caption's."""
    empty: EmptyCaption | None = getattr(state, "empty_caption", None)
    if empty is None:
        return batch
    drop = dropped(state.cfg.train.seed, positions, state.cfg.data.caption_dropout)
    if not any(drop):
        return batch
    mask = torch.tensor(drop)
    cond = batch.cond
    if cond.embeds is not None:
        if empty.embeds is None:
            _empty_embedding(state, empty)
        embeds = cond.embeds.clone()
        embeds[mask] = empty.embeds.to(embeds.dtype)  # type: ignore[union-attr]
        pooled = None
        if cond.pooled is not None:
            pooled = cond.pooled.clone()
            pooled[mask] = empty.pooled.to(pooled.dtype)  # type: ignore[union-attr]
        new = Conditioning(embeds=embeds, pooled=pooled)
    else:
        token_ids = []
        for ids, blank in zip(cond.token_ids, empty.token_ids):  # type: ignore[arg-type]
            ids = ids.clone()
            ids[mask] = blank[0].to(ids.dtype)
            token_ids.append(ids)
        new = Conditioning(token_ids=token_ids)
    return replace(batch, cond=new)
