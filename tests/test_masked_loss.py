"""The masked loss (`train --masked-loss`, `--unmasked-weight`): the weighted loss by hand, the mask on the
latent grid (cache, flip, buckets), and a masked run end to end (config, metrics, resume)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import write_tiny_dataset
from recipe_helpers import stopped_and_resumed
from sdlora.cli import app
from sdlora.data.manifest import load_manifest
from sdlora.data.masks import MASKS
from sdlora.run import Metric
from sdlora.train import cache as cache_mod
from sdlora.train import loop, losses
from sdlora.train.data import BatchPlan, Conditioning, LatentSet
from sdlora.train.objective import NoisePrediction
from test_train import steps_of, tiny_cfg


def add_masks(dataset: Path, left_half: bool = True) -> Path:
    """Give every image of a prepared dataset a mask: its left half white (the object), right black."""
    manifest = load_manifest(dataset)
    (dataset / MASKS).mkdir(exist_ok=True)
    for name, rec in manifest.images.items():
        w, h = rec.size
        arr = np.zeros((h, w), dtype=np.uint8)
        arr[:, : w // 2 if left_half else w // 4] = 255
        Image.fromarray(arr, "L").save(dataset / MASKS / name)
        rec.mask, rec.mask_source, rec.mask_coverage = name, {"kind": "alpha"}, float((arr > 127).mean())
    manifest.options["masks"] = {"kind": "alpha", "dilate": 0}
    manifest.save(dataset)
    return dataset


# ---------------------------------------------------------------------------- the loss itself


def test_masked_loss_is_the_weighted_mean_normalised_by_the_weights():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    wmap = losses.mask_weights(mask, 0.1)  # 1, 0.1, 0.55, 0.1
    by_hand = (1 * 1 + 0.1 * 4 + 0.55 * 9 + 0.1 * 16) / (1 + 0.1 + 0.55 + 0.1)
    assert losses.diffusion_loss(pred, target, None, wmap).item() == pytest.approx(by_hand, rel=1e-6)
    # Min-SNR weights multiply the normalised per-sample loss, as without a mask.
    weights = torch.tensor([0.5])
    assert losses.diffusion_loss(pred, target, weights, wmap).item() == pytest.approx(0.5 * by_hand, rel=1e-6)


def test_an_all_ones_mask_is_the_unmasked_loss():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 6, generator=gen), torch.randn(3, 4, 8, 6, generator=gen)
    weights = torch.rand(3, generator=gen)
    ones = losses.mask_weights(torch.ones(3, 1, 8, 6), 0.1)
    for w in (None, weights):
        plain = losses.diffusion_loss(pred, target, w)
        torch.testing.assert_close(losses.diffusion_loss(pred, target, w, ones), plain, rtol=1e-6, atol=0)


def test_with_weight_zero_the_background_changes_neither_loss_nor_gradient():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(2, 4, 8, 8, generator=gen)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :, :3] = 1.0
    wmap = losses.mask_weights(mask, 0.0)
    other = target.clone()
    other[..., :, 3:] += torch.randn(2, 4, 8, 5, generator=gen) * 10  # only outside the mask

    def loss_and_grad(t):
        pred = torch.ones(2, 4, 8, 8, requires_grad=True)
        loss = losses.diffusion_loss(pred, t, None, wmap)
        loss.backward()
        return loss.detach(), pred.grad

    (l1, g1), (l2, g2) = loss_and_grad(target), loss_and_grad(other)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    assert losses.diffusion_loss(torch.ones_like(target), target, None) != losses.diffusion_loss(
        torch.ones_like(target), other, None
    )


# ---------------------------------------------------------------------------- the mask on the latent grid


def test_masks_on_the_latent_grid_are_cached_and_rekeyed_when_the_mask_changes(tmp_path: Path):
    path = tmp_path / "m.png"
    arr = np.zeros((64, 48), dtype=np.uint8)
    arr[:16, :12] = 255  # the top-left 2x... latent cells of an 8x downsampled grid
    Image.fromarray(arr, "L").save(path)
    cache = cache_mod.TensorCache(tmp_path / "cache")
    masks, stats = cache_mod.encode_masks([path, None], sizes=[(64, 48)] * 2, latent_sizes=[(8, 6)] * 2, cache=cache)
    assert stats.encoded == 1 and masks[1] is None and masks[0].shape == (1, 8, 6)
    expected = torch.zeros(1, 8, 6)
    expected[:, :2, :1] = 1.0
    expected[:, :2, 1] = 0.5  # area interpolation: half of that cell's pixels are object
    torch.testing.assert_close(masks[0], expected)
    again, stats = cache_mod.encode_masks([path], sizes=[(64, 48)], latent_sizes=[(8, 6)], cache=cache)
    assert stats.reused == 1 and torch.equal(again[0], masks[0])
    arr[:] = 255
    Image.fromarray(arr, "L").save(path)
    changed, stats = cache_mod.encode_masks([path], sizes=[(64, 48)], latent_sizes=[(8, 6)], cache=cache)
    assert stats.encoded == 1 and torch.equal(changed[0], torch.ones(1, 8, 6))


def _marked(shape: tuple[int, int], column: int) -> torch.Tensor:
    t = torch.zeros(1, *shape)
    t[..., column] = 1.0
    return t


def test_the_mask_follows_its_latent_through_flips_and_buckets():
    # Each latent carries a marker column; its mask marks the same column; the mirrored latent the mirrored one.
    shapes = [(4, 4), (4, 4), (4, 6), (4, 6), (4, 6)]
    latents = [_marked(s, 0).repeat(4, 1, 1) * (i + 1) for i, s in enumerate(shapes)]
    flipped = [lat.flip(-1) for lat in latents]
    masks = [_marked(s, 0) for s in shapes]
    masks[1] = None  # an image without a mask: all ones
    data = LatentSet(
        latents=latents,
        flipped=flipped,
        cond=Conditioning(embeds=torch.zeros(5, 77, 8)),
        time_ids=torch.zeros(5, 6),
        time_ids_flipped=torch.zeros(5, 6),
        masks=masks,
    )
    from diffusers import DDPMScheduler

    plan = BatchPlan(
        data,
        None,
        seed=0,
        batch_size=2,
        num_processes=1,
        process_index=0,
        gradient_accumulation=1,
        noise_offset=0.0,
        objective=NoisePrediction(DDPMScheduler(num_train_timesteps=1000)),
    )
    seen_flip = seen_plain = False
    for step in range(12):
        batch = plan.batch(step, 0)
        assert batch.mask is not None and batch.mask.shape == (2, 1, *batch.latents.shape[2:])
        for lat, mask in zip(batch.latents, batch.mask):
            if torch.all(mask == 1):  # the maskless image
                continue
            marker = lat[0] != 0
            assert torch.equal(mask[0] == 1, marker)
            seen_flip |= bool(marker[:, -1].all())
            seen_plain |= bool(marker[:, 0].all())
    assert seen_flip and seen_plain


# ---------------------------------------------------------------------------- a masked run


@pytest.fixture
def masked_dataset(tmp_path: Path) -> Path:
    return add_masks(write_tiny_dataset(tmp_path / "dataset"))


def test_masked_run_records_its_settings_logs_coverage_and_resumes_exactly(tmp_path: Path, masked_dataset: Path):
    flags = {
        "train.max_steps": 4,
        "train.gradient_accumulation": 2,
        "data.random_flip": True,
        "data.unmasked_weight": 0.25,
        "lora.dropout": 0.1,
    }
    straight = loop.run_training(tiny_cfg(tmp_path, masked_dataset, {**flags, "run.name": "straight"}))
    saved = yaml.safe_load((straight.run_dir / "config.yaml").read_text())
    assert saved["data"]["masked_loss"] is True and saved["data"]["unmasked_weight"] == 0.25
    steps = steps_of(straight.run_dir)
    assert all(r[Metric.MASK_COVERAGE] == pytest.approx(0.5, abs=1e-6) for r in steps)  # left halves
    assert list((masked_dataset / ".cache" / "masks").glob("*.safetensors"))

    second, cfg, warnings = stopped_and_resumed(tiny_cfg(tmp_path, masked_dataset, {**flags, "run.name": "halves"}), 2)
    assert warnings == [] and cfg.data.masked_loss is True
    a = load_file(straight.lora_dir / "pytorch_lora_weights.safetensors")
    b = load_file(second.lora_dir / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    assert [r["loss"] for r in steps_of(second.run_dir)] == pytest.approx([r["loss"] for r in steps], abs=1e-5)

    # --no-masked-loss on the same dataset: the plain loss, another number, no coverage logged.
    plain = loop.run_training(
        tiny_cfg(tmp_path, masked_dataset, {**flags, "run.name": "plain", "data.masked_loss": False})
    )
    plain_steps = steps_of(plain.run_dir)
    assert Metric.MASK_COVERAGE not in plain_steps[0]
    assert plain_steps[0]["loss"] != pytest.approx(steps[0]["loss"], abs=1e-6)


def test_the_cli_plan_names_the_masked_loss_and_dop(tmp_path: Path, masked_dataset: Path):
    args = ["train", "-d", str(masked_dataset), "--model", "tiny-sd", "--runs-dir", str(tmp_path / "runs")]
    args += ["--max-steps", "1", "--validate-every", "0", "--checkpoint-every", "0", "--preservation", "dop"]
    result = CliRunner().invoke(app, [*args, "validation.prompts=[]"])
    assert result.exit_code == 0, result.output
    assert "masked loss: 5 of 5 train images have a subject mask; the background weighs 0.1" in result.output
    assert "preservation: dop" in result.output


def test_masked_loss_on_a_dataset_without_masks_is_one_line(tmp_path: Path, tiny_dataset: Path, monkeypatch):
    from sdlora.train import lora

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(lora, "load_base", no_model)
    result = CliRunner().invoke(
        app,
        ["train", "-d", str(tiny_dataset), "--model", "tiny-sd", "--runs-dir", str(tmp_path / "runs"), "--masked-loss"],
    )
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--masked-loss" in lines[0] and "no subject masks" in lines[0], result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_mask_composes_with_min_snr_and_class_images_weigh_one(tmp_path: Path, masked_dataset: Path):
    from dataclasses import replace

    flags = {"train.snr_gamma": 5.0, "prior.class_prompt": "a photo of a toy", "prior.num_class_images": 2}
    state = loop.setup(tiny_cfg(tmp_path, masked_dataset, flags))
    try:
        assert state.cfg.data.masked_loss and state.cfg.prior.preservation == "images"
        batch = state.plan.batch(0, 0)
        assert batch.mask is not None and batch.prior is not None and batch.prior.mask is None
        with torch.no_grad():
            loss, parts = loop.compute_loss(state, batch)
            _, unmasked = loop.compute_loss(state, replace(batch, mask=None))
        torch.testing.assert_close(parts[Metric.LOSS_PRIOR], unmasked[Metric.LOSS_PRIOR], atol=1e-6, rtol=0)
        assert abs(parts[Metric.LOSS_INSTANCE].item() - unmasked[Metric.LOSS_INSTANCE].item()) > 1e-6
        assert loss.item() == pytest.approx((parts[Metric.LOSS_INSTANCE] + parts[Metric.LOSS_PRIOR]).item(), rel=1e-6)
    finally:
        loop.cleanup(state)
