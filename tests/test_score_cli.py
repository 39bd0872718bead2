"""`sdlora score` through the CLI on tiny scorers: the table, scores.json, runs/latest, and
one-line errors (exit 1) that leave an earlier scores.json as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_line_error
from score_helpers import add_samples, write_run
from sdlora.cli import app
from sdlora.run import point_latest

runner = CliRunner()
TINY = ["--dino-model", "tiny-dino", "--clip-model", "tiny-clip", "--device", "cpu"]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # keep table cells on one line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def invoke(*args: str | Path):
    return runner.invoke(app, ["score", *map(str, args)])


@pytest.fixture
def scored_run(tmp_path) -> Path:
    run = write_run(tmp_path)
    add_samples(run / "samples", ["sksToy on a beach", "a red sksToy toy"], per_variant=2)
    return run


def test_score_latest_prints_table_and_writes_scores(scored_run, monkeypatch):
    point_latest(scored_run)
    monkeypatch.chdir(scored_run.parent.parent)
    result = invoke(*TINY)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in (
        "sksToy toy on a beach",
        "a red sksToy toy",
        "overall (2 prompts)",
        "LoRA",
        "baseline",
        "DINO",
        "CLIP-I",
        "CLIP-T",
        "cosine similarity as is",
        "scores.json",
    ):
        assert text in out, text
    assert "embedded now: dino 10 (cached 0), clip 10 (cached 0)" in result.stderr
    assert "tiny random scorer models" in result.stderr
    scores = json.loads((scored_run / "scores.json").read_text())
    lora = scores["overall"]["lora"]
    assert f"{lora['dino']:.3f}" in out and f"{lora['clip_t']:.3f}" in out
    assert "report.html" not in result.stderr and (scored_run / "report.html").is_file()  # refreshed
    again = invoke("--run", "runs/latest", *TINY)
    assert again.exit_code == 0 and "embedded now: dino 0 (cached 10), clip 0 (cached 10)" in again.stderr


def test_prompts_option_scores_a_subset(scored_run):
    result = invoke("--run", scored_run, "--prompts", "a red sksToy toy", *TINY)
    assert result.exit_code == 0, result.output
    assert "overall (1 prompts)" in result.stdout and "on a beach" not in result.stdout


def test_missing_run(tmp_path):
    one_line_error(invoke("--run", tmp_path / "runs" / "latest", *TINY), "no such run folder", "sdlora train")


def test_run_without_lora(tmp_path):
    run = write_run(tmp_path, lora=False)
    add_samples(run / "samples", ["sksToy on a beach"], per_variant=1)
    one_line_error(invoke("--run", run, *TINY), "no LoRA in lora/")


def test_dataset_without_val_images(tmp_path):
    run = write_run(tmp_path, val=False)
    add_samples(run / "samples", ["sksToy on a beach"], per_variant=1)
    one_line_error(invoke("--run", run, *TINY), "manifest.json", "no val images", "--val-fraction")


def test_empty_prompts_keep_earlier_scores(scored_run):
    assert invoke("--run", scored_run, *TINY).exit_code == 0
    before = (scored_run / "scores.json").read_bytes()
    one_line_error(invoke("--run", scored_run, "--prompts", "", *TINY), "--prompts: empty prompt")
    assert (scored_run / "scores.json").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (
            ["--dino-model", "facebook/dino-vits16", "--clip-model", "tiny-clip"],
            "scorer model facebook/dino-vits16: not in the local cache",
        ),
        (["--dino-model", "tiny-dino"], "scorer model ViT-B-32 (openai): not in the local cache"),
        (["--dino-model", "tiny-dino", "--clip-model", "ViT-Q-1"], "--clip-model ViT-Q-1: not an open_clip model"),
    ],
)
def test_unknown_scorer_model_offline(scored_run, args, fragment):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    one_line_error(invoke("--run", scored_run, *args), fragment, "tiny-")
    assert not (scored_run / "scores.json").exists()


def test_help():
    result = runner.invoke(app, ["score", "--help"])
    assert result.exit_code == 0 and not result.stderr
    assert "--prompts" in result.stdout and "dreambench" in result.stdout


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_score_samples_missing_prompts_first_with_the_real_sampler(tmp_path, model):
    """End to end with sdlora.generate: a run with a real LoRA and no samples gets its prompt sampled
    (LoRA + baseline, same seeds) by the CLI, says so in one line, and is scored."""
    from score_helpers import write_real_lora

    run = write_run(tmp_path, lora=False, model={"name": model})
    write_real_lora(run, model)
    result = invoke("--run", run, "--prompts", "sksToy on a beach", "--num-images", "1", "--steps", "2", *TINY)
    assert result.exit_code == 0, result.output
    assert "no samples for 1 prompt(s): running `sdlora sample` first" in result.stderr
    scores = json.loads((run / "scores.json").read_text())
    [entry] = scores["prompts"]
    assert entry["prompt"] == "sksToy toy on a beach" and entry["prompt_without_token"] == "toy on a beach"
    assert entry["lora"]["images"] == 1 and entry["baseline"]["images"] == 1
    samples = json.loads((run / "samples" / "samples.json").read_text())
    seeds = {e["variant"]: e["seed"] for e in samples["images"]}
    assert seeds["lora"] == seeds["baseline"]


@pytest.fixture
def fake_sampler(monkeypatch):
    """sdlora.generate.generate_samples replaced by PNG writing (the prompts expanded by the real
    `expand_prompt`, see score_helpers); records each call."""
    import sdlora.generate

    calls = []

    def generate_samples(run, prompts, *, out_dir=None, num_images=4, seed=0, baseline=True, **kwargs):
        calls.append({"prompts": list(prompts), "num_images": num_images, "seed": seed, "baseline": baseline, **kwargs})
        out_dir = out_dir or run.path / "samples"
        add_samples(out_dir, prompts, per_variant=num_images, seed0=seed)
        return out_dir / "samples.json"

    monkeypatch.setattr(sdlora.generate, "generate_samples", generate_samples)
    return calls


def test_dreambench_samples_exactly_the_missing_prompts(scored_run, fake_sampler):
    from sdlora.evaluate.paper_prompts import object_prompts

    prompts = object_prompts("sksToy", "toy")
    add_samples(scored_run / "samples", prompts[:2], per_variant=4)  # these two are complete
    result = invoke("--run", scored_run, "--prompts", "dreambench", "--seed", "3", "--steps", "2", *TINY)
    assert result.exit_code == 0, result.output
    assert "no samples for 23 prompt(s): running `sdlora sample` first" in result.stderr
    [call] = fake_sampler
    assert call["prompts"] == prompts[2:] and (call["num_images"], call["seed"], call["steps"]) == (4, 3, 2)
    scores = json.loads((scored_run / "scores.json").read_text())
    assert [e["prompt"] for e in scores["prompts"]] == prompts and scores["prompt_set"] == "dreambench"
    again = invoke("--run", scored_run, "--prompts", "dreambench", *TINY)
    assert again.exit_code == 0 and "running `sdlora sample`" not in again.stderr and len(fake_sampler) == 1


def test_a_fresh_run_samples_its_validation_prompts(tmp_path, fake_sampler):
    run = write_run(tmp_path, validation={"prompts": ["{token} {class} on a sofa"]})
    result = invoke("--run", run, "--num-images", "2", *TINY)
    assert result.exit_code == 0, result.output
    assert fake_sampler[0]["prompts"] == ["sksToy toy on a sofa"]
    scores = json.loads((run / "scores.json").read_text())
    assert scores["prompt_set"] == "validation prompts" and scores["overall"]["lora"]["images"] == 2


def test_no_sample_fails_with_the_command_to_run(scored_run, fake_sampler):
    result = invoke("--run", scored_run, "--prompts", "sksToy in the snow", "--no-sample", *TINY)
    one_line_error(result, "no samples for 1 prompt(s)", "sdlora sample --run", "'sksToy in the snow'")
    assert fake_sampler == [] and not (scored_run / "scores.json").exists()


def test_scores_name_the_lora_files_the_images_were_sampled_with(scored_run):
    path = scored_run / "samples" / "samples.json"
    data = json.loads(path.read_text())
    for entry in data["images"]:
        entry["lora_file"] = "/loras/my_lora.safetensors" if entry["variant"] == "lora" else None
    path.write_text(json.dumps(data))
    result = invoke("--run", scored_run, *TINY)
    assert result.exit_code == 0, result.output
    assert json.loads((scored_run / "scores.json").read_text())["lora_files"] == ["/loras/my_lora.safetensors"]


def test_score_refuses_a_dataset_that_prepare_is_writing(scored_run):
    import socket

    from sdlora.locks import LOCK_FILE

    dataset = scored_run.parent.parent / "dataset"
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "verb": "prepare"}  # a live process: pytest's parent
    (dataset / LOCK_FILE).write_text(json.dumps(holder))
    one_line_error(invoke("--run", scored_run, *TINY), str(dataset), f"`sdlora prepare` (pid {os.getppid()})")
    assert not (scored_run / "scores.json").exists()
    assert [p.name for p in dataset.iterdir() if p.name.startswith(LOCK_FILE)] == [LOCK_FILE]  # no reader left
