"""--preservation dop (train/preservation.py): the class caption, the LoRA-off target, the loss at step 0,
resume, and the one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from recipe_helpers import stopped_and_resumed
from sdlora.cli import app
from sdlora.events import no_event
from sdlora.run import Metric
from sdlora.train import loop, lora
from sdlora.train.preservation import class_caption, lora_disabled
from test_train import steps_of, tiny_cfg

DOP = {"prior.preservation": "dop"}


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a photo of sksToy toy", "a photo of toy"),
        ("a SKSTOY toy on a red table", "a toy on a red table"),
        ("sksToy on a table", "toy on a table"),
        ("a photo of sksToys toy", "a photo of sksToys toy"),  # not the token: a whole word only
    ],
)
def test_the_class_caption_is_the_caption_without_the_token(caption: str, expected: str):
    assert class_caption(caption, "sksToy", "toy") == expected


def test_the_target_is_the_base_models_own_prediction_for_the_class_caption(tmp_path: Path, tiny_dataset: Path):
    state = loop.setup(tiny_cfg(tmp_path, tiny_dataset, {**DOP, "embedding.train": False}))  # cached embeddings
    try:
        batch = state.plan.batch(0, 0)
        assert batch.class_cond is not None
        unet = state.unwrap(state.unet)
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "lora_B" in name:
                    param.add_(0.05)  # a trained LoRA: its output differs from the base model's
        pipe, arch, objective = lora.load_base(state.cfg, no_event)  # the base model, fresh
        prompt = "a photo of toy"
        with torch.no_grad():
            embeds, _ = arch.encode_tokens([pipe.text_encoder], arch.tokenize(pipe, [prompt]))
            torch.testing.assert_close(batch.class_cond.embeds[:1], embeds.float(), atol=1e-5, rtol=0)
            noisy = objective.noisy_input(batch.latents, batch.noise, batch.timesteps)
            cond = batch.class_cond.embeds

            def run(model):
                return model(noisy, batch.timesteps, cond, return_dict=False)[0]

            base = run(pipe.unet)
            on = run(unet)
            with lora_disabled(unet):
                off = run(unet)
            again = run(unet)
        torch.testing.assert_close(off, base, atol=1e-5, rtol=0)
        assert (on - base).abs().max() > 1e-3
        torch.testing.assert_close(again, on, atol=0, rtol=0)  # switched back on
        assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)
        # The step's preservation loss is the MSE between the LoRA-on prediction and that base target.
        _, parts = loop.compute_loss(state, batch)
        expected = torch.nn.functional.mse_loss(on, base)
        assert parts[Metric.LOSS_PRESERVATION].item() == pytest.approx(expected.item(), rel=1e-4)
    finally:
        loop.cleanup(state)


def test_dop_starts_at_zero_is_logged_and_resumes_exactly(tmp_path: Path, tiny_dataset: Path):
    flags = {**DOP, "train.max_steps": 4, "prior.preservation_weight": 0.5, "lora.dropout": 0.1}
    straight = loop.run_training(tiny_cfg(tmp_path, tiny_dataset, {**flags, "run.name": "straight"}))
    saved = yaml.safe_load((straight.run_dir / "config.yaml").read_text())
    assert saved["prior"]["preservation"] == "dop" and saved["prior"]["preservation_weight"] == 0.5
    steps = steps_of(straight.run_dir)
    # LoRA B starts at zero: at the first step the LoRA-on and LoRA-off predictions are equal.
    assert steps[0][Metric.LOSS_PRESERVATION] == pytest.approx(0.0, abs=1e-9)
    assert steps[-1][Metric.LOSS_PRESERVATION] > 0
    for r in steps:
        assert r["loss"] == pytest.approx(r[Metric.LOSS_INSTANCE] + 0.5 * r[Metric.LOSS_PRESERVATION], rel=1e-5)

    second, cfg, warnings = stopped_and_resumed(tiny_cfg(tmp_path, tiny_dataset, {**flags, "run.name": "halves"}), 2)
    assert warnings == [] and cfg.prior.preservation == "dop"
    a = load_file(straight.lora_dir / "pytorch_lora_weights.safetensors")
    b = load_file(second.lora_dir / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    assert [r["loss"] for r in steps_of(second.run_dir)] == pytest.approx([r["loss"] for r in steps], abs=1e-5)


def test_dop_with_a_text_encoder_lora_starts_at_zero(tmp_path: Path, tiny_dataset: Path):
    flags = {**DOP, "train.max_steps": 2, "lora.train_text_encoder": True}
    result = loop.run_training(tiny_cfg(tmp_path, tiny_dataset, flags))
    steps = steps_of(result.run_dir)
    assert steps[0][Metric.LOSS_PRESERVATION] == pytest.approx(0.0, abs=1e-9)
    assert steps[1][Metric.LOSS_PRESERVATION] > 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["--preservation", "dop", "--class-prompt", "a photo of a toy"], ["--preservation dop", "--class-prompt"]),
        (["--preservation", "images"], ["--preservation images", "--class-prompt"]),
    ],
)
def test_two_kinds_of_preservation_is_one_line(tmp_path: Path, tiny_dataset: Path, args, words):
    result = CliRunner().invoke(
        app, ["train", "-d", str(tiny_dataset), "--model", "tiny-sd", "--runs-dir", str(tmp_path / "runs"), *args]
    )
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.output
