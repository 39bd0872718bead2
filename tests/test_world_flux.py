"""A LoRA of world-flux, the miniature world's FLUX.1-architecture model, learns a novel object: flow-matching
training shown to learn, in the default suite (35 s on one core). The run follows tests/test_world_learning.py
(benchmarks/world_common.py's render, prepare, train and measure): novel object 60, 16 photos, photo and
training seed 0, the `world` preset (rank 8, lr 1e-3, 150 steps, 32 px), scored against 12 held-out photos."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import world_common as wc  # noqa: E402  (benchmarks/ is a folder of scripts)

pytestmark = pytest.mark.timeout(900)  # a minute on a quiet core; minutes beside a busy neighbour

OBJECT = wc.FIRST_OBJECT  # 60, a toy
SEED = 0
PHOTOS = 16
FLUX_LEARNED = 0.3  # world-DINO, world-flux's LoRA's images minus its base model's (measured: test docstring)
FLUX_CLIP_T_MARGIN = 0.15  # how far the LoRA's CLIP-T may fall below the base model's


def test_a_lora_of_world_flux_learns_the_object(tmp_path):
    """world-flux, FLUX.1 [dev]'s architecture: the flow-matching objective (velocity, sigma as
    the timestep), latents packed into 2x2 tokens, T5's states and CLIP's pooled text, the training guidance
    1.0 into the guidance embedding, sampled at 28 steps and distilled guidance 3.5 with the prompt in T5's
    32-token window. No token embedding trains (pivotal tuning is opt-in for FLUX.1): the LoRA alone learns.

    world-DINO minus the base model's, seeds 0 / 1: 0.828 / 0.598; CLIP-T with the LoRA minus the base model's
    +0.003 / -0.079 (the background still follows the prompt; measured again after the photos' HEIC encoding
    changed, 0.845 / 0.641 and -0.038 / +0.004 before). With the prompt sampled in FluxPipeline's own
    512-token window (the defect: `FLUX1.prompt_kwargs` returning nothing) the gain was 0.168, under the
    threshold. With the flow-matching target's sign flipped (`train/flow_matching.py` `target` returning
    latents - noise) the gain stayed 0.746, for the broken LoRA's orange smears are as near the toy for
    world-DINO, but CLIP-T fell 0.41 below the base model's (3 of 8 backgrounds right): the CLIP-T margin
    catches it. Measured 2026-12-06, one thread, deterministic.
    """
    from sdlora.world.shipped import BASE_FLUX

    wc.one_thread()  # as the benchmarks measure (conftest's one torch thread too): the docstring's figures
    photos, _ = wc.render(tmp_path / "photos", OBJECT, SEED, PHOTOS)
    heldout = wc.heldout_photos(tmp_path, OBJECT, SEED)
    dataset = wc.prepare(photos, tmp_path / "dataset", wc.object_class(OBJECT))
    run, _ = wc.train(dataset, tmp_path / "runs", "flux", SEED, {"model.name": BASE_FLUX})
    figures = wc.measure(run, heldout, run.path / "measured")
    assert figures["dino_lora"] - figures["dino_base"] > FLUX_LEARNED, figures
    assert figures["clip_t_lora"] > figures["clip_t_base"] - FLUX_CLIP_T_MARGIN, figures
