"""The training objective: how a step turns clean latents and noise into the denoiser's input and target.

The family gives it (`Family.training_objective`); the batch plan (train/data.py) asks it for each
sample's timestep, the loop (train/loop.py) for the noisy input, the target, the loss weights and the
timestep the denoiser is called with. Nothing else names a noise schedule, so a UNet family
(`NoisePrediction`: DDPM's epsilon or v-prediction, Min-SNR) and a flow-matching transformer
(train/flow_matching.py) share the loop, the batch plan and validation.

`t` is the objective's own timestep (an integer DDPM step, a flow-matching sigma): drawn once per
sample from the sample's generator, so a step stays a pure function of (seed, step).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from sdlora.train import losses


class Objective:
    """What a training step asks of the denoising objective. Subclasses fill every method."""

    # What the start event records ("epsilon", "v_prediction", "flow_matching").
    prediction_type: str = ""

    def sample_timesteps(self, generator: torch.Generator, n: int, latent_shape: Sequence[int]) -> Tensor:
        """`n` training timesteps for latents of `latent_shape` (C, H, W), drawn from `generator` only."""
        raise NotImplementedError

    def validation_timesteps(self, count: int) -> Tensor:
        """`count` fixed timesteps spread evenly over the schedule: the validation loss's."""
        raise NotImplementedError

    def noisy_input(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def target(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the denoiser should predict."""
        raise NotImplementedError

    def loss_weights(self, t: Tensor) -> Tensor | None:
        """Per-sample loss weights (None: all 1)."""
        raise NotImplementedError

    def model_timesteps(self, t: Tensor) -> Tensor:
        """`t` in the form the denoiser's forward takes."""
        raise NotImplementedError


class NoisePrediction(Objective):
    """DDPM noise prediction (epsilon or v-prediction) on the model's own noise schedule, with optional
    Min-SNR-gamma weights: what diffusers' train_text_to_image(_lora).py and train_dreambooth_lora.py do."""

    def __init__(self, scheduler: Any, snr_gamma: float | None = None):
        """`scheduler`: a diffusers training scheduler (`DDPMScheduler`); ConfigError for a prediction type
        sdlora does not train."""
        self.prediction_type = losses.check_prediction_type(scheduler)
        self.scheduler, self.snr_gamma = scheduler, snr_gamma

    @classmethod
    def of_pipeline(cls, pipe: Any, snr_gamma: float | None = None) -> "NoisePrediction":
        """The objective of a pipeline's own scheduler config (its betas and prediction type)."""
        from diffusers import DDPMScheduler

        return cls(DDPMScheduler.from_config(pipe.scheduler.config), snr_gamma)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def sample_timesteps(self, generator: torch.Generator, n: int, latent_shape: Sequence[int]) -> Tensor:
        return losses.sample_timesteps(self.scheduler, n, generator=generator)

    def validation_timesteps(self, count: int) -> Tensor:
        total = self.num_train_timesteps
        return torch.tensor([int((k + 0.5) * total / count) for k in range(count)], dtype=torch.long)

    def noisy_input(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.scheduler.add_noise(latents, noise, t)

    def target(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return losses.prediction_target(self.scheduler, latents, noise, t)

    def loss_weights(self, t: Tensor) -> Tensor | None:
        return losses.min_snr_weights(self.scheduler, t, self.snr_gamma) if self.snr_gamma else None

    def model_timesteps(self, t: Tensor) -> Tensor:
        return t  # the UNet takes the integer step
