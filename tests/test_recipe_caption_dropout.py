"""--caption-dropout: which samples drop is a pure function of (seed, position); resume stays exact."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import one_line_error
from recipe_helpers import invoke, print_config, straight_and_resumed, tiny_cfg
from sdlora.train import dropout, loop
from sdlora.train.data import Batch, Conditioning


def test_dropped_samples_are_a_pure_function_of_seed_and_position():
    positions = list(range(2000))
    drop = dropout.dropped(0, positions, 0.1)
    assert 0.08 < sum(drop) / len(drop) < 0.12
    # Any split of the stream (processes, batches, a resume) drops the same samples.
    assert dropout.dropped(0, positions[1000:], 0.1) == drop[1000:]
    assert dropout.dropped(1, positions, 0.1) != drop
    assert not any(dropout.dropped(0, positions, 0.0))


def test_dropped_samples_take_the_empty_captions_embedding():
    class State:
        class cfg:
            class train:
                seed = 0

            class data:
                caption_dropout = 0.5

        empty_caption = dropout.EmptyCaption(token_ids=None, embeds=torch.zeros(77, 8), pooled=torch.zeros(4))

    n = 8
    cond = Conditioning(embeds=torch.ones(n, 77, 8), pooled=torch.ones(n, 4))
    batch = Batch(torch.zeros(n, 4, 8, 8), torch.zeros(n, 4, 8, 8), torch.zeros(n), cond, torch.zeros(n, 6))
    drop = dropout.dropped(0, range(n), 0.5)
    out = dropout.apply(State, batch, list(range(n)))  # type: ignore[arg-type]
    assert 0 < sum(drop) < n
    for i, dropped in enumerate(drop):
        assert bool(out.cond.embeds[i].abs().sum() == 0) == dropped
        assert bool(out.cond.pooled[i].abs().sum() == 0) == dropped
    assert batch.cond.embeds.min() == 1  # the cached tensors are not changed


def test_caption_dropout_resumes_exactly_and_changes_training(tmp_path: Path, tiny_dataset: Path):
    # tiny_dataset's token sksToy trains its own embedding for 3 of 6 steps: token ids, then cached embeddings.
    flags = {"data.caption_dropout": 0.5, "train.batch_size": 2}
    straight, _ = straight_and_resumed(tmp_path, tiny_dataset, flags)
    plain = loop.run_training(tiny_cfg(tmp_path, tiny_dataset, {"train.max_steps": 6, "train.batch_size": 2}))
    from recipe_helpers import losses

    assert losses(straight.run_dir) != losses(plain.run_dir)
    # With the text-embedding cache (no token embedding): the cached "" entry.
    cached = {"data.caption_dropout": 0.5, "embedding.train": False, "run.name": "cached"}
    assert loop.run_training(tiny_cfg(tmp_path, tiny_dataset, cached)).steps == 3


def test_caption_dropout_flag_yaml_and_bad_value(tmp_path: Path):
    assert print_config("--caption-dropout", "0.1")["data"]["caption_dropout"] == 0.1
    one_line_error(invoke("--config", "tiny", "--caption-dropout", "1.5"), "--caption-dropout must be in [0, 1)")
