"""`sdlora sample`: options reach the sampler, bad input is one line + exit 1, an end-to-end tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import sdlora.generate
from run_helpers import make_run
from sdlora.cli import app
from sdlora.models.loading import TINY_WARNING

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["sample", *map(str, args)])


def one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.output


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path)


@pytest.fixture
def fake_sampler(monkeypatch):
    """Records the core call; writes an empty samples.json like the real one."""
    calls = []

    def generate_samples(run, prompts, **kwargs):
        calls.append({"prompts": list(prompts), **kwargs})
        path = run.path / "samples" / "samples.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": []}))
        return path

    monkeypatch.setattr(sdlora.generate, "generate_samples", generate_samples)
    return calls


def test_options_reach_the_sampler(run, fake_sampler, tmp_path):
    shutil.copytree(run / "lora", run / "best")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# beach and snow\nsksToy in the snow\n\nsksToy on a beach\n")
    result = invoke(
        "sksToy on a beach",
        "--run",
        run,
        "--prompts-file",
        prompts_file,
        "-n",
        3,
        "--seed",
        42,
        "--steps",
        12,
        "--guidance",
        5.5,
        "--scheduler",
        "dpm++",
        "--lora-scale",
        0.7,
        "--negative-prompt",
        "blurry",
        "--height",
        72,
        "--width",
        96,
        "--batch-size",
        2,
        "--no-baseline",
        "--lora",
        "best",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--attention-slicing",
        "--vae-tiling",
        "--no-embedding",
    )
    assert result.exit_code == 0, result.output
    [call] = fake_sampler
    assert call == {
        "prompts": ["sksToy on a beach", "sksToy in the snow"],
        "num_images": 3,
        "seed": 42,
        "steps": 12,
        "guidance": 5.5,
        "baseline": False,
        "lora_scale": 0.7,
        "negative_prompt": "blurry",
        "height": 72,
        "width": 96,
        "batch_size": 2,
        "scheduler": "dpm++",
        "device": "cpu",
        "lora_dir": "best",
        "embedding": False,
        "dtype": "fp32",
        "attention_slicing": True,
        "vae_tiling": True,
        "cpu_offload": False,
        "on_progress": call["on_progress"],
        "on_warning": call["on_warning"],
    }
    assert (run / "report.html").is_file()  # refreshed at the end
    assert f"samples: {run / 'samples' / 'samples.json'}" in " ".join(result.stdout.split())


def test_defaults(run, fake_sampler, monkeypatch):
    monkeypatch.chdir(run.parent.parent)  # runs/latest -> r1
    result = invoke("sksToy on a beach")
    assert result.exit_code == 0, result.output
    [call] = fake_sampler
    assert {
        k: call[k]
        for k in (
            "num_images",
            "seed",
            "steps",
            "guidance",
            "baseline",
            "lora_scale",
            "height",
            "width",
            "batch_size",
            "scheduler",
            "lora_dir",
            "embedding",
            "dtype",
            "cpu_offload",
        )
    } == {
        "num_images": 4,
        "seed": 0,
        "steps": None,  # the loaded model's (Family.sample_steps)
        "guidance": None,  # the model family's (Family.sample_guidance), known once the model loads
        "baseline": True,
        "lora_scale": 1.0,
        "height": None,
        "width": None,
        "batch_size": 1,
        "scheduler": None,
        "lora_dir": "lora",
        "embedding": True,
        "dtype": "auto",
        "cpu_offload": False,
    }
    assert result.stderr.count(TINY_WARNING.split(":")[0]) == 1  # the tiny-model warning, once


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["sksToy on a beach", "--run", "{root}/runs/nope"], "runs/nope: no such run folder"),
        (["sksToy on a beach", "--run", "{root}/runs/bare"], "no LoRA in lora/"),
        (["", "--run", "{root}/runs/r1"], "prompt 1 is empty"),
        (["--run", "{root}/runs/r1"], "no prompts given"),
        (["--prompts-file", "{root}/missing.txt", "--run", "{root}/runs/r1"], "--prompts-file"),
        (["sksToy", "--scheduler", "warp", "--run", "{root}/runs/r1"], "--scheduler warp: unknown scheduler"),
        (
            ["sksToy", "--dtype", "fp8", "--run", "{root}/runs/r1"],
            "--dtype fp8: expected one of auto, fp32, fp16, bf16",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, run, args, fragment):
    make_run(tmp_path, name="bare", lora=False)
    before = sorted(p.name for p in run.iterdir())
    result = invoke(*[a.format(root=tmp_path) for a in args])
    one_line_error(result, fragment)
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written


def test_prompts_file_missing_names_it(tmp_path, run):
    result = invoke("--prompts-file", tmp_path / "missing.txt", "--run", run)
    one_line_error(result, f"--prompts-file {tmp_path / 'missing.txt'}: no such file")


def test_end_to_end_on_tiny_sd(run):
    result = invoke("sksToy on a beach", "--run", run, "-n", 2, "--steps", 2, "--batch-size", 2, "--seed", 9)
    assert result.exit_code == 0, result.output
    data = json.loads((run / "samples" / "samples.json").read_text())
    assert data["guidance"] == 7.5  # SD's default guidance
    assert sorted((e["variant"], e["seed"]) for e in data["images"]) == [
        ("baseline", 9),
        ("baseline", 10),
        ("lora", 9),
        ("lora", 10),
    ]
    grid = run / "samples" / "skstoy-toy-on-a-beach" / "grid.png"
    assert grid.is_file()
    out = " ".join(result.stdout.split())
    assert f"grid: {grid}" in out and f"report: {run / 'report.html'}" in out
    html = (run / "report.html").read_text()
    assert "sksToy toy on a beach" in html and html.count("data:image/png;base64,") >= 4


def test_help():
    result = runner.invoke(app, ["sample", "--help"])
    assert result.exit_code == 0 and not result.stderr
    out = " ".join(result.stdout.split())
    for option in ("--prompts-file", "--no-baseline", "--scheduler", "--lora-scale", "--cpu-offload", "--dtype"):
        assert option in out
    assert 'sdlora sample "sksToy on a beach"' in out
    report = runner.invoke(app, ["report", "--help"])
    assert report.exit_code == 0 and not report.stderr and "--open" in report.stdout


def test_prompts_path_is_relative_to_cwd(run, fake_sampler, monkeypatch, tmp_path):
    (tmp_path / "p.txt").write_text("a photo of sksToy\n")
    monkeypatch.chdir(tmp_path)
    result = invoke("--prompts-file", Path("p.txt"), "--run", run)
    assert result.exit_code == 0, result.output
    assert fake_sampler[0]["prompts"] == ["a photo of sksToy"]


@pytest.mark.parametrize("file", ["pytorch_lora_weights.safetensors", "embeddings.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_lora_or_embedding_is_one_line_naming_the_file(run, file, damage):
    from run_helpers import save_embedding

    save_embedding(run / "lora")
    path = run / "lora" / file
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) - 7], "garbage": b"PK\x03\x04" * 64, "empty": b""}[damage])
    result = invoke("sksToy on a beach", "--run", run, "-n", 1, "--steps", 1, "--no-baseline")
    one_line_error(result, f"{path}: damaged or incomplete file (")
    assert "re-export it or train again" in " ".join(result.stderr.split())
    assert "another base model" not in result.stderr


# ---- which LoRA file is sampled ----------------------------------------------------------------------


def exported_lora(folder: Path, seed: int) -> tuple[Path, Path]:
    """A tiny-sd LoRA written as a run's export writes it (train/export.py `save_lora`): the diffusers
    file and the kohya file `tiny.safetensors`, both with sdlora's metadata."""
    import torch
    from peft import LoraConfig

    from run_helpers import LORA_TARGETS
    from sdlora.models import load_pipeline
    from sdlora.train.export import save_lora

    pipe, arch = load_pipeline("tiny-sd")
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    save_lora(folder, pipe.unet, None, arch, metadata={"sdlora.base_model": "tiny-sd"}, kohya_name="tiny")
    return folder / "pytorch_lora_weights.safetensors", folder / "tiny.safetensors"


def strip_sdlora_metadata(path: Path, out: Path) -> Path:
    """The file as another trainer or a download site has it: the same tensors, no `sdlora.*` keys."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if not k.startswith("sdlora.")}
    assert metadata and all(k.startswith(("ss_", "modelspec.")) for k in metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(path)), str(out), metadata=metadata)
    return out


def sample_one(run: Path, lora: Path | str, out: Path, *more: str):
    """One image (seed 0, two steps, no baseline) with `--lora`; (CLI result, its pixels or None, samples.json)."""
    import numpy as np
    from PIL import Image

    result = invoke(
        "sksToy", "--run", run, "--lora", lora, "-n", 1, "--steps", 2, "--no-baseline", "--device", "cpu", *more
    )
    samples = run / "samples" / "samples.json"
    if result.exit_code != 0:
        return result, None, None
    data = json.loads(samples.read_text())
    with Image.open(run / "samples" / "skstoy-toy" / "lora-00.png") as im:
        image = np.asarray(im.convert("RGB"), dtype=np.int16)
    shutil.move(run / "samples", out)
    return result, image, data


def test_a_named_lora_file_is_the_one_sampled_and_recorded_with_its_absolute_path(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    other = tmp_path / "loras"
    exported_lora(other, seed=5)  # other/pytorch_lora_weights.safetensors: a different LoRA
    mine = other / "my_lora.safetensors"
    shutil.copy(run / "lora" / "pytorch_lora_weights.safetensors", mine)  # the run's own weights
    monkeypatch.chdir(tmp_path)
    result, named, data = sample_one(run, Path("loras") / mine.name, tmp_path / "named")
    assert result.exit_code == 0, result.output
    assert data["lora_file"] == str(mine.resolve()) and Path(data["lora_file"]).is_absolute()
    assert {e["lora_file"] for e in data["images"]} == {str(mine.resolve())}
    _, own, _ = sample_one(run, "lora", tmp_path / "own")
    _, folder, data = sample_one(run, other, tmp_path / "folder")
    assert data["lora_file"] == str(other.resolve() / "pytorch_lora_weights.safetensors")
    assert abs(named - own).max() <= 1  # the named file's weights, not the folder's other file
    assert abs(named - folder).mean() > 1.0

    missing = other / "missing.safetensors"
    one_line_error(invoke("sksToy", "--run", run, "--lora", missing), f"--lora {missing}: no such file")
    one_line_error(invoke("sksToy", "--run", run, "--lora", other / "notes.txt"), "no such folder or .safetensors file")


def test_a_kohya_lora_from_another_trainer_samples_like_the_diffusers_file(tmp_path):
    run = make_run(tmp_path)
    diffusers_file, kohya_file = exported_lora(tmp_path / "export", seed=3)
    download = strip_sdlora_metadata(kohya_file, tmp_path / "downloads" / "civitai_lora.safetensors")
    result, kohya, data = sample_one(run, download, tmp_path / "kohya")
    assert result.exit_code == 0, result.output
    assert data["lora_file"] == str(download.resolve())
    _, diffusers, _ = sample_one(run, diffusers_file, tmp_path / "diffusers")
    assert abs(kohya - diffusers).max() <= 1  # the same weights, read from kohya keys
    _, base, _ = sample_one(run, download, tmp_path / "base", "--lora-scale", "0")
    assert abs(kohya - base).mean() > 1.0  # and they did change the image


def test_a_file_that_is_no_lora_for_the_model_is_refused_in_one_line_saying_why(tmp_path):
    import torch
    from safetensors.torch import save_file

    run = make_run(tmp_path)
    not_lora = tmp_path / "downloads" / "embedding.safetensors"
    not_lora.parent.mkdir()
    save_file({"emb_params": torch.randn(1, 32)}, str(not_lora))
    result = invoke("sksToy", "--run", run, "--lora", not_lora, "-n", 1, "--steps", 1, "--no-baseline")
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    message = " ".join(result.stderr.split())
    assert f"{not_lora}: cannot be loaded into" in message and "Invalid LoRA checkpoint" in message
    assert "diffusers reads diffusers/peft and kohya LoRA files" in message
    assert not (run / "samples" / "samples.json").exists()
