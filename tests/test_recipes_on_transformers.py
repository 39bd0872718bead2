"""Every recipe option on the flow-matching transformer families (FLUX.1, FLUX.2 [klein], Z-Image), as the SD
recipe tests run them on tiny-sd: masked loss, DOP, EMA, LoRA+, Prodigy, schedule-free, LoKr / LoHa, caption
dropout and aspect-ratio buckets each train 2 steps on the family's tiny model to a finite loss and export
their files; EMA and DOP stopped at step 1 and resumed to 2 give the straight run's LoRA; `sdlora tune` ranks a
2-trial sweep. The families are `families.FAMILIES` with a transformer denoiser, so a new one is covered."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import write_aspect_dataset, write_tiny_dataset
from recipe_helpers import losses, stopped_and_resumed
from sdlora.cli import app
from sdlora.config import load_config
from sdlora.models.families import FAMILIES, ZIMAGE, Family
from sdlora.run import DIFFUSERS_LORA, Metric
from sdlora.train import loop
from test_masked_loss import add_masks
from test_train import steps_of
from test_tune import by_hand

TRANSFORMERS = [f for f in FAMILIES if f.denoiser == "transformer"]
CHEAP = ZIMAGE  # the cheapest tiny transformer (test_families_end_to_end.py): its runs in the default suite

# Each recipe: its config flags and the dataset it trains on.
RECIPES: dict[str, tuple[dict[str, Any], str]] = {
    "masked-loss": ({"data.masked_loss": True, "data.unmasked_weight": 0.1}, "masked"),
    "dop": ({"prior.preservation": "dop"}, "square"),
    "ema": ({"lora.ema_decay": 0.9}, "square"),
    "loraplus": ({"lora.loraplus_ratio": 16.0}, "square"),
    "prodigy": ({"train.optimizer": "prodigy", "train.learning_rate": 1.0}, "square"),
    "schedulefree": ({"train.optimizer": "adamw-schedulefree"}, "square"),
    "lokr": ({"lora.lora_type": "lokr"}, "square"),
    "loha": ({"lora.lora_type": "loha"}, "square"),
    "caption-dropout": ({"data.caption_dropout": 0.5}, "square"),
    "buckets": ({"data.resolution": 192, "train.batch_size": 2}, "aspect"),
}
# In the default suite (about 4 s on the shared 2 cores, once torch is imported): the cheap family's masked loss
# and its EMA resumed; the rest is slow (about 65 s).
DEFAULT_RECIPES = {"masked-loss"}
DEFAULT_RESUMES: set[str] = set()  # every resume slow (SD's EMA and DOP resume tests run by default)
# 2:1 and 1:2 photos and a square one: at --resolution 192 the buckets are 256x128, 128x256 and 192x192.
WIDE, TALL, SQUARE = (2000, 1000), (1000, 2000), (1500, 1500)
# Two buckets of two train photos (the square one is val): at batch 2 the 2 steps are one wide, one tall.
ASPECT = [WIDE, TALL, TALL, WIDE, SQUARE]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """The prepared datasets the recipes train on, made once for the module (runs add only their caches)."""
    root = tmp_path_factory.mktemp("datasets")
    return {
        "square": write_tiny_dataset(root / "square", n=4),
        "masked": add_masks(write_tiny_dataset(root / "masked", n=4)),
        "aspect": write_aspect_dataset(root / "aspect", ASPECT, n_val=1, resolution=192),
    }


def cfg_for(tmp_path: Path, family: Family, dataset: Path, flags: dict[str, Any]) -> Any:
    base = {
        "model.name": family.tiny_model,
        "data.dataset": str(dataset),
        "run.runs_dir": str(tmp_path / "runs"),
        "train.max_steps": 2,
        "train.learning_rate": 1e-3,
        "train.mixed_precision": "no",
        "validation.validate_every": 0,
        "validation.prompts": [],
        "checkpoint.checkpoint_every": 0,
    }
    return load_config(None, {**base, **flags}, [])


def check_export(result: Any, family: Family, kohya: bool) -> None:
    """The diffusers file always, finite and nonzero; the kohya file for a plain LoRA only."""
    state = load_file(result.lora_dir / DIFFUSERS_LORA)
    assert state and all(torch.isfinite(t).all() for t in state.values())
    kohya_file = result.lora_dir / f"{result.run_dir.name}.safetensors"
    assert kohya_file.is_file() == kohya, sorted(p.name for p in result.lora_dir.iterdir())


def params(names, default: set[str]):
    return [
        pytest.param(
            family,
            name,
            id=f"{family.name}-{name}",
            marks=() if family is CHEAP and name in default else pytest.mark.slow,
        )
        for family in TRANSFORMERS
        for name in names
    ]


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory, datasets):
    """A family's run with no recipe option on the square dataset (its losses and LoRA), made when first asked for."""
    runs: dict[str, tuple[list[float], dict[str, torch.Tensor]]] = {}

    def of(family: Family) -> tuple[list[float], dict[str, torch.Tensor]]:
        if family.name not in runs:
            root = tmp_path_factory.mktemp(f"plain-{family.name}")
            result = loop.run_training(cfg_for(root, family, datasets["square"], {"run.name": "plain"}))
            runs[family.name] = losses(result.run_dir), load_file(result.lora_dir / DIFFUSERS_LORA)
        return runs[family.name]

    return of


def check_took_effect(recipe: str, family: Family, result: Any, plain_runs) -> None:
    """The option did something on the family (not accepted and ignored): in the metrics, the LoRA or the losses."""
    steps = steps_of(result.run_dir)
    lr = RECIPES[recipe][0].get("train.learning_rate", 1e-3)
    if recipe == "masked-loss":  # the left halves, on the family's latent grid
        assert all(r[Metric.MASK_COVERAGE] == pytest.approx(0.5, abs=1e-6) for r in steps)
        return
    if recipe == "buckets":
        return  # another dataset: its batches' shapes are checked by the caller
    if recipe == "dop":
        assert (
            all(math.isfinite(r[Metric.LOSS_PRESERVATION]) for r in steps) and steps[-1][Metric.LOSS_PRESERVATION] > 0
        )
    elif recipe == "loraplus":
        assert all(r[Metric.lr("unet_B")] == pytest.approx(16 * lr) for r in steps)
    elif recipe == "prodigy":
        assert all(Metric.LR_EFFECTIVE_PREFIX + "unet" in r for r in steps)
    plain_losses, plain_lora = plain_runs(family)
    trained = [r[Metric.LOSS] for r in steps]
    if recipe in ("lokr", "loha"):  # another adapter: other tensors, another second step
        assert trained[1] != pytest.approx(plain_losses[1], abs=1e-7)
        return
    if recipe in ("ema", "schedulefree"):  # neither changes the first update (schedule-free's first is Adam's)
        assert trained == pytest.approx(plain_losses, abs=1e-6)
    lora = load_file(result.lora_dir / DIFFUSERS_LORA)
    assert lora.keys() == plain_lora.keys()
    assert any(not torch.allclose(lora[k], plain_lora[k], atol=1e-7, rtol=0) for k in lora), recipe


def check_mask_weighs_the_loss(state: Any) -> None:
    """The subject mask lies on the family's latent grid (left half 1, right half 0) and weighs the loss."""
    batch = state.plan.batch(0, 0)
    mask, width = batch.mask, batch.latents.shape[-1]
    assert mask.shape[-2:] == batch.latents.shape[-2:]
    assert torch.all(mask[..., : width // 2] == 1) and torch.all(mask[..., width // 2 :] == 0)
    with torch.no_grad():
        masked, _ = loop.compute_loss(state, batch)
        plain, _ = loop.compute_loss(state, replace(batch, mask=None))
    assert abs(masked.item() - plain.item()) > 1e-6


@pytest.mark.parametrize("family, recipe", params(RECIPES, DEFAULT_RECIPES))
def test_a_recipe_trains_to_a_finite_loss_and_exports(
    tmp_path: Path, datasets, plain_runs, family: Family, recipe: str
):
    flags, dataset = RECIPES[recipe]
    state = loop.setup(cfg_for(tmp_path, family, datasets[dataset], {**flags, "run.name": recipe}))
    try:
        sides = (
            {tuple(state.plan.batch(step, 0).latents.shape[-2:]) for step in range(2)} if recipe == "buckets" else None
        )
        if recipe == "masked-loss":
            check_mask_weighs_the_loss(state)
        result = loop.train(state)
    finally:
        loop.cleanup(state)
    assert result.steps == 2 and not result.interrupted
    trained = losses(result.run_dir)
    assert len(trained) == 2 and all(math.isfinite(x) for x in trained), trained
    check_export(result, family, kohya=flags.get("lora.lora_type", "lora") == "lora")
    check_took_effect(recipe, family, result, plain_runs)
    if recipe == "buckets":  # a wide batch and a tall one, each the transposed shape of the other
        assert len(sides) == 2 and {(w, h) for h, w in sides} == sides and all(h != w for h, w in sides), sides


# DOP also tests that its LoRA-off target resumes; EMA that its shadow weights do.
RESUMES = {"ema": RECIPES["ema"][0], "dop": RECIPES["dop"][0]}
# float32 on the CPU, the same ops in the same order: measured bitwise equal on all three families (0.0); a resume
# that drops the EMA's shadow weights is 6e-5 off.
TOLERANCE = 1e-6


@pytest.mark.parametrize("family, recipe", params(RESUMES, DEFAULT_RESUMES))
def test_stopped_and_resumed_equals_straight(tmp_path: Path, datasets, family: Family, recipe: str):
    flags = RESUMES[recipe]
    straight = loop.run_training(cfg_for(tmp_path, family, datasets["square"], {**flags, "run.name": "straight"}))
    cfg = cfg_for(
        tmp_path, family, datasets["square"], {**flags, "run.name": "halves", "checkpoint.checkpoint_every": 1}
    )
    resumed, _, warnings = stopped_and_resumed(cfg, 1)
    assert resumed.steps == 2 and warnings == []
    assert losses(resumed.run_dir) == pytest.approx(losses(straight.run_dir), abs=TOLERANCE)
    a, b = load_file(straight.lora_dir / DIFFUSERS_LORA), load_file(resumed.lora_dir / DIFFUSERS_LORA)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=TOLERANCE, rtol=0)
    if recipe == "ema":  # the average itself was saved at the stop, and read back
        assert (resumed.run_dir / "checkpoints" / "step-000001" / "ema.safetensors").is_file()


@pytest.mark.slow
def test_tune_ranks_a_two_trial_sweep_on_a_transformer(tmp_path: Path, datasets):
    runs = tmp_path / "runs"
    args = ["tune", "--model", CHEAP.tiny_model, "--dino-model", "tiny-dino", "--clip-model", "tiny-clip"]
    args += ["validation.prompts=[]", "--prompt", "a photo of {token} {class}", "--seeds", "1", "--sample-steps", "2"]
    args += ["--dataset", str(datasets["square"]), "--runs-dir", str(runs), "--name", "t"]
    args += ["--grid", "lr=1e-3,3e-3", "--steps", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((runs / "t" / "tune.json").read_text())
    assert [t["status"] for t in data["trials"]] == ["done", "done"]
    winner = data["winner"]
    assert (winner["trial"], winner["step"]) == by_hand(runs / "t", data) and winner["trial"] in result.output
    assert (runs / "t" / "best" / "lora" / DIFFUSERS_LORA).is_file()
    html = (runs / "t" / "report.html").read_text()
    assert "trial-00" in html and "trial-01" in html
