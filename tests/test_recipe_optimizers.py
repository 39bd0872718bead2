"""LoRA+ groups, Prodigy and schedule-free: rates per group, resume exactness, one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import one_line_error
from recipe_helpers import invoke, print_config, straight_and_resumed, tiny_cfg
from sdlora.config.schema import OPTIMIZER_NAMES
from sdlora.errors import ConfigError
from sdlora.run import read_metrics
from sdlora.train import loop, optim


def steps(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_the_config_lists_every_optimizer_of_the_table():
    assert tuple(optim.OPTIMIZERS) == OPTIMIZER_NAMES


def test_loraplus_with_schedule_free_resumes_exactly_and_exports_the_averaged_weights(
    tmp_path: Path, tiny_dataset: Path, monkeypatch
):
    pytest.importorskip("schedulefree")
    modes: list[tuple[str, bool]] = []

    def mode(state) -> bool:
        return getattr(state.optimizer, "optimizer", state.optimizer).param_groups[0]["train_mode"]

    export, save = loop.export_lora, loop.ckpt.save_checkpoint
    monkeypatch.setattr(
        loop, "export_lora", lambda state, *a, **k: modes.append(("export", mode(state))) or export(state, *a, **k)
    )
    monkeypatch.setattr(
        loop.ckpt, "save_checkpoint", lambda state: modes.append(("checkpoint", mode(state))) or save(state)
    )
    flags = {
        "lora.loraplus_ratio": 16.0,
        "train.optimizer": "adamw-schedulefree",
        "train.lr_warmup_steps": 2,
        "lora.train_text_encoder": True,
        "embedding.train": False,
    }
    straight, _ = straight_and_resumed(tmp_path, tiny_dataset, flags)
    record = steps(straight.run_dir)[-1]
    assert record["lr/unet_B"] == pytest.approx(16 * record["lr"])
    assert record["lr/text_encoder_B"] == pytest.approx(16 * record["lr/text_encoder"])
    assert "grad_norm/unet_B" in record
    # The LoRA is exported from the averaged weights (eval mode); checkpoints keep the training weights.
    assert ("export", False) in modes and ("checkpoint", True) in modes and ("export", True) not in modes


def test_prodigy_resumes_exactly_and_logs_its_effective_rate(tmp_path: Path, tiny_dataset: Path):
    pytest.importorskip("prodigyopt")
    flags = {
        "train.optimizer": "prodigy",
        "train.learning_rate": 1.0,
        "train.prodigy_safeguard_warmup": True,
        "train.prodigy_bias_correction": True,
    }
    straight, _ = straight_and_resumed(tmp_path, tiny_dataset, flags)
    record = steps(straight.run_dir)[-1]
    assert record["lr"] == 1.0 and record["lr/embeddings"] == 1.0  # prodigyopt: one rate for every group
    assert 0 < record["lr_effective/unet"] == record["lr_effective/embeddings"] < 1.0


def test_a_missing_optimizer_extra_fails_in_one_line_before_the_model_loads(
    tmp_path: Path, tiny_dataset: Path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"--optimizer prodigy needs prodigyopt \(pip install 'sdlora\[optimizers\]'"):
        loop.setup(tiny_cfg(tmp_path, tiny_dataset, {"train.optimizer": "prodigy", "train.learning_rate": 1.0}))
    assert not (tmp_path / "runs").exists()


def test_flags_yaml_and_bad_values():
    printed = print_config(
        "--optimizer", "prodigy", "--lr", "1", "--prodigy-d-coef", "0.5", "--prodigy-safeguard-warmup"
    )
    assert printed["train"]["optimizer"] == "prodigy" and printed["train"]["prodigy_d_coef"] == 0.5
    assert printed["train"]["prodigy_safeguard_warmup"] is True and printed["train"]["prodigy_bias_correction"] is False
    assert print_config("--loraplus-ratio", "16")["lora"]["loraplus_ratio"] == 16
    assert print_config("--optimizer", "adamw-schedulefree", "--lr-warmup-steps", "1")["train"]["lr_warmup_steps"] == 1
    cases = [
        (("--loraplus-ratio", "0.5"), "--loraplus-ratio must be at least 1"),
        (
            ("--optimizer", "prodigy", "--lr", "1", "--loraplus-ratio", "16"),
            "--loraplus-ratio does not combine with --optimizer prodigy",
        ),
        (("--optimizer", "prodigy"), "--optimizer prodigy finds the rate itself: --learning-rate is a multiplier"),
        (
            ("--optimizer", "prodigy", "--lr", "1", "--text-encoder-lr", "0.5"),
            "--optimizer prodigy finds one rate for every group: drop --text-encoder-lr 0.5",
        ),
        (("--optimizer", "prodigy", "--lr", "1", "--prodigy-d-coef", "0"), "--prodigy-d-coef must be positive"),
        (
            ("--optimizer", "adamw-schedulefree", "--lr-scheduler", "cosine"),
            "--optimizer adamw-schedulefree has no learning-rate schedule",
        ),
    ]
    for args, message in cases:
        one_line_error(invoke("--config", "tiny", *args), message)
