"""Aspect-ratio buckets in `sdlora train`: uniform batches, per-size latent cache, SDXL's real sizes.

A keep-aspect dataset at resolution 256 has three buckets: 4:3 photos train at 320x192, 3:4 at
192x320, square ones at 256x256. The tiny models' VAE downsamples only 2x, which makes latents of
that size slow on a CPU; these runs use the tiny models with a VAE that downsamples 8x, as real ones do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import LANDSCAPE, PORTRAIT, SQUARE, write_aspect_dataset
from sdlora.run import read_metrics
from sdlora.train import loop
from sdlora.train.data import BatchPlan, Conditioning, Example, LatentSet, time_ids_for, validation_batches
from sdlora.train.objective import NoisePrediction
from test_train import Events, steps_of, tiny_cfg

TRAIN = [LANDSCAPE] * 3 + [PORTRAIT] * 2 + [SQUARE] * 2
VAL = [LANDSCAPE, SQUARE]
# SDXL time ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w) of each shape at 256.
TIME_IDS = {
    LANDSCAPE: [3024, 4032, 24, 0, 192, 320],
    PORTRAIT: [4032, 3024, 0, 24, 320, 192],
    SQUARE: [3000, 3000, 0, 0, 256, 256],
}
BUCKET_FLAGS = {"data.resolution": 256, "train.batch_size": 2, "train.max_steps": 4}  # 4 steps = one epoch
WIDE, TALL, SQ = (4, 24, 40), (4, 40, 24), (4, 32, 32)  # the buckets' latents (channels, h, w)


@pytest.fixture(scope="module")
def models_8x(tmp_path_factory) -> dict[str, str]:
    """tiny-sd and tiny-sdxl with a tiny random VAE of four 2x downsampling blocks, as model folders."""
    from diffusers import AutoencoderKL

    from sdlora.models import load_pipeline

    folders = {}
    for name in ("tiny-sd", "tiny-sdxl"):
        pipe, _ = load_pipeline(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pipe.vae = AutoencoderKL(
                block_out_channels=[32] * 4,
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4,
                latent_channels=4,
                scaling_factor=pipe.vae.config.scaling_factor,
            )
        folders[name] = str(tmp_path_factory.mktemp(f"{name}-8x"))
        pipe.save_pretrained(folders[name])
    return folders


@pytest.fixture
def aspect_dataset(tmp_path: Path) -> Path:
    return write_aspect_dataset(tmp_path / "dataset", TRAIN + VAL, n_val=len(VAL))


def bucket_cfg(tmp_path: Path, dataset: Path, models: dict[str, str], flags: dict | None = None, model="tiny-sd"):
    return tiny_cfg(tmp_path, dataset, {**BUCKET_FLAGS, "model.name": models[model], **(flags or {})})


# ----------------------------------------------------------------------------- the batch plan

SIZES = [(192, 320)] * 3 + [(320, 192)] * 2 + [(256, 256)] * 2  # (height, width) of TRAIN's buckets


def fake_set(sizes: list[tuple[int, int]]) -> LatentSet:
    """Latents filled with their image's number (1-based; mirror images negated), so a batch names its images."""
    latents = [torch.full((4, h // 2, w // 2), float(i + 1)) for i, (h, w) in enumerate(sizes)]
    ids = torch.tensor([[h, w, 0, 0, h, w] for h, w in sizes], dtype=torch.float32)
    return LatentSet(
        latents=latents,
        flipped=[-x for x in latents],
        time_ids=ids,
        time_ids_flipped=ids.clone(),
        cond=Conditioning(embeds=torch.zeros(len(sizes), 77, 8)),
    )


def make_plan(
    data: LatentSet, batch_size: int = 2, num_processes: int = 1, process_index: int = 0, accumulation: int = 1
) -> BatchPlan:
    from diffusers import DDPMScheduler

    return BatchPlan(
        data,
        None,
        seed=3,
        batch_size=batch_size,
        num_processes=num_processes,
        process_index=process_index,
        gradient_accumulation=accumulation,
        noise_offset=0.05,
        objective=NoisePrediction(DDPMScheduler()),
    )


def images_of(batch) -> list[int]:
    return [int(v) - 1 for v in batch.latents[:, 0, 0, 0].abs()]


def test_every_batch_has_one_size_and_every_image_comes_once_an_epoch():
    plan = make_plan(fake_set(SIZES))
    assert plan.batches_per_epoch == 4  # 3 + 2 + 2 images in batches of 2, each bucket's last batch wrapped
    bucket_orders = set()
    for epoch in range(6):
        seen, order = set(), []
        for step in range(epoch * 4, epoch * 4 + 4):
            batch = plan.batch(step, 0)
            images = images_of(batch)
            assert len(images) == 2 and len({SIZES[i] for i in images}) == 1, images
            assert tuple(batch.latents.shape[-2:]) == tuple(s // 2 for s in SIZES[images[0]])
            seen.update(images)
            order.append(SIZES[images[0]])
        assert seen == set(range(len(SIZES)))
        assert plan.epoch((epoch + 1) * 4) == epoch + 1
        bucket_orders.add(tuple(order))
    assert len(bucket_orders) > 1  # the buckets' batches are shuffled together, differently each epoch

    again = make_plan(fake_set(SIZES)).batch(9, 0)  # a fresh plan (a resumed run) draws the same batch
    first = plan.batch(9, 0)
    for name in ("latents", "noise", "timesteps", "time_ids"):
        assert torch.equal(getattr(again, name), getattr(first, name)), name


def test_two_processes_and_accumulation_see_the_batches_of_one_process():
    data = fake_set(SIZES)
    single = make_plan(data, batch_size=2)
    shards = [make_plan(data, batch_size=1, num_processes=2, process_index=p) for p in (0, 1)]
    accumulating = make_plan(data, batch_size=2, accumulation=2)
    for g in range(12):
        want = single.batch(g, 0)
        parts = [shard.batch(g, 0) for shard in shards]
        micro = accumulating.batch(g // 2, g % 2)
        for name in ("latents", "noise", "timesteps", "time_ids"):
            assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(want, name)), (g, name)
            assert torch.equal(getattr(micro, name), getattr(want, name)), (g, name)
    assert accumulating.epoch(2) == single.epoch(4) == 1.0


def test_validation_batches_group_images_of_one_size():
    from diffusers import DDPMScheduler

    data = fake_set([(192, 320), (256, 256), (192, 320), (256, 256), (256, 256)])
    kwargs = dict(seed=0, timesteps=NoisePrediction(DDPMScheduler()).validation_timesteps(2), batch_size=4)
    batches = list(validation_batches(data, **kwargs))
    counts: dict[int, int] = {}
    for batch in batches:
        images = images_of(batch)
        assert len({tuple(data.latents[i].shape) for i in images}) == 1
        for i in images:
            counts[i] = counts.get(i, 0) + 1
    assert counts == {i: 2 for i in range(5)}  # each image at each of the 2 timesteps
    again = list(validation_batches(data, **kwargs))
    assert all(torch.equal(a.noise, b.noise) for a, b in zip(batches, again))  # comparable across validations


def test_mirrored_crop_for_random_flip():
    # 133x100 at 64x64: resized to 85x64, crop starts at left 10; the mirror image's crop at 85 - 64 - 10 = 11.
    example = Example(path=Path("x.png"), caption="", original_size=(100, 133), crop_top_left=(0, 10), size=(64, 64))
    plain, mirrored = time_ids_for([example])
    assert plain.tolist() == [[100, 133, 0, 10, 64, 64]] and mirrored.tolist() == [[100, 133, 0, 11, 64, 64]]


# ----------------------------------------------------------------------------- training


def spy_unet(monkeypatch, state) -> list[tuple[tuple[int, ...], torch.Tensor | None]]:
    """Record (latent shape, SDXL time ids) of every UNet forward."""
    unet = state.unwrap(state.unet)
    real = unet.forward
    calls: list[tuple[tuple[int, ...], torch.Tensor | None]] = []

    def forward(sample, *args, **kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        calls.append((tuple(sample.shape), added.get("time_ids")))
        return real(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", forward)
    return calls


def train_state(state):
    try:
        return loop.train(state)
    finally:
        loop.cleanup(state)


def test_mixed_aspect_dataset_trains_in_uniform_batches(
    tmp_path: Path, aspect_dataset: Path, models_8x: dict, monkeypatch
):
    state = loop.setup(
        bucket_cfg(
            tmp_path,
            aspect_dataset,
            models_8x,
            {"validation.validate_every": 2, "validation.prompts": ["a photo of {token} {class}"]},
        )
    )
    calls = spy_unet(monkeypatch, state)
    batches: list[tuple[list[int], tuple[int, ...]]] = []
    real_loss = loop.compute_loss

    def spy_loss(state, batch):
        batches.append((state.plan.indices(state.step, 0), tuple(batch.latents.shape)))
        return real_loss(state, batch)

    monkeypatch.setattr(loop, "compute_loss", spy_loss)
    result = train_state(state)

    assert len(batches) == 4
    for images, shape in batches:  # each batch: two images of one bucket, at that bucket's size
        assert len(images) == 2 and len({TRAIN[i] for i in images}) == 1
        assert shape == (2, *{LANDSCAPE: WIDE, PORTRAIT: TALL, SQUARE: SQ}[TRAIN[images[0]]])
    assert sorted(shape for _, shape in batches) == sorted([(2, *WIDE)] * 2 + [(2, *TALL), (2, *SQ)])
    assert {i for images, _ in batches for i in images} == set(range(len(TRAIN)))  # every image in the epoch
    assert {shape[1:] for shape, _ in calls} >= {WIDE, SQ}  # validation saw the val images at their sizes
    vals = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4] and all(math.isfinite(r["val_loss"]) for r in vals)
    assert (result.run_dir / "best" / "pytorch_lora_weights.safetensors").is_file()
    from PIL import Image

    with Image.open(result.run_dir / "samples" / "step-000004" / "00-00.png") as sample:
        assert sample.size == (256, 256)  # sample images stay square at the resolution


def test_latent_cache_is_reused_per_image_and_size(tmp_path: Path, aspect_dataset: Path, models_8x: dict):
    def encode(**flags) -> dict:
        events = Events()
        state = loop.setup(bucket_cfg(tmp_path, aspect_dataset, models_8x, flags), on_event=events)
        loop.cleanup(state)
        return next(e for e in events.of("cache") if e["what"] == "latents")

    entries = aspect_dataset / ".cache" / "latents"
    n = len(TRAIN) + len(VAL)
    assert (encode()["encoded"], len(list(entries.iterdir()))) == (n, n)
    assert encode()["encoded"] == 0  # a second run encodes nothing
    # The model folder's VAE saved again in place (retrained, say): none of the old latents is reused.
    vae_file = next((Path(models_8x["tiny-sd"]) / "vae").glob("*.safetensors"))
    vae_file.write_bytes(vae_file.read_bytes())
    assert encode()["encoded"] == n

    # The same files trained square: the square photos' entries are reused, the others get square ones.
    manifest_path = aspect_dataset / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["options"]["keep_aspect"] = False
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    squares = (TRAIN + VAL).count(SQUARE)
    square = encode()
    assert (square["encoded"], square["reused"]) == (n - squares, squares)
    manifest["options"]["keep_aspect"] = True
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    assert encode(**{"data.resolution": 192})["encoded"] == n  # another resolution: other sizes
    assert len(list(entries.iterdir())) == 4 * n - squares  # one entry per (model state, image, size)


def test_sdxl_time_ids_carry_the_real_sizes_and_crops(
    tmp_path: Path, aspect_dataset: Path, models_8x: dict, monkeypatch
):
    state = loop.setup(bucket_cfg(tmp_path, aspect_dataset, models_8x, model="tiny-sdxl"))
    calls = spy_unet(monkeypatch, state)
    result = train_state(state)
    assert all(math.isfinite(r["loss"]) for r in steps_of(result.run_dir))
    rows_seen = set()
    for shape, time_ids in calls:  # the training steps and the final validation
        assert time_ids is not None and time_ids.shape == (shape[0], 6)
        for row in time_ids.tolist():
            assert row in TIME_IDS.values(), row
            assert (row[4], row[5]) == (shape[2] * 8, shape[3] * 8)  # the size of the latents beside them
            rows_seen.add(tuple(row))
    assert rows_seen == {tuple(v) for v in TIME_IDS.values()}


def test_prior_preservation_with_square_class_images_beside_buckets(
    tmp_path: Path, aspect_dataset: Path, models_8x: dict, monkeypatch
):
    from PIL import Image

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    for i, color in enumerate(("red", "blue")):  # the user's own class images: nothing to generate
        Image.new("RGB", (300, 260), color).save(class_dir / f"toy{i}.png")
    state = loop.setup(
        bucket_cfg(
            tmp_path,
            aspect_dataset,
            models_8x,
            {"prior.class_prompt": "a photo of a toy", "prior.num_class_images": 2, "prior.class_dir": str(class_dir)},
        )
    )
    calls = spy_unet(monkeypatch, state)

    # A square batch beside the square class images takes one forward; split in two, the loss is the same.
    step = next(s for s in range(4) if state.plan.batch(s, 0).latents.shape[1:] == SQ)
    batch = state.plan.batch(step, 0)
    with torch.no_grad():
        joined, _ = loop.compute_loss(state, batch)
        with monkeypatch.context() as patch:
            patch.setattr(type(batch), "with_prior", lambda self: None)
            split, _ = loop.compute_loss(state, batch)
    assert [shape for shape, _ in calls] == [(4, *SQ), (2, *SQ), (2, *SQ)]
    torch.testing.assert_close(split, joined, rtol=1e-5, atol=1e-6)
    calls.clear()

    result = train_state(state)
    shapes = [shape for shape, _ in calls]
    assert (4, *SQ) in shapes  # square instances and class images together
    wide = shapes.index((2, *WIDE))
    assert shapes[wide + 1] == (2, *SQ)  # a 4:3 batch, then its class images on their own
    steps = steps_of(result.run_dir)
    assert len(steps) == 4
    for record in steps:
        assert record["loss"] == pytest.approx(record["loss/instance"] + record["loss/prior"], rel=1e-5)


# ----------------------------------------------------------------------------- end to end, from the CLI


@pytest.mark.parametrize("model", ["tiny-sd", pytest.param("tiny-sdxl", marks=pytest.mark.slow)])  # SDXL: 8 s
def test_cli_keep_aspect_photos_to_samples_with_the_token_embedding(tmp_path: Path, models_8x: dict, model):
    """Phone-shaped photos -> prepare --keep-aspect -> train from YAML (buckets + pivotal tuning) -> sample."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from sdlora.cli import app

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(640, 480)] * 3 + [(480, 640)] * 2 + [(500, 500)] * 2):
        blocks = rng.integers(0, 256, (h // 40, w // 40, 3), dtype=np.uint8)  # coarse noise: no near duplicates
        Image.fromarray(blocks).resize((w, h), Image.Resampling.NEAREST).save(photos / f"IMG_{i:04d}.jpg", quality=90)
    runner = CliRunner()
    dataset = tmp_path / "dataset"
    result = runner.invoke(
        app,
        [
            "prepare",
            str(photos),
            "--out",
            str(dataset),
            "--keep-aspect",
            "--resolution",
            "256",
            "--val-fraction",
            "0.3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "320x192 x3" in result.output and "192x320 x2" in result.output and "256x256 x2" in result.output

    config = tmp_path / "train.yaml"
    config.write_text(
        f"""
model: {{name: {models_8x[model]}}}
data: {{dataset: {dataset}}}
embedding: {{init_token: toy, learning_rate: 1.0e-2, steps_fraction: 1.0}}
train: {{max_steps: 3, batch_size: 2, learning_rate: 1.0e-3}}
validation: {{validate_every: 0, prompts: []}}
checkpoint: {{checkpoint_every: 0}}
run: {{runs_dir: {tmp_path / "runs"}, name: r}}
""",
        encoding="utf-8",
    )
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "token sksToy: its own embedding, from 'toy', trained until step 3" in result.output
    run = tmp_path / "runs" / "r"
    assert (run / "lora" / "embeddings.safetensors").is_file()
    assert all(r["grad_norm/embeddings"] > 0 for r in steps_of(run))

    result = runner.invoke(
        app,
        [
            "sample",
            "sksToy on a beach",
            "--run",
            str(run),
            "--num-images",
            "1",
            "--steps",
            "2",
            "--height",
            "256",
            "--width",
            "256",
        ],
    )
    assert result.exit_code == 0, result.output
    samples = json.loads((run / "samples" / "samples.json").read_text(encoding="utf-8"))
    lora_image = next(e for e in samples["images"] if e["variant"] == "lora")
    with Image.open(run / "samples" / lora_image["file"]) as png:
        assert "embeddings.safetensors" in png.info["lora"]  # `sample` loaded the token's embedding by itself
