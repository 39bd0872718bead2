"""sdlora.generate: prompts, LoRA vs baseline sampling on tiny models, samples.json, PNG metadata, grids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from run_helpers import make_run, save_embedding
from sdlora import __version__
from sdlora.errors import ConfigError, RunError
from sdlora.generate import (
    SCHEDULERS,
    check_prompts,
    expand_prompt,
    generate_samples,
    make_scheduler,
    read_prompts_file,
    slug,
)
from sdlora.run import DIFFUSERS_LORA, load_run

STEPS = 2


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


# Two renders of the same model, prompt and seed agree only up to float rounding: batch size and thread
# count change the order of sums (measured: under 0.001 of a level), and the 8-bit PNG rounding then
# adds up to 0.5, so one pixel can be a level off. 1 level (of 255) allows both with a wide margin;
# the LoRA moves pixels by more than that on average (the `mean() > 1.0` checks), so "equal up to
# RENDER_TOL" still tells the base model from the LoRA.
RENDER_TOL = 1.0


def assert_same_render(png: np.ndarray, render: np.ndarray) -> None:
    """`png` (0..255) is `render` (float, 0..255) up to RENDER_TOL levels in every pixel."""
    assert png.shape == render.shape
    worst = float(np.abs(png - render).max())
    assert worst <= RENDER_TOL, f"largest difference {worst:.2f} levels (tolerance {RENDER_TOL})"


def base_image(model: str, prompt: str, seed: int) -> np.ndarray:
    """What the base model alone makes for this prompt and seed, before 8-bit rounding (0..255 floats):
    the baseline must equal it."""
    from sdlora.models import load_pipeline

    pipe, _ = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        prompt=[prompt],
        num_inference_steps=STEPS,
        height=64,
        width=64,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(seed)],
        output_type="np",
    ).images[0]
    return image.astype(np.float64) * 255


# ---- prompts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("sksToy on a beach", "sksToy toy on a beach"),
        ("a sksToy toy on a beach", "a sksToy toy on a beach"),
        ("a photo of sksToy", "a photo of sksToy toy"),
        ("sksToy, in the snow", "sksToy toy, in the snow"),
        ("sksToy toys on a shelf", "sksToy toy toys on a shelf"),  # "toys" is not the class word
        ("a red toy", "a red toy"),
        ("  sksToy   on  a beach ", "sksToy toy on a beach"),
        ("sksToyBox on a beach", "sksToyBox on a beach"),  # another word that starts with the token
    ],
)
def test_expand_prompt(written, expected):
    assert expand_prompt(written, "sksToy", "toy") == expected


def test_read_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# my prompts\nsksToy on a beach\n\n  a red sksToy toy  \n   # indented comment\n", encoding="utf-8"
    )
    assert read_prompts_file(path) == ["sksToy on a beach", "a red sksToy toy"]
    with pytest.raises(ConfigError, match="--prompts-file .*missing.txt: no such file"):
        read_prompts_file(tmp_path / "missing.txt")


def test_check_prompts():
    assert check_prompts([" a ", "b", "a"]) == ["a", "b"]
    with pytest.raises(ConfigError, match="no prompts given"):
        check_prompts([])
    with pytest.raises(ConfigError, match="prompt 2 is empty"):
        check_prompts(["sksToy on a beach", "   "])


def test_slug():
    assert slug("sksToy toy on a beach!") == "skstoy-toy-on-a-beach"
    assert slug("日本") != "" and slug("日本") != slug("中国")
    long = slug("a " * 80)
    assert len(long) <= 60 and long != slug("a " * 81)


def test_every_scheduler_builds_from_the_model_config():
    from sdlora.models.tiny import _scheduler

    base = _scheduler()
    for name, (cls_name, _) in SCHEDULERS.items():
        scheduler = make_scheduler(name, base)
        assert type(scheduler).__name__ == cls_name
        assert scheduler.config.beta_schedule == "scaled_linear"  # the model's noise schedule is kept
    assert make_scheduler("DPMPP", base).config.algorithm_type == "dpmsolver++"
    with pytest.raises(ConfigError, match="--scheduler warp: unknown scheduler; choose one of euler, euler_a"):
        make_scheduler("warp", base)


# ---- sampling --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """One tiny-sd run sampled once (2 prompts x 2 images, batch 2, LoRA + baseline); tests read it.
    Its LoRA folder also holds a token embedding (SD 1.x format), which the baseline must not use."""
    root = tmp_path_factory.mktemp("gen")
    run = make_run(root)
    save_embedding(run / "lora", "tiny-sd")
    calls = []
    path = generate_samples(
        load_run(run),
        ["sksToy on a beach", "a red sksToy toy"],
        num_images=2,
        seed=7,
        steps=STEPS,
        batch_size=2,
        on_progress=lambda *a: calls.append(a),
    )
    return run, path, calls


def test_samples_json_lists_lora_and_baseline_with_the_same_seeds(sampled):
    run, path, _ = sampled
    assert path == run / "samples" / "samples.json"
    data = json.loads(path.read_text())
    assert {
        k: data[k]
        for k in ("model", "lora_scale", "steps", "guidance", "scheduler", "height", "width", "negative_prompt")
    } == {
        "model": "tiny-sd",
        "lora_scale": 1.0,
        "steps": STEPS,
        "guidance": 7.5,
        "scheduler": "EulerDiscreteScheduler",
        "height": 64,
        "width": 64,
        "negative_prompt": None,
    }
    assert Path(data["lora_dir"]) == run / "lora" and Path(data["run"]) == run
    images = data["images"]
    assert len(images) == 8
    beach = [e for e in images if e["prompt_as_written"] == "sksToy on a beach"]
    assert {e["prompt"] for e in beach} == {"sksToy toy on a beach"}
    assert sorted((e["variant"], e["index"], e["seed"], e["file"]) for e in beach) == [
        ("baseline", 0, 7, "skstoy-toy-on-a-beach/base-07.png"),
        ("baseline", 1, 8, "skstoy-toy-on-a-beach/base-08.png"),
        ("lora", 0, 7, "skstoy-toy-on-a-beach/lora-07.png"),
        ("lora", 1, 8, "skstoy-toy-on-a-beach/lora-08.png"),
    ]
    for entry in images:
        assert (path.parent / entry["file"]).is_file()


def test_baseline_is_exactly_the_base_model_and_lora_changes_the_image(sampled):
    run, path, _ = sampled
    folder = path.parent / "skstoy-toy-on-a-beach"
    # image 1 was made in a batch of 2: its own seeded generator makes it batch-independent
    assert_same_render(pixels(folder / "base-08.png"), base_image("tiny-sd", "sksToy toy on a beach", 8))
    assert np.abs(pixels(folder / "lora-08.png") - pixels(folder / "base-08.png")).mean() > 1.0
    assert np.abs(pixels(folder / "lora-07.png") - pixels(folder / "lora-08.png")).mean() > 1.0  # seeds differ


def test_png_metadata_records_what_made_the_image(sampled):
    run, path, _ = sampled
    with Image.open(path.parent / "skstoy-toy-on-a-beach" / "lora-08.png") as im:
        meta = dict(im.text)
    assert meta["prompt"] == "sksToy toy on a beach"
    assert meta["seed"] == "8" and meta["model"] == "tiny-sd" and meta["variant"] == "lora"
    assert meta["lora"].endswith(
        "lora/pytorch_lora_weights.safetensors, " + str(run / "lora" / "embeddings.safetensors")
    )
    assert meta["lora_scale"] == "1.0" and meta["steps"] == str(STEPS) and meta["guidance"] == "7.5"
    assert meta["sdlora_version"] == __version__
    with Image.open(path.parent / "skstoy-toy-on-a-beach" / "base-08.png") as im:
        assert im.text["lora"].startswith("none") and im.text["lora_scale"] == "0.0"


def test_grid_has_a_lora_row_above_a_baseline_row(sampled):
    run, path, _ = sampled
    folder = path.parent / "skstoy-toy-on-a-beach"
    with Image.open(folder / "grid.png") as im:
        grid = np.asarray(im.convert("RGB"), dtype=np.int16)

    # the 64 px images are shown at 128 px: find each one (nearest-neighbour upscaled) in the grid
    def find(file: str) -> tuple[int, int]:
        cell = np.asarray(
            Image.open(folder / file).convert("RGB").resize((128, 128), Image.Resampling.NEAREST), dtype=np.int16
        )
        for y in range(grid.shape[0] - 127):
            for x in range(0, grid.shape[1] - 127, 2):
                if np.array_equal(grid[y, x : x + 128], cell[0]) and np.array_equal(
                    grid[y : y + 128, x : x + 128], cell
                ):
                    return y, x
        raise AssertionError(f"{file} not in grid.png")

    (y_lora, x0), (y_base, x0b), (_, x1) = find("lora-07.png"), find("base-07.png"), find("lora-08.png")
    assert y_lora < y_base and x0 == x0b < x1


def test_progress_is_reported_per_image(sampled):
    _, _, calls = sampled
    assert calls[0] == ("sampling images", 0, 8)
    assert [c[1] for c in calls[1:]] == list(range(1, 9)) and calls[-1] == ("sampling images", 8, 8)


def test_more_prompts_merge_and_a_new_seed_adds_images(sampled):
    run, path, _ = sampled
    info = load_run(run)
    generate_samples(
        info, ["sksToy in the snow"], num_images=1, steps=1, baseline=False, scheduler="euler_a", lora_scale=0.5
    )
    data = json.loads(path.read_text())
    assert len(data["images"]) == 9 and data["scheduler"] == "EulerAncestralDiscreteScheduler"
    snow = [e for e in data["images"] if e["prompt"] == "sksToy toy in the snow"]
    assert [(e["variant"], e["lora_scale"], e["scheduler"]) for e in snow] == [
        ("lora", 0.5, "EulerAncestralDiscreteScheduler")
    ]
    # the beach prompt again with another seed: new files beside the seed 7 and 8 ones, nothing replaced
    folder = path.parent / "skstoy-toy-on-a-beach"
    before = {name: (folder / name).read_bytes() for name in ("lora-07.png", "lora-08.png", "base-07.png")}
    generate_samples(info, ["sksToy toy on a beach"], num_images=1, seed=3, steps=1)
    data = json.loads(path.read_text())
    beach = sorted(
        (e["variant"], e["seed"], e["file"]) for e in data["images"] if e["prompt"] == "sksToy toy on a beach"
    )
    assert [(v, seed) for v, seed, _ in beach] == [
        ("baseline", 3),
        ("baseline", 7),
        ("baseline", 8),
        ("lora", 3),
        ("lora", 7),
        ("lora", 8),
    ]
    assert all((path.parent / file).is_file() for _, _, file in beach)
    assert {name: (folder / name).read_bytes() for name in before} == before
    # the same seed again replaces that image and its entry only
    generate_samples(info, ["sksToy toy on a beach"], num_images=1, seed=7, steps=2, baseline=False)
    data = json.loads(path.read_text())
    lora = sorted(
        (e["seed"], e["steps"])
        for e in data["images"]
        if e["prompt"] == "sksToy toy on a beach" and e["variant"] == "lora"
    )
    assert lora == [(3, 1), (7, 2), (8, STEPS)]
    assert (folder / "base-07.png").read_bytes() == before["base-07.png"]
    assert len([e for e in data["images"] if e["prompt"] == "a red sksToy toy"]) == 4  # untouched


def test_lora_scale_zero_is_the_base_model(tmp_path):
    run = make_run(tmp_path)
    path = generate_samples(load_run(run), ["sksToy"], num_images=1, steps=STEPS, lora_scale=0.0, seed=2)
    folder = path.parent / "skstoy-toy"
    assert_same_render(pixels(folder / "lora-02.png"), pixels(folder / "base-02.png"))


def test_without_the_embedding_is_the_lora_file_alone(sampled, tmp_path):
    """embedding=False (`sample --no-embedding`): the LoRA as if no token embedding lay beside it, the
    same images as the LoRA file copied alone into a folder, and not those with the embedding."""
    run, _, _ = sampled
    info = load_run(run)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(run / "lora" / DIFFUSERS_LORA, alone / DIFFUSERS_LORA)

    def image(name: str, **kwargs) -> Path:
        out = generate_samples(
            info, ["sksToy"], num_images=1, steps=STEPS, baseline=False, seed=3, out_dir=tmp_path / name, **kwargs
        )
        return out.parent / "skstoy-toy" / "lora-03.png"

    without, copied, trained = image("without", embedding=False), image("copied", lora_dir=alone), image("with")
    assert_same_render(pixels(without), pixels(copied).astype(np.float64))
    assert np.abs(pixels(without) - pixels(trained)).mean() > 1.0  # the embedding changes the token's images
    with Image.open(without) as im:
        assert "embeddings.safetensors" not in im.text["lora"]


def test_best_lora_and_a_lora_folder(tmp_path):
    run = make_run(tmp_path, best=True)
    info = load_run(run)
    out = generate_samples(
        info, ["sksToy"], num_images=1, steps=STEPS, baseline=False, lora_dir="best", out_dir=tmp_path / "best-samples"
    )
    assert Path(json.loads(out.read_text())["lora_dir"]) == run / "best"
    out2 = generate_samples(
        info,
        ["sksToy"],
        num_images=1,
        steps=STEPS,
        baseline=False,
        lora_dir=run / "lora",
        out_dir=tmp_path / "lora-samples",
    )
    a, b = (pixels(o.parent / "skstoy-toy" / "lora-00.png") for o in (out, out2))
    assert np.abs(a - b).mean() > 1.0  # two different LoRAs
    with pytest.raises(RunError, match="--lora .*nowhere: no such folder or .safetensors file"):
        generate_samples(info, ["sksToy"], lora_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="--lora .*empty: no pytorch_lora_weights.safetensors there"):
        generate_samples(info, ["sksToy"], lora_dir=tmp_path / "empty")


def test_bad_input_fails_before_loading_the_model(tmp_path, monkeypatch):
    import sdlora.models

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded for bad input")

    run = make_run(tmp_path)
    no_lora = make_run(tmp_path, name="r2", lora=False)
    info = load_run(run)
    monkeypatch.setattr(sdlora.models, "load_pipeline", no_load)
    with pytest.raises(ConfigError, match="--scheduler nope"):
        generate_samples(info, ["sksToy"], scheduler="nope")
    with pytest.raises(ConfigError, match="--height 60: must be a positive multiple of 8"):
        generate_samples(info, ["sksToy"], height=60)
    with pytest.raises(ConfigError, match="prompt 1 is empty"):
        generate_samples(info, [""])
    (run / "samples").mkdir()
    (run / "samples" / "samples.json").write_text("{broken")
    with pytest.raises(RunError, match="samples.json: not a samples.json written by `sdlora sample`"):
        generate_samples(info, ["sksToy"])
    assert (run / "samples" / "samples.json").read_text() == "{broken"  # never overwritten
    with pytest.raises(RunError, match="no LoRA in lora/"):
        generate_samples(load_run(no_lora), ["sksToy"])


def test_sdxl_with_a_token_embedding(tmp_path):
    """tiny-sdxl end to end, with a textual-inversion embedding beside the LoRA (clip_l + clip_g):
    the LoRA row uses it, the baseline is the base model alone (without the learned token)."""
    run = make_run(tmp_path, model="tiny-sdxl")
    save_embedding(run / "lora", "tiny-sdxl")
    path = generate_samples(load_run(run), ["sksToy"], num_images=1, steps=STEPS, seed=4)
    folder = path.parent / "skstoy-toy"
    with Image.open(folder / "lora-04.png") as im:
        assert "embeddings.safetensors" in im.text["lora"]
    assert_same_render(pixels(folder / "base-04.png"), base_image("tiny-sdxl", "sksToy toy", 4))
    assert np.abs(pixels(folder / "lora-04.png") - pixels(folder / "base-04.png")).mean() > 1.0


def test_python_api_example(tmp_path, capsys):
    """examples/python_api.py runs as documented on a tiny run (sample, score with tiny scorers, report)."""
    import runpy

    from conftest import write_tiny_dataset

    dataset = write_tiny_dataset(tmp_path / "dataset", n=5)
    run = make_run(tmp_path, dataset=dataset)
    script = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"
    runpy.run_path(str(script), run_name="not_main")["main"](str(run))
    out = capsys.readouterr().out
    assert "samples:" in out and "DINO" in out and f"report: {run / 'report.html'}" in out
    assert (run / "scores.json").is_file()
    html = (run / "report.html").read_text()
    assert '<table class="scores overall">' in html and "sksToy toy on a beach" in html


def test_memory_options_and_bf16(tmp_path):
    """Attention slicing and VAE tiling leave the image as it is; bf16 runs (close to fp32);
    CPU offload and a missing GPU are refused before the model loads."""
    run = make_run(tmp_path)
    info = load_run(run)

    def lora_image(name: str, **kwargs) -> np.ndarray:
        out = generate_samples(
            info, ["sksToy"], num_images=1, steps=STEPS, baseline=False, out_dir=tmp_path / name, **kwargs
        )
        return pixels(out.parent / "skstoy-toy" / "lora-00.png")

    plain = lora_image("plain")
    # sliced attention sums in another order than SDPA: the same image up to rounding
    assert np.abs(lora_image("sliced", attention_slicing=True, vae_tiling=True) - plain).max() <= 2
    assert np.abs(lora_image("bf16", dtype="bf16") - plain).mean() < 4.0
    with pytest.raises(ConfigError, match="--cpu-offload needs a GPU"):
        generate_samples(info, ["sksToy"], cpu_offload=True, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda: no CUDA GPU is available here"):
            generate_samples(info, ["sksToy"], device="cuda")
    with pytest.raises(ConfigError, match="--device gpu0: not a device"):
        generate_samples(info, ["sksToy"], device="gpu0")


def test_a_prompt_past_the_clip_window_is_warned_once_naming_whether_the_token_is_cut(tmp_path):
    run = make_run(tmp_path)
    filler = " ".join(["red"] * 80)
    warnings_seen: list[str] = []
    generate_samples(
        load_run(run),
        [f"{filler} sksToy", f"sksToy {filler}", "sksToy on a beach"],
        num_images=1,
        steps=1,
        baseline=False,
        on_warning=warnings_seen.append,
    )
    assert len(warnings_seen) == 2, warnings_seen
    cut, kept = warnings_seen
    assert cut.startswith(f"prompt '{filler} sksToy toy' is ") and "only the first 75 are used" in cut
    assert "the token sksToy is cut off" in cut
    assert f"prompt 'sksToy toy {filler}'" in kept and "sksToy is kept" in kept
