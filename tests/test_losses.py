"""The training objective's pieces against hand-computed numbers on the SD 1.x noise schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sdlora.errors import ConfigError
from sdlora.train.losses import (
    compute_snr,
    diffusion_loss,
    min_snr_weights,
    offset_noise,
    prediction_target,
    sample_timesteps,
)

# alpha_bar_t of SD's "scaled_linear" schedule, by hand: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2.
_S0, _S1 = math.sqrt(0.00085), math.sqrt(0.012)
_ALPHA_BAR = []
_prod = 1.0
for _i in range(1000):
    _prod *= 1.0 - (_S0 + (_S1 - _S0) * _i / 999) ** 2
    _ALPHA_BAR.append(_prod)


def _snr(t: int) -> float:
    return _ALPHA_BAR[t] / (1.0 - _ALPHA_BAR[t])


def sd_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
    )


def test_compute_snr_matches_hand_computed_schedule():
    timesteps = torch.tensor([0, 1, 499, 999])
    snr = compute_snr(sd_scheduler(), timesteps)
    # Literal anchors: t=0 -> 0.99915 / 0.00085; the last step of SD's schedule has alpha_bar ~ 0.00466.
    assert snr[0].item() == pytest.approx(0.99915 / 0.00085, rel=1e-4)
    assert snr[3].item() == pytest.approx(0.0046819, rel=1e-4)
    assert snr.tolist() == pytest.approx([_snr(t) for t in timesteps.tolist()], rel=1e-4)
    assert snr.dtype == torch.float32


def test_compute_snr_agrees_with_diffusers():
    from diffusers.training_utils import compute_snr as diffusers_snr

    scheduler = sd_scheduler()
    timesteps = torch.arange(0, 1000, 37)
    torch.testing.assert_close(compute_snr(scheduler, timesteps), diffusers_snr(scheduler, timesteps))


def test_min_snr_weights_epsilon():
    timesteps = torch.tensor([0, 499, 999])
    weights = min_snr_weights(sd_scheduler("epsilon"), timesteps, snr_gamma=5.0)
    # Low noise (snr 1175 > 5): weight 5 / snr; high noise (snr < 5): weight 1.
    expected = [5.0 / _snr(0), 1.0, 1.0]
    assert weights.tolist() == pytest.approx(expected, rel=1e-4)
    assert weights[0].item() == pytest.approx(5.0 * 0.00085 / 0.99915, rel=1e-4)


def test_min_snr_weights_v_prediction():
    timesteps = torch.tensor([0, 499, 999])
    weights = min_snr_weights(sd_scheduler("v_prediction"), timesteps, snr_gamma=5.0)
    expected = [5.0 / (_snr(0) + 1), _snr(499) / (_snr(499) + 1), _snr(999) / (_snr(999) + 1)]
    assert weights.tolist() == pytest.approx(expected, rel=1e-4)


def test_min_snr_weights_zero_terminal_snr_is_finite():
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True
    )
    weights = min_snr_weights(scheduler, torch.tensor([999, 0]), snr_gamma=5.0)
    assert torch.isfinite(weights).all()
    assert weights[0].item() == 1.0


def test_min_snr_weights_rejects_non_positive_gamma():
    with pytest.raises(ConfigError, match="snr-gamma"):
        min_snr_weights(sd_scheduler(), torch.tensor([1]), snr_gamma=0.0)


def test_prediction_target_epsilon_is_the_noise():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    target = prediction_target(sd_scheduler(), latents, noise, torch.tensor([10, 900]))
    assert target is noise


def test_prediction_target_velocity_by_hand():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([0, 999])
    target = prediction_target(sd_scheduler("v_prediction"), latents, noise, timesteps)
    for i, t in enumerate(timesteps.tolist()):
        a = _ALPHA_BAR[t]
        expected = math.sqrt(a) * noise[i] - math.sqrt(1 - a) * latents[i]  # v = sqrt(a) eps - sqrt(1-a) x0
        torch.testing.assert_close(target[i], expected, rtol=1e-5, atol=1e-5)


def test_prediction_target_unknown_type_names_it():
    scheduler = sd_scheduler()
    scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ConfigError, match="'sample'"):
        prediction_target(scheduler, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([1]))


def test_offset_noise_zero_is_plain_randn():
    latents = torch.zeros(3, 4, 8, 8)
    noise = offset_noise(latents, 0.0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(noise, torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7)))


def test_offset_noise_adds_one_constant_per_channel():
    latents = torch.zeros(2, 4, 16, 16)
    noise = offset_noise(latents, 0.1, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 4, 16, 16, generator=gen)
    offset = torch.randn(2, 4, 1, 1, generator=gen)
    torch.testing.assert_close(noise, base + 0.1 * offset)
    # The difference from plain noise is constant over each channel's pixels.
    diff = noise - base
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff))
    assert noise.shape == latents.shape and noise.dtype == latents.dtype


def test_sample_timesteps_uniform_ints_in_range():
    scheduler = sd_scheduler()
    t = sample_timesteps(scheduler, 20000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.dtype == torch.int64
    assert t.min().item() >= 0 and t.max().item() <= 999
    assert t.min().item() < 5 and t.max().item() > 994  # both ends reachable
    assert abs(t.float().mean().item() - 499.5) < 10  # uniform: mean 499.5, std err ~2
    again = sample_timesteps(scheduler, 20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_diffusion_loss_unweighted_is_mse():
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(diffusion_loss(pred, target, None), F.mse_loss(pred, target))


def test_diffusion_loss_weighted_by_hand():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])
    # Per-sample MSE: 1 and 9; weighted mean: (0.5 * 1 + 2 * 9) / 2 = 9.25.
    loss = diffusion_loss(pred, target, torch.tensor([0.5, 2.0]))
    assert loss.item() == pytest.approx(9.25)


def test_diffusion_loss_half_precision_inputs_give_float32():
    pred, target = torch.randn(2, 4, 4, 4).half(), torch.randn(2, 4, 4, 4).half()
    assert diffusion_loss(pred, target, None).dtype == torch.float32


def test_diffusion_loss_gradient_flows():
    pred = torch.randn(2, 4, 4, 4, requires_grad=True)
    diffusion_loss(pred, torch.zeros(2, 4, 4, 4), torch.tensor([1.0, 0.0])).backward()
    assert pred.grad[0].abs().sum() > 0 and pred.grad[1].abs().sum() == 0


def test_diffusion_loss_shape_mismatch():
    with pytest.raises(ValueError):
        diffusion_loss(torch.zeros(2, 4), torch.zeros(2, 5), None)


# ----------------------------------------------------------------------------- the UNet families' objective


def test_noise_prediction_objective_is_the_ddpm_pieces():
    from sdlora.train.objective import NoisePrediction

    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = sd_scheduler(prediction_type)
        objective = NoisePrediction(scheduler, snr_gamma=5.0)
        assert objective.prediction_type == prediction_type
        latents, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([5, 500, 999])
        assert torch.equal(objective.noisy_input(latents, noise, t), scheduler.add_noise(latents, noise, t))
        assert torch.equal(objective.target(latents, noise, t), prediction_target(scheduler, latents, noise, t))
        assert torch.equal(objective.loss_weights(t), min_snr_weights(scheduler, t, 5.0))
        assert objective.model_timesteps(t) is t  # the UNet takes the integer step
        draw = objective.sample_timesteps(torch.Generator().manual_seed(4), 8, (4, 2, 2))
        assert torch.equal(draw, sample_timesteps(scheduler, 8, generator=torch.Generator().manual_seed(4)))
    assert NoisePrediction(sd_scheduler()).loss_weights(t) is None  # no --snr-gamma
    # The validation loss's timesteps: evenly spaced, as sdlora always had them.
    assert NoisePrediction(sd_scheduler()).validation_timesteps(4).tolist() == [125, 375, 625, 875]


def test_noise_prediction_refuses_a_prediction_type_it_cannot_train():
    from sdlora.train.objective import NoisePrediction

    scheduler = sd_scheduler()
    scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ConfigError, match="'sample'"):
        NoisePrediction(scheduler)
