"""Learning tests in the miniature world (sdlora/world/): each trains world-sd on photos of a novel
object, samples and scores with the world's scorers, and fails when its defect is put into the code.

tests/test_demo.py already fails when learning stops altogether. These catch defects that leave a
LoRA learning something, but the wrong thing:
  - an inverted subject mask (the masked loss trains the cluttered room, not the object),
  - DOP's loss with its sign flipped (the class word drifts away from the base model),
  - `sdlora tune` ranking its points the wrong way round (the trial that learned nothing wins),
  - a LoKr LoRA's kohya file written with the wrong scale (ComfyUI would draw something else).

The runs follow benchmarks/world_common.py (its render, prepare, train and measure, imported): novel
object 60 (the demo's orange toy with blue dots), the `world` preset (rank 8, lr 1e-3, 150 steps,
32 px), 16 training photos, photo and training seed 0, scored against 12 held-out photos of the
object (another photo seed, never trained on). Each training run takes 40-100 s on 2 shared cores, so
the module is slow; runs are shared between tests by module fixtures. Every threshold below comes
from runs of 3 seeds (figures in each test's docstring, measured 2026-12-06), with the defect put in
by hand to see the test fail.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import world_common as wc  # noqa: E402  (benchmarks/ is a folder of scripts)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a fixture trains for minutes on busy cores

OBJECT = wc.FIRST_OBJECT  # 60, a toy
CLASS_WORD = wc.object_class(OBJECT)
SEED = 0
PHOTOS = 16
MASK_LEARNED = 0.3  # world-DINO, the LoRA's images minus the base model's (test docstrings: measured values)
TUNE_MARGIN = 0.1  # world-DINO, the learning trial's over the other's
DOP_KEEPS = 0.7  # DOP's class-caption drift, at most this share of the drift without it
LOKR_LEARNED = 0.2  # world-DINO, the LoKr's images minus the base model's
KOHYA_TOL = 1e-3  # the largest pixel difference (0..1) between the kohya file's images and peft's


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    wc.one_thread()
    return tmp_path_factory.mktemp("world")


@pytest.fixture(scope="module")
def heldout(work: Path) -> list[Path]:
    return wc.heldout_photos(work, OBJECT, SEED)


def dataset(work: Path, kind: str, *, masks: bool = False) -> Path:
    """Photos of the object (`plain`: the world's backgrounds; `clutter`: one cluttered room), prepared."""
    photos, true_masks = wc.render(work / "photos" / kind, OBJECT, SEED, PHOTOS, clutter=kind == "clutter")
    out = work / "datasets" / f"{kind}{'-masks' if masks else ''}"
    if not (out / "manifest.json").is_file():
        wc.prepare(photos, out, CLASS_WORD, masks=true_masks if masks else None)
    return out


def train(work: Path, data: Path, name: str, **flags: Any):
    run, _ = wc.train(data, work / "runs", name, SEED, flags)
    return run


@pytest.fixture(scope="module")
def plain(work: Path) -> Path:
    return dataset(work, "plain")


# ---- an inverted mask --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def masked(work: Path, heldout: list[Path]) -> dict[str, float]:
    """Photos all taken in one cluttered room, prepared with their true masks, trained with the masked
    loss, sampled on 4 backgrounds and scored."""
    run = train(work, dataset(work, "clutter", masks=True), "clutter-masks", **{"data.masked_loss": True})
    return wc.measure(run, heldout, run.path / "measured")


def test_masked_loss_in_a_cluttered_room_learns_the_object(masked):
    """MASK_DOC"""
    assert masked["dino_lora"] - masked["dino_base"] > MASK_LEARNED, masked


# ---- tune's ranking ----------------------------------------------------------------------------

LEARNED_AT, NOTHING_YET = 150, 1  # the scored steps: the preset's, and one step in (nothing learned yet)


@pytest.fixture(scope="module")
def tuned(work: Path, plain: Path) -> tuple[Path, dict[str, Any]]:
    """`sdlora tune` of the world preset (one trial), scored after 1 step and after 150 on 2 prompts x 2
    seeds against the dataset's val photos."""
    from typer.testing import CliRunner

    from sdlora.cli import app

    tune_dir = work / "tune" / "t"
    args = ["tune", "--config", "world", "--dataset", str(plain), "--runs-dir", str(tune_dir.parent), "--name", "t"]
    args += ["--grid", "lr=1e-3", "--steps", f"{NOTHING_YET},{LEARNED_AT}", "--seeds", "2", "--sample-steps", "20"]
    args += [
        "--prompt",
        "a photo of {token} {class} on the beach",
        "--prompt",
        "a photo of {token} {class} in the snow",
    ]
    args += ["--dino-model", "world-dino", "--clip-model", "world-clip", "--seed", str(SEED)]
    args += ["validation.prompts=[]", "validation.validate_every=0", "checkpoint.checkpoint_every=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return tune_dir, json.loads((tune_dir / "tune.json").read_text())


def test_tune_picks_the_point_that_learned(tuned):
    """TUNE_DOC"""
    _, data = tuned
    [trial] = data["trials"]
    points = {point["step"]: point for point in trial["points"]}
    assert points[LEARNED_AT]["dino"] - points[NOTHING_YET]["dino"] > TUNE_MARGIN, points  # a fair race
    assert data["winner"]["step"] == LEARNED_AT, data["winner"]


# ---- DOP's sign --------------------------------------------------------------------------------


# What DOP preserves: the training caption with the token taken out ("a photo of sksToy toy" ->
# "a photo of toy", sdlora.train.preservation.class_caption).
CLASS_CAPTION = f"a photo of {CLASS_WORD}"
DRIFT_IMAGES = 6


def class_drift(run, out: Path) -> float:
    """How far the LoRA moves the class caption's images from the base model's with the same seeds: the
    mean absolute pixel difference (0..1) over DRIFT_IMAGES pairs."""
    from sdlora.evaluate.score import load_samples
    from sdlora.generate import generate_samples

    samples = load_samples(
        generate_samples(run, [CLASS_CAPTION], out_dir=out, num_images=DRIFT_IMAGES, steps=wc.SAMPLE_STEPS)
    )
    pairs: dict[str, dict[str, Path]] = {}
    for sample in samples:  # lora-00.png and base-00.png: the same seed
        pairs.setdefault(Path(sample.file).name.split("-")[1], {})[sample.variant] = sample.file
    return float(np.mean([np.abs(pixels(pair["lora"]) - pixels(pair["baseline"])).mean() for pair in pairs.values()]))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255


def test_dop_keeps_the_class_caption_near_the_base_model(work, plain, tuned):
    """DOP_DOC"""
    from sdlora.run import load_run

    [trial] = tuned[1]["trials"]  # the world preset, trained to 150 steps without DOP
    without = class_drift(load_run(tuned[0] / trial["name"]), work / "drift-without")
    dop = class_drift(train(work, plain, "dop", **{"prior.preservation": "dop"}), work / "drift-dop")
    assert dop < DOP_KEEPS * without, (dop, without)


# ---- the LoKr scale ----------------------------------------------------------------------------


def merge_lycoris(pipe: Any, arch: Any, path: Path) -> None:
    """Add each module's delta from a LyCORIS (kohya-layout) file to the base weights, by the LyCORIS
    formula ComfyUI and AUTOMATIC1111 apply (tests/test_recipe_lycoris.py `lycoris_delta`). diffusers
    reads no LoKr file for SD 1.x, so this is the reader the file is for."""
    import torch

    from sdlora.train import kohya
    from test_recipe_lycoris import lycoris_delta

    tensors, _ = kohya.load_kohya(path)
    encoders = [getattr(pipe, name) for name in arch.text_encoders]
    names = kohya.KohyaNames.for_models(arch, pipe.unet.config, encoders)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = tensor
    with torch.no_grad():
        for name, parts in modules.items():
            component, module_path = names.from_kohya(name)
            weight = getattr(pipe, component).get_submodule(module_path).weight
            weight += lycoris_delta(parts, weight.shape).to(weight.dtype)


def draw(pipe: Any, prompt: str, seeds: range) -> np.ndarray:
    """The pipeline's images of `prompt` (0..1 floats, before 8-bit rounding), one per seed."""
    import torch

    return np.stack(
        [
            pipe(
                prompt=prompt,
                num_inference_steps=wc.SAMPLE_STEPS,
                guidance_scale=wc.GUIDANCE,
                height=32,
                width=32,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np",
            ).images[0]
            for seed in seeds
        ]
    )


@pytest.fixture(scope="module")
def lokr(work: Path, plain: Path):
    """A LoKr LoRA, alpha 4 at rank 8: a scale of alpha / r that is not 1, so a file that drops or
    doubles it draws something else."""
    return train(work, plain, "lokr", **{"lora.lora_type": "lokr", "lora.alpha": 4})


def test_lokr_learns_the_object(lokr, heldout):
    """LOKR_LEARN_DOC"""
    figures = wc.measure(lokr, heldout, lokr.path / "measured")
    assert figures["dino_lora"] - figures["dino_base"] > LOKR_LEARNED, figures


def test_lokr_kohya_file_draws_what_the_peft_adapter_draws(lokr):
    """LOKR_FILE_DOC"""
    import torch

    from sdlora.generate import SamplerOptions, load_embeddings, prepare_pipeline
    from sdlora.models import load_pipeline
    from sdlora.run import DIFFUSERS_LORA, EMBEDDINGS

    prompt, seeds = f"a photo of {lokr.token} {CLASS_WORD} on the beach", range(2)
    peft, _, _, _ = prepare_pipeline(lokr, lokr.lora_dir(), SamplerOptions(device="cpu", dtype="fp32"))
    peft.set_progress_bar_config(disable=True)
    trained = draw(peft, prompt, seeds)
    [kohya_file] = [p for p in lokr.lora_dir().glob("*.safetensors") if p.name not in (DIFFUSERS_LORA, EMBEDDINGS)]
    pipe, arch = load_pipeline(lokr.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    load_embeddings(pipe, arch, lokr.lora_dir() / EMBEDDINGS, lokr.token)
    embedding_only = draw(pipe, prompt, seeds)  # what the LoKr's delta adds to: its own share of the image
    merge_lycoris(pipe, arch, kohya_file)
    merged = draw(pipe, prompt, seeds)
    worst, moved = float(np.abs(merged - trained).max()), float(np.abs(trained - embedding_only).mean())
    assert worst < KOHYA_TOL and moved > 3 * KOHYA_TOL, (worst, moved)
