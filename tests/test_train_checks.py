"""What `train` refuses before it encodes anything: a --rank wider than the layers it adapts, captions whose
token the CLIP window would cut off; and what it only warns about (a high rank, long captions)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_tiny_dataset
from sdlora.cli import app
from sdlora.config import load_config
from sdlora.data.captions import write_captions
from sdlora.errors import ConfigError, DataError
from sdlora.train import loop

runner = CliRunner()
LONG_TAIL = ", ".join(["on a wooden table in a bright kitchen"] * 12)  # ~90 CLIP tokens


def tiny(tmp_path: Path, dataset: Path, **more):
    return load_config(
        None,
        {
            "model.name": "tiny-sd",
            "data.dataset": str(dataset),
            "run.runs_dir": str(tmp_path / "runs"),
            "train.max_steps": 1,
            "validation.validate_every": 0,
            "validation.prompts": [],
            "checkpoint.checkpoint_every": 0,
            **more,
        },
    )


class Events(list):
    def __call__(self, event: dict) -> None:
        self.append(event)


def test_a_rank_wider_than_the_narrowest_targeted_layer_is_refused_before_encoding(tmp_path: Path, tiny_dataset):
    result = runner.invoke(
        app,
        ["train", "--model", "tiny-sd", "--dataset", str(tiny_dataset), "--runs-dir", str(tmp_path / "runs")]
        + ["--rank", "100000", "--max-steps", "1"],
    )
    assert result.exit_code == 1, result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # (also: tiny model warning)
    assert len(error) == 1 and all(f in error[0] for f in ("--rank 100000", "32 wide", "--rank 32 or less")), error
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() and not (tiny_dataset / ".cache").exists()


def test_rank_limit_counts_the_text_encoders_when_they_train_and_warns_above_128():
    from sdlora.train.lora import check_rank

    unet = torch.nn.ModuleDict({"to_q": torch.nn.Linear(512, 512)})
    encoder = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(160, 160)})
    pipe = SimpleNamespace(unet=unet, text_encoder=encoder)
    arch = SimpleNamespace(
        text_encoders=("text_encoder",), lora_text_encoders=lambda: ("text_encoder",), denoiser="unet"
    )

    def cfg(rank: int, text: bool):
        return load_config(None, {"lora.rank": rank, "lora.target_modules": ["to_q"], "lora.train_text_encoder": text})

    events = Events()
    check_rank(cfg(200, False), pipe, arch, events)  # the UNet alone: 512 wide
    assert len(events) == 1 and "--rank 200 is high" in events[0]["message"]
    with pytest.raises(
        ConfigError, match=r"--rank 200: larger than the narrowest targeted layer \(text_encoder q_proj, 160"
    ):
        check_rank(cfg(200, True), pipe, arch, events)
    events.clear()
    check_rank(cfg(64, True), pipe, arch, events)
    assert events == []


def test_a_caption_whose_token_falls_past_the_clip_window_is_refused_naming_its_line(tmp_path: Path):
    dataset = write_tiny_dataset(tmp_path / "dataset")
    names = sorted(p.name for p in (dataset / "images").iterdir())
    captions = {name: "a photo of sksToy toy" for name in names}
    captions[names[2]] = f"a photo of a toy {LONG_TAIL}, sksToy"
    write_captions(dataset / "captions.txt", captions)
    with pytest.raises(DataError) as error:
        loop.setup(tiny(tmp_path, dataset, **{"embedding.train": False}))
    message = str(error.value)
    assert f"captions.txt:{names.index(names[2]) + 2} ({names[2]})" in message  # the header is line 1
    assert "'sksToy' is cut off" in message and "shorten it" in message
    assert not (tmp_path / "runs").exists() and not (dataset / ".cache").exists()


def test_long_captions_with_the_token_inside_the_window_train_with_one_warning(tmp_path: Path):
    dataset = write_tiny_dataset(tmp_path / "dataset")
    names = sorted(p.name for p in (dataset / "images").iterdir())
    write_captions(dataset / "captions.txt", {name: f"a photo of sksToy toy {LONG_TAIL} {name}" for name in names})
    events = Events()
    state = loop.setup(tiny(tmp_path, dataset), on_event=events)
    loop.cleanup(state)
    long = [e["message"] for e in events if e["event"] == "warning" and "CLIP tokens" in e["message"]]
    assert len(long) == 1 and long[0].startswith(f"{len(names)} caption(s) longer than the 75 CLIP tokens"), long


def test_a_batch_larger_than_the_training_set_is_warned_about_on_the_command_line(tmp_path: Path, monkeypatch):
    dataset = write_tiny_dataset(tmp_path / "dataset")  # 5 train images, 1 val

    def stop(*args, **kwargs):
        raise ConfigError("stopped before the model loads")

    monkeypatch.setattr(loop.lora, "load_base", stop)
    args = ["train", "--model", "tiny-sd", "--dataset", str(dataset), "--runs-dir", str(tmp_path / "runs")]
    result = runner.invoke(app, [*args, "--batch-size", "100", "--max-steps", "1"])
    warning = [line for line in result.stderr.splitlines() if "--batch-size 100" in line]
    assert len(warning) == 1, result.stderr
    assert warning[0].startswith("warning: --batch-size 100 is larger than the 5 training images")
    assert "up to 20x each" in warning[0] and "use --batch-size 5" in warning[0]
    quiet = runner.invoke(app, [*args, "--batch-size", "5", "--max-steps", "1"])
    assert "--batch-size" not in quiet.stderr, quiet.stderr


def test_the_batch_warning_counts_the_smallest_size_bucket_and_the_processes():
    from sdlora.train.data import Example, batch_warning

    def examples(n: int, size: tuple[int, int]) -> list[Example]:
        return [Example(Path(f"{size}-{i}.png"), "sksToy", size, (0, 0), size) for i in range(n)]

    mixed = examples(8, (64, 64)) + examples(2, (64, 96))
    assert batch_warning(mixed, 2, 1) is None
    line = batch_warning(mixed, 2, 2)
    assert line.startswith("--batch-size 2 x 2 processes is larger than the 2 images of the smallest of its 2 size")
    assert batch_warning(examples(4, (64, 64)), 4, 1) is None
