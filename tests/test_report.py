"""report.html: sections from whatever the run has, inline SVG plots, embedded images, a real browser."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html import escape
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from run_helpers import random_png, write_config, write_metrics, write_validation_samples
from sdlora import run as run_contract
from sdlora.cli import app
from sdlora.report import Series, line_plot, nice_ticks, render_report, write_report

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
PROMPTS = ["sksToy toy on a beach", "a red sksToy toy"]


def write_samples(run: Path, prompts=PROMPTS, per_variant: int = 2) -> Path:
    """samples/samples.json + PNGs, written through the contract's writer (`sdlora.run.write_samples`)."""
    samples = run / "samples"
    images = []
    for p, prompt in enumerate(prompts):
        folder = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
        for variant, stem in (("lora", "lora"), ("baseline", "base")):
            for i in range(per_variant):
                file = f"{folder}/{stem}-{i:02d}.png"
                random_png(samples / file, seed=p * 100 + (variant == "lora") * 10 + i, size=256)
                images.append(
                    {
                        "file": file,
                        "prompt": prompt,
                        "prompt_as_written": prompt.replace(" toy", "", 1),
                        "seed": 5 + i,
                        "variant": variant,
                        "index": i,
                    }
                )
    data = {
        "model": "tiny-sd",
        "run": str(run),
        "lora_dir": str(run / "lora"),
        "lora_scale": 1.0,
        "steps": 2,
        "guidance": 7.5,
        "scheduler": "EulerDiscreteScheduler",
        "height": 256,
        "width": 256,
        "negative_prompt": None,
        "images": images,
    }
    return run_contract.write_samples(samples / "samples.json", data)


def scores_entry(dino: float, clip_i: float, clip_t: float, images: int = 2) -> dict:
    return {
        "images": images,
        "real_images": 3,
        "dino": dino,
        "clip_i": clip_i,
        "clip_t": clip_t,
        "clip_t_with_token": clip_t + 0.01,
    }


def write_scores(run: Path) -> Path:
    """scores.json through the contract's writer (`sdlora.run.write_scores`), as `sdlora score` writes it."""
    data = {
        "schema_version": 1,
        "created": "2026-01-01T12:00:00+00:00",
        "run": str(run),
        "token": "sksToy",
        "class_word": "toy",
        "prompt_set": "all samples",
        "scale": "cosine similarity reported as is",
        "scorers": {"dino": {"model": "facebook/dino-vits16"}, "clip": {"model": "ViT-B-32", "pretrained": "openai"}},
        "real": {"dataset": "dataset", "split": "val", "count": 3, "files": ["a.png", "b.png", "c.png"]},
        "overall": {
            "lora": {**scores_entry(0.6123, 0.7011, 0.2811, 4), "prompts": 2},
            "baseline": {**scores_entry(0.3456, 0.5522, 0.2907, 4), "prompts": 2},
        },
        "prompts": [
            {
                "prompt": p,
                "prompt_as_written": p,
                "prompt_without_token": p.replace("sksToy ", ""),
                "lora": scores_entry(0.6 + i / 100, 0.7, 0.28),
                "baseline": scores_entry(0.34, 0.55, 0.29),
            }
            for i, p in enumerate(PROMPTS)
        ],
        "embedded": {"dino": 11, "clip": 11},
        "cached": {"dino": 0, "clip": 0},
    }
    return run_contract.write_scores(run / "scores.json", data)


@pytest.fixture
def full_run(tmp_path) -> Path:
    """A run with every part: config, metrics (two parameter groups, CUDA load), validation samples of
    three steps, a LoRA file, LoRA-vs-baseline samples and scores."""
    run = write_config(tmp_path / "runs" / "r1")
    write_metrics(run, steps=30, validate_every=10, groups=("unet", "text_encoder"), cuda=True)
    for step in (10, 20, 30):
        write_validation_samples(run, step, ["a photo of sksToy toy", "sksToy toy in the snow"])
    (run / "lora").mkdir()
    save_file({"w": torch.zeros(512)}, str(run / "lora" / "pytorch_lora_weights.safetensors"))
    write_samples(run)
    write_scores(run)
    return run


def section(html: str, name: str) -> str:
    match = re.search(rf'<section id="{name}" class="(\w+)">(.*?)</section>', html, re.S)
    assert match, f"no section {name}"
    return match.group(1) + ":" + match.group(2)


# ---- content ---------------------------------------------------------------------------------


def test_full_report(full_run):
    path = write_report(full_run)
    assert path == full_run / "report.html"
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    # plots: loss, gradient norms, learning rate, machine load, memory, throughput
    assert html.count('<svg xmlns="http://www.w3.org/2000/svg" class="plot"') == 6
    training = section(html, "training")
    for label in (
        "running mean",
        "validation loss",
        "text_encoder",
        "total",
        "process CPU",
        "system CPU",
        "process RAM (RSS)",
        "CUDA peak",
        "peak CUDA memory",
        "best validation loss",
    ):
        assert label in training, label
    assert "0.1246 at step 30" in training  # best val loss: 0.2 exp(-30/20) + 0.08
    scores = section(html, "scores")
    assert scores.startswith("ok:")
    assert re.search(r"<th>DINO</th><td>0\.612</td><td>0\.346</td><td><span class=\"up\">\+0\.267</span>", scores)
    assert '<th>CLIP-T</th><td>0.281</td><td>0.291</td><td><span class="down">-0.010</span>' in scores
    assert scores.count('<tr class="lora">') == 2 and "3 real val photos" in scores
    samples = section(html, "samples")
    assert samples.count('class="row-label variant-lora"') == 2 and samples.count("variant-baseline") == 2
    assert "(written as “sksToy on a beach”)" in samples
    validation = section(html, "validation")
    assert [int(s) for s in re.findall(r"<th>step (\d+)</th>", validation)] == [10, 20, 30]
    assert validation.count("<img") == 12
    outputs = section(html, "outputs")
    assert outputs.startswith("ok:") and "pytorch_lora_weights.safetensors" in outputs and "damaged" not in outputs
    assert "token: sksToy" in section(html, "config")


def test_token_embedding_norm_is_plotted(tmp_path):
    run = write_config(tmp_path / "runs" / "r1")
    write_metrics(run, steps=20, groups=("unet", "embeddings"))
    training = section(render_report(run), "training")
    assert "Token embedding norm" in training and "embeddings" in training  # its grad-norm group too


def test_bad_metrics_lines_are_named_and_the_rest_plotted(tmp_path):
    run = write_config(tmp_path / "runs" / "r1")
    path = write_metrics(run, steps=20)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]) + b"\xff\xfe\x00\n" + b'{"step": "x"}\n' + b"".join(lines[3:]))
    training = section(render_report(run), "training")
    assert "skipped 2 unreadable lines" in training and "first: line 4" in training
    assert "Loss" in training and "last step 20" in training


def test_report_is_self_contained_with_small_decodable_thumbnails(full_run):
    html = write_report(full_run).read_text()
    sources = re.findall(r'(?:src|href)="([^"#][^"]*)"', html)
    assert sources and all(s.startswith("data:image/") for s in sources)  # nothing fetched, nothing linked
    assert not re.search(r"url\(|@import|<script|<link", html)
    for uri in sources:
        mime, data = re.fullmatch(r"data:(image/\w+);base64,(.+)", uri).groups()
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert max(im.size) <= 192 and im.get_format_mimetype() == mime  # 256 px samples downscaled
    assert len(html) < 600_000


def test_a_run_with_nothing_yet(tmp_path):
    run = write_config(tmp_path / "runs" / "fresh")
    html = write_report(run).read_text()
    for name in ("scores", "samples", "training", "validation", "outputs"):
        assert section(html, name).startswith("missing:<h2>"), name
        assert "Not yet:" in section(html, name)
    assert section(html, "config").startswith("ok:")
    assert "tiny random-weight model" in html
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "Not yet: no config.yaml" in render_report(empty)


def test_broken_parts_are_named_and_the_rest_still_shows(full_run):
    (full_run / "scores.json").write_text("{not json")
    with open(full_run / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "loss": null, "loss_mean": NaN}\n{"step": 32, "loss": 0.1')  # a line being written
    (full_run / "samples" / "step-000020" / "validation.json").unlink()  # older runs: PNGs only
    (full_run / "samples" / "skstoy-toy-on-a-beach" / "lora-00.png").write_bytes(b"not a png")
    html = write_report(full_run).read_text()
    scores = section(html, "scores")
    assert scores.startswith("error:") and "Could not be shown: scores.json:" in scores
    assert section(html, "training").startswith("ok:") and html.count('class="plot"') == 6
    assert section(html, "validation").count("<img") == 12
    assert "unreadable" in section(html, "samples")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_lora_file_is_listed_as_damaged(full_run, damage):
    lora = full_run / "lora" / "pytorch_lora_weights.safetensors"
    kohya = full_run / "lora" / "r1.safetensors"
    shutil.copy(lora, kohya)
    data = lora.read_bytes()
    lora.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 100)
    outputs = section(write_report(full_run).read_text(), "outputs")
    assert outputs.startswith("error:")
    assert f"{escape(str(lora))}: damaged or incomplete file (" in outputs
    rows = re.findall(r"<tr[^>]*><td><code>(.*?)</code></td><td>.*?</td><td>(.*?)</td></tr>", outputs)
    assert rows == [
        ("lora/pytorch_lora_weights.safetensors", "damaged or incomplete file: not usable"),
        ("lora/r1.safetensors", "kohya: ComfyUI, AUTOMATIC1111, Forge (diffusers too)"),
    ]


@pytest.mark.parametrize(
    ("file", "edit", "fragment"),
    [
        ("scores.json", lambda d: d["overall"]["lora"].pop("dino"), "scores.json: overall.lora.dino is missing"),
        ("scores.json", lambda d: d.update(schema_version=2), "scores.json: schema_version is 2, this sdlora reads 1"),
        ("scores.json", lambda d: d["prompts"][1].update(prompt=None), "scores.json: prompts[1].prompt is None"),
        ("samples/samples.json", lambda d: d["images"][2].pop("variant"), "images[2].variant is missing"),
        ("samples/samples.json", lambda d: d["images"][0].update(variant="x"), "images[0].variant is 'x', expected"),
    ],
)
def test_a_file_off_the_contract_names_the_field(full_run, file, edit, fragment):
    """The report reads samples.json and scores.json through `sdlora.run`'s checked readers: a renamed
    or missing field shows as an error naming it, never as a silently empty table."""
    data = json.loads((full_run / file).read_text())
    edit(data)
    (full_run / file).write_text(json.dumps(data))
    html = render_report(full_run)
    broken = section(html, "scores" if file == "scores.json" else "samples")
    assert broken.startswith("error:") and f"Could not be shown: {file}: " in broken and escape(fragment) in broken
    assert section(html, "training").startswith("ok:")


def test_prompts_are_escaped(tmp_path):
    run = write_config(tmp_path / "runs" / "r1")
    write_samples(run, prompts=['<script>alert("x")</script> sksToy toy'], per_variant=1)
    html = write_report(run).read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_only_some_validation_steps_when_there_are_many(tmp_path):
    run = write_config(tmp_path / "runs" / "r1")
    for step in range(10, 210, 10):
        write_validation_samples(run, step, ["p"], num_images=1, size=16)
    validation = section(write_report(run).read_text(), "validation")
    steps = [int(s) for s in re.findall(r"<th>step (\d+)</th>", validation)]
    assert len(steps) == 8 and steps[0] == 10 and steps[-1] == 200 and "Showing 8 of 20" in validation


# ---- plots -----------------------------------------------------------------------------------


def test_nice_ticks():
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3, 47) == [10, 20, 30, 40]
    assert nice_ticks(0, 1e-4) == pytest.approx([0, 2e-5, 4e-5, 6e-5, 8e-5, 1e-4])
    assert nice_ticks(5, 5) == [5]


def test_line_plot_gaps_labels_and_empty():
    svg = line_plot(
        [Series("loss", [1, 2, 3, 4, 5], [1.0, 2.0, None, 4.0, 5.0]), Series("val", [5], [3.0], markers=True)],
        title="Loss",
        ylabel="MSE",
    )
    assert svg.count("<path") == 2  # the None splits the line in two
    assert svg.count("<circle") == 1 and ">loss</text>" in svg and ">val</text>" in svg
    assert re.findall(r'class="plot-tick">([^<]+)<', svg)[:3] == ["1", "2", "3"]
    lone = line_plot([Series("x", [1, 2, 3], [None, 2.0, None])], title="t")
    assert "<path" not in lone and lone.count("<circle") == 1  # a point between gaps is still drawn
    assert "no data yet" in line_plot([Series("x", [], [])], title="t")
    assert "no data yet" in line_plot([Series("x", [1], [float("nan")])], title="t")


# ---- CLI -------------------------------------------------------------------------------------


def test_report_cli(full_run, monkeypatch):
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda url: opened.append(url) or True)
    monkeypatch.chdir(full_run.parent.parent)
    (full_run.parent / "latest").symlink_to("r1")
    result = CliRunner().invoke(app, ["report", "--open"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(full_run / "report.html")
    assert opened == [(full_run / "report.html").as_uri()]


@pytest.mark.parametrize(
    ("where", "fragment"),
    [("runs/nope", "runs/nope: no such run folder"), ("notarun", "not a run folder (no config.yaml)")],
)
def test_report_cli_bad_run(tmp_path, monkeypatch, where, fragment):
    (tmp_path / "notarun").mkdir()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["report", "--run", where])
    assert result.exit_code == 1
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error:") and fragment in line
    assert not (tmp_path / "notarun" / "report.html").exists()


# ---- a real browser --------------------------------------------------------------------------


def chromium(url: str, *args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    return subprocess.run([CHROMIUM, *flags, *args, url], capture_output=True, text=True, timeout=90)


def page_errors(stderr: str) -> list[str]:
    """Console errors, uncaught exceptions and failed loads that chromium logged."""
    return [
        line
        for line in stderr.splitlines()
        if re.search(r"Uncaught|CONSOLE.*(error|Error)|Failed to load resource|net::ERR_", line)
    ]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium)")
def test_report_in_headless_chromium(full_run, tmp_path):
    # the error detector sees errors (a page with a broken script and a missing image)
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="missing.png"><script>notDefined()</script></body></html>')
    assert page_errors(chromium(bad.as_uri(), "--dump-dom", profile=tmp_path / "p0").stderr)

    url = write_report(full_run).as_uri()
    dom = chromium(url, "--dump-dom", profile=tmp_path / "p1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert page_errors(dom.stderr) == []
    assert '<table class="scores overall">' in dom.stdout and "<th>DINO</th>" in dom.stdout
    assert dom.stdout.count('class="plot"') == 6 and dom.stdout.count("<img") >= 20

    shot = tmp_path / "report.png"
    result = chromium(
        url, f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars", profile=tmp_path / "p2"
    )
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    assert page_errors(result.stderr) == []
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        colours = im.convert("RGB").resize((60, 100)).getcolors(6000)
        assert colours is None or len(colours) > 50  # a rendered page, not a blank one
    if os.environ.get("SDLORA_TEST_ARTIFACTS"):
        out = Path(os.environ["SDLORA_TEST_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / "report.png")


def test_the_config_section_shows_train_images_beside_their_masks(tmp_path):
    from conftest import write_tiny_dataset
    from test_masked_loss import add_masks

    plain = write_tiny_dataset(tmp_path / "plain")
    run = write_config(tmp_path / "runs" / "r0", dataset=plain)
    assert "Subject masks" not in section(render_report(run), "config")  # no masks: no strip

    dataset = add_masks(write_tiny_dataset(tmp_path / "dataset"))
    data = {"dataset": str(dataset), "resolution": 64, "masked_loss": True, "unmasked_weight": 0.1}
    run = write_config(tmp_path / "runs" / "r1", data=data)
    config = section(render_report(run), "config")
    assert "Subject masks (white = object) of 6 of the dataset's 6 images" in config
    assert "background 0.10 (--unmasked-weight)" in config
    assert config.count("<img") == 8 and config.count("mask, 50%") == 4  # 4 train images, each with its mask


def with_step_keys(path: Path, keys_of: Any) -> None:
    """Add `keys_of(record)` to every step record of a metrics.jsonl (the lines with a loss)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        if run_contract.Metric.LOSS in r:
            r.update(keys_of(r))
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_loss_plot_shows_the_preservation_loss(tmp_path):
    run = write_config(tmp_path / "runs" / "r1")
    loss = run_contract.Metric.LOSS
    with_step_keys(
        write_metrics(run, steps=10),
        lambda r: {
            run_contract.Metric.LOSS_INSTANCE: r[loss] * 0.9,
            run_contract.Metric.LOSS_PRESERVATION: r[loss] * 0.1,
        },
    )
    training = section(render_report(run), "training")
    assert "preservation loss" in training and "instance loss" in training


def test_the_learning_rate_plot_shows_prodigys_effective_rate(tmp_path):
    run = write_config(tmp_path / "runs" / "r1")
    with_step_keys(write_metrics(run, steps=10), lambda r: {run_contract.Metric.lr_effective("unet"): 3e-4})
    assert "unet (effective)" in section(render_report(run), "training")
