"""--compile: the UNet's transformer blocks compiled in place for training steps (train/compiling.py).

The default suite checks the wiring without compiling anything (a fake torch.compile); the slow
test trains compiled and uncompiled tiny runs (text-encoder LoRA, validation, a stop and a resume)
and compares their losses, exported LoRA files and checkpoints, and the CLI's compile line.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from recipe_helpers import stopped_and_resumed
from sdlora.config import load_config
from sdlora.errors import ConfigError
from sdlora.models.tiny import tiny_sd
from sdlora.run import Metric, read_metrics
from sdlora.train import compiling
from sdlora.train.lora import add_lora
from sdlora.train.runtime import step_event
from test_train import tiny_cfg


def _failing_compile(calls: list[Any]):
    """A torch.compile whose compiled function fails as inductor does on a machine without a C++ compiler."""
    from torch._inductor.exc import InductorError

    def compile(fn: Any, **kwargs: Any) -> Any:
        def compiled(*args: Any, **kwargs: Any) -> Any:
            calls.append(fn)
            try:
                raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in cpp.cxx\nmore detail")
            except RuntimeError as exc:
                raise InductorError(exc, None) from exc

        return compiled

    return compile


def _unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 8, 32)


def test_compile_unet_swaps_block_forwards_only_for_training_and_errors_are_one_line(monkeypatch):
    cfg = load_config(None, {"model.name": "tiny-sd", "train.compile": True})
    unet = tiny_sd().unet
    add_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], cfg, "--target-modules", "UNet")
    names = [name for name, _ in unet.named_parameters()]
    calls: list[Any] = []
    monkeypatch.setattr(torch, "compile", _failing_compile(calls))

    assert compiling.compile_unet(load_config(None, {"model.name": "tiny-sd"}), unet) == 0  # off: nothing
    assert compiling.compiled_blocks(unet) == 0
    assert compiling.compile_unet(cfg, unet) == 6  # tiny-sd's transformer blocks: 2 down, 1 mid, 3 up
    assert compiling.compiled_blocks(unet) == 6
    # In place: the parameter names (the checkpoint's, the exported LoRA's) are unchanged.
    assert [name for name, _ in unet.named_parameters()] == names
    assert not [key for key in unet.state_dict() if "_orig_mod" in key]

    unet.eval()  # validation and samples run the blocks eagerly
    with torch.no_grad():
        unet(*_unet_inputs(), return_dict=False)
    assert calls == []
    unet.train()  # training steps run the compiled forward: its failure is one line naming --compile
    with pytest.raises(ConfigError) as caught:
        unet(*_unet_inputs(), return_dict=False)
    assert len(calls) == 1
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--compile: torch.compile failed (InvalidCxxCompiler: No working")
    assert message.endswith("; train without --compile")

    apple = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device("mps"))]))
    with pytest.raises(ConfigError, match=r"^--compile: torch.compile does not support Apple GPUs \(MPS\)"):
        compiling.compile_unet(cfg, apple)


def test_the_cli_prints_one_compile_line_after_the_first_steps(capsys):
    from sdlora.cli.train import TrainRenderer

    start = {
        "event": "start",
        **dict(arch="sd1", train_images=5, val_images=1, run_dir="runs/x", effective_batch=1, batch_size=1),
        **dict(num_processes=1, gradient_accumulation=1, total_steps=8, start_step=2, device="cpu"),
        **dict(mixed_precision="no", compile=6),
    }
    render = TrainRenderer()
    render(start)
    record = {Metric.LOSS: 1.0, Metric.LOSS_MEAN: 1.0, Metric.LR: 1e-4}
    for step, seconds in zip(range(3, 9), (38.7, 0.12, 0.1, 0.14, 0.5, 0.5)):
        render(step_event(step, 8, record, seconds))  # the loop's own step events
    render.close()
    out = capsys.readouterr()
    assert "compiled (6 UNet blocks)" in out.out
    assert re.findall(r"compile: first step.*", out.err) == ["compile: first step 38.7 s (later steps ~0.12 s)"]

    render = TrainRenderer()  # without --compile: no such line
    render({**start, "compile": 0})
    render(step_event(3, 8, record, 1.0))
    render.close()
    out = capsys.readouterr()
    assert "compile" not in out.out + out.err


# ----------------------------------------------------------------------------- slow: real compiled runs

# Compiled vs eager losses on tiny-sd (fp32, CPU): inductor's fused kernels differ in the last bits.
# Measured: at most MEASURED relative difference over the 6 steps; the bound leaves room for other CPUs.
LOSS_RTOL = 1e-4

FLAGS = {
    "train.max_steps": 6,
    "train.mixed_precision": "no",
    "lora.train_text_encoder": True,  # its LoRA trains beside the compiled UNet's, uncompiled
    "validation.validate_every": 3,  # validation loss and a sample image run eagerly
    "validation.prompts": ["a photo of {token}"],
    "checkpoint.checkpoint_every": 3,
}


def _halves(tmp: Path, dataset: Path, name: str, flags: dict[str, Any]) -> Any:
    """3 steps, a stop (Ctrl-C), and a resume to 6: the resumed TrainResult."""
    return stopped_and_resumed(tiny_cfg(tmp, dataset, {**FLAGS, **flags, "run.name": name}), 3)[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """Uncompiled and compiled: each stopped at step 3 and resumed to 6; and a compiled CLI run of 6."""
    from typer.testing import CliRunner

    from conftest import write_tiny_dataset
    from sdlora.cli import app

    tmp = tmp_path_factory.mktemp("compile")
    dataset = write_tiny_dataset(tmp / "dataset")
    eager = _halves(tmp, dataset, "eager", {})
    compiled = _halves(tmp, dataset, "compiled", {"train.compile": True})
    argv = ["train", "--model", "tiny-sd", "--dataset", str(dataset), "--runs-dir", str(tmp / "runs"), "--name", "cli"]
    argv += ["--max-steps", "6", "--lr", "1e-3", "--compile", "--mixed-precision", "no", "--train-text-encoder"]
    argv += ["--validate-every", "3", "--validation-prompt", "a photo of {token}", "--checkpoint-every", "3"]
    cli = CliRunner().invoke(app, argv)
    assert cli.exit_code == 0, cli.output
    return {"eager": eager.run_dir, "compiled": compiled.run_dir, "cli": tmp / "runs" / "cli", "output": cli.output}


def _steps(run_dir: Path, key: str) -> list[float]:
    return [record[key] for record in read_metrics(run_dir / "metrics.jsonl") if key in record]


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in load_file(path).items()}


@pytest.mark.slow  # three tiny runs, one inductor compile (~40 s on 2 cores)
def test_compiled_resumed_run_matches_the_eager_one_and_saves_the_same_keys(runs: dict[str, Any]):
    eager, compiled = runs["eager"], runs["compiled"]
    assert _steps(compiled, Metric.STEP) == _steps(eager, Metric.STEP)  # 6 steps and 2 validations each
    assert _steps(compiled, Metric.LOSS) == pytest.approx(_steps(eager, Metric.LOSS), rel=LOSS_RTOL)
    assert _steps(compiled, Metric.VAL_LOSS) == pytest.approx(_steps(eager, Metric.VAL_LOSS), rel=LOSS_RTOL)
    # The exported LoRA (diffusers and kohya files, text encoder included), best/ and the checkpoints:
    # the same files with the same keys and shapes, and no torch.compile prefix anywhere.
    files = sorted(
        path.relative_to(eager)
        for path in eager.rglob("*.safetensors")
        if "samples" not in path.parts and path.stem != eager.name
    )
    assert (
        any(path.parts[0] == "checkpoints" for path in files) and Path("lora/pytorch_lora_weights.safetensors") in files
    )
    kohya = [Path("lora") / f"{eager.name}.safetensors", Path("lora") / f"{compiled.name}.safetensors"]
    for a, b in [(eager / f, compiled / f) for f in files] + [(eager / kohya[0], compiled / kohya[1])]:
        keys = _shapes(a)
        assert _shapes(b) == keys, b
        assert not [key for key in keys if "_orig_mod" in key], b
    diffusers_keys = _shapes(compiled / "lora" / "pytorch_lora_weights.safetensors")
    assert any(key.startswith("text_encoder.") for key in diffusers_keys)


@pytest.mark.slow
def test_the_cli_prints_the_compile_line_and_a_straight_compiled_run_matches_the_resumed_one(runs: dict[str, Any]):
    output, cli = runs["output"], runs["cli"]
    assert "compiled (6 UNet blocks)" in output
    assert len(re.findall(r"^compile: first step \d+\.\d s \(later steps ~\d+\.\d\d s\)$", output, re.M)) == 1
    assert "recompile" not in output.lower() and "Traceback" not in output
    assert _steps(cli, Metric.LOSS) == pytest.approx(_steps(runs["compiled"], Metric.LOSS), rel=LOSS_RTOL)
