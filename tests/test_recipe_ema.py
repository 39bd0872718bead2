"""--ema-decay: the EMA is what validation and the export see; training and resume stay exact."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import one_line_error
from recipe_helpers import invoke, lora_file, losses, print_config, straight_and_resumed, tiny_cfg
from sdlora.run import read_metrics
from sdlora.train import ema, loop


def val_losses(run_dir: Path) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r]


def test_ema_follows_diffusers_warmup_and_swaps_back_exactly():
    weight = torch.nn.Parameter(torch.zeros(3))
    average = ema.EMA([weight], decay=0.999, every=1, device="cpu")
    with torch.no_grad():
        weight.fill_(1.0)
    average.update()  # d = min(0.999, 1/10)
    torch.testing.assert_close(average.shadow[0], torch.full((3,), 0.9))
    average.update()  # d = 2/11
    torch.testing.assert_close(average.shadow[0], torch.full((3,), 0.9 * 2 / 11 + 9 / 11))
    with average.applied():
        assert torch.equal(weight.detach(), average.shadow[0])
    assert torch.equal(weight.detach(), torch.ones(3))


def test_ema_resumes_exactly_and_is_what_validation_and_the_export_use(tmp_path: Path, tiny_dataset: Path):
    flags = {"lora.ema_decay": 0.9, "lora.ema_every": 2, "validation.validate_every": 3, "embedding.train": False}
    straight, resumed = straight_and_resumed(tmp_path, tiny_dataset, flags)
    assert val_losses(resumed.run_dir) == val_losses(straight.run_dir) and len(val_losses(straight.run_dir)) == 2
    plain_flags = {**flags, "lora.ema_decay": 0.0, "train.max_steps": 6, "run.name": "plain"}
    plain = loop.run_training(tiny_cfg(tmp_path, tiny_dataset, plain_flags))
    assert losses(plain.run_dir) == losses(straight.run_dir)  # the EMA does not change training
    assert val_losses(plain.run_dir) != val_losses(straight.run_dir)
    a, b = lora_file(plain), lora_file(straight)
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    assert (resumed.run_dir / "checkpoints" / "step-000003" / "ema.safetensors").is_file()


def test_ema_flags_yaml_and_bad_values():
    printed = print_config("--ema-decay", "0.999", "--ema-every", "2", "--ema-device", "cpu")["lora"]
    assert (printed["ema_decay"], printed["ema_every"], printed["ema_device"]) == (0.999, 2, "cpu")
    one_line_error(invoke("--config", "tiny", "--ema-decay", "1.5"), "--ema-decay must be in [0, 1)")
    one_line_error(
        invoke("--config", "tiny", "--ema-decay", "0.9", "--ema-every", "0"), "--ema-every must be at least 1"
    )
    one_line_error(
        invoke("--config", "tiny", "--ema-decay", "0.9", "--optimizer", "adamw-schedulefree"),
        "--ema-decay does not combine with --optimizer adamw-schedulefree",
    )
