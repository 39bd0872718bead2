"""The noise-prediction objective as small pure functions: target, noise, timesteps, weights, loss.

`noise_scheduler` is a diffusers training scheduler (`DDPMScheduler.from_config(...)`): these
functions read only `alphas_cumprod`, `config.num_train_timesteps`, `config.prediction_type`
and, for v-prediction, `get_velocity`. Everything is torch only, so the training loop stays a
short sequence of calls and each piece is tested against hand-computed numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdlora.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def compute_snr(noise_scheduler: Any, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) per timestep, in float32.

    As in Min-SNR (Hang et al. 2023, https://arxiv.org/abs/2303.09556), following
    https://github.com/TiankaiHang/Min-SNR-Diffusion-Training/blob/521b624bd70c67cee4bdf49225915f5945a872e3/guided_diffusion/gaussian_diffusion.py#L847-L849
    and diffusers' `training_utils.compute_snr`: snr = (sqrt(a) / sqrt(1 - a)) ** 2.
    """
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    alpha_bar = alphas_cumprod[timesteps.long()]
    return (alpha_bar.sqrt() / (1.0 - alpha_bar).sqrt()) ** 2


def min_snr_weights(noise_scheduler: Any, timesteps: Tensor, snr_gamma: float) -> Tensor:
    """Per-sample Min-SNR-gamma loss weights for the scheduler's prediction type.

    min(snr, gamma) turns the implied x0-loss weight into a clamped one; dividing by snr
    (epsilon) or snr + 1 (v-prediction) converts it back to the weight on the predicted
    quantity, exactly as diffusers' train_text_to_image.py does. A zero SNR (zero-terminal
    schedules) gives weight 1 for epsilon, the limit of min(snr, gamma) / snr.
    """
    if snr_gamma <= 0:
        raise ConfigError(f"--snr-gamma must be positive (5.0 is the paper's choice), got {snr_gamma}")
    snr = compute_snr(noise_scheduler, timesteps)
    clamped = torch.clamp(snr, max=snr_gamma)
    prediction_type = check_prediction_type(noise_scheduler)
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clamped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    return clamped / (snr + 1.0)


def prediction_target(noise_scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    prediction_type = check_prediction_type(noise_scheduler)
    if prediction_type == "epsilon":
        return noise
    return noise_scheduler.get_velocity(latents, noise, timesteps)


def offset_noise(latents: Tensor, noise_offset: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise shaped like `latents`, plus `noise_offset` x one random value per channel.

    The per-channel constant lets the model learn to change an image's mean brightness
    (https://www.crosslabs.org/blog/diffusion-with-offset-noise). With offset 0 this is
    exactly `randn` (no extra draw, so the random stream is unchanged).
    """
    noise = _randn(latents.shape, latents, generator)
    if noise_offset:
        batch, channels = latents.shape[:2]
        offset = _randn((batch, channels) + (1,) * (latents.ndim - 2), latents, generator)
        noise = noise + noise_offset * offset
    return noise


def sample_timesteps(
    noise_scheduler: Any, batch: int, generator: torch.Generator | None = None, device: Any = None
) -> Tensor:
    """`batch` uniform integer timesteps in [0, num_train_timesteps), as int64."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    timesteps = torch.randint(
        0, int(noise_scheduler.config.num_train_timesteps), (batch,), generator=generator, device=gen_device
    )
    return timesteps.to(device) if device is not None else timesteps


def diffusion_loss(
    model_pred: Tensor, target: Tensor, weights: Tensor | None, weight_map: Tensor | None = None
) -> Tensor:
    """Mean squared error, computed in float32 per sample, then mean(weights * per_sample).

    Same reduction as diffusers' Min-SNR training (the weights are not renormalised), so
    `weights=None` equals `F.mse_loss(pred, target)`. `weight_map` (the masked loss: shape
    (B, 1, h, w) or anything that broadcasts to the prediction) weights each latent cell, and each
    sample's error is normalised by its weight sum: sum(w * (pred - target)^2) / sum(w), so an
    all-ones map gives the plain mean and the scale stays comparable across masks.
    """
    if model_pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(model_pred.shape)} and target {tuple(target.shape)} differ in shape")
    error = (model_pred.float() - target.float()).pow(2)
    if weight_map is None:
        per_sample = error.flatten(1).mean(dim=1)
    else:
        w = weight_map.to(error).expand_as(error)
        per_sample = (w * error).flatten(1).sum(dim=1) / w.flatten(1).sum(dim=1).clamp(min=torch.finfo(w.dtype).tiny)
    if weights is None:
        return per_sample.mean()
    if weights.shape != per_sample.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must have one value per sample ({per_sample.shape[0]})")
    return (per_sample * weights.to(per_sample)).mean()


def diffusion_loss_of_rows(
    pred: Tensor, target: Tensor, weights: Tensor | None, weight_map: Tensor | None, rows: slice
) -> Tensor:
    """`diffusion_loss` of some rows of a joined batch (instance rows, or the class rows after them)."""
    return diffusion_loss(
        pred[rows],
        target[rows],
        None if weights is None else weights[rows],
        None if weight_map is None else weight_map[rows],
    )


def mask_weights(mask: Tensor, unmasked_weight: float) -> Tensor:
    """The masked loss's weight map: 1 on the object, `unmasked_weight` on the background (0 ignores it)."""
    return unmasked_weight + (1.0 - unmasked_weight) * mask.float()


def check_prediction_type(noise_scheduler: Any) -> str:
    """The scheduler's prediction type; ConfigError for one sdlora does not train."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"the model's scheduler has prediction_type {prediction_type!r}; "
            f"sdlora trains only {' or '.join(PREDICTION_TYPES)} models"
        )
    return prediction_type


def _randn(shape: tuple[int, ...] | torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    gen_device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=like.dtype).to(like.device)
