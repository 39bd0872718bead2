"""Flow matching (rectified flow), the objective of the transformer families (FLUX.1, FLUX.2, Z-Image, SD3).

With sigma in [0, 1] drawn per sample, the denoiser sees noisy = (1 - sigma) * x0 + sigma * noise and
predicts the velocity noise - x0 (Esser et al. 2024, https://arxiv.org/abs/2403.03206; diffusers'
FlowMatchEulerDiscreteScheduler runs the same line backwards at inference).

Timestep sampling, as the anchors offer it:

- `uniform`: sigma ~ U(0, 1). diffusers' train_dreambooth_lora_flux.py default (`--weighting_scheme
  none`: u = rand, taken to the nearest of its scheduler's 1000 sigmas; here u itself) and sd-scripts'
  `--timestep_sampling uniform`.
- `logit_normal`: sigmoid(N(logit_mean, logit_std)), SD3's choice (paper section 3.1); diffusers'
  `--weighting_scheme logit_normal` with its defaults logit_mean 0.0, logit_std 1.0, drawn by
  `diffusers.training_utils.compute_density_for_timestep_sampling`.
- `sigmoid`: sigmoid(sigmoid_scale * N(0, 1)), sd-scripts' `--timestep_sampling sigmoid` (after
  XLabs' x-flux), sigmoid_scale 1.0 as sd-scripts defaults it.

then an optional shift towards noise:

- a fixed `shift`: sigma' = shift * sigma / (1 + (shift - 1) * sigma), FlowMatchEulerDiscreteScheduler's
  static shift and sd-scripts' `--timestep_sampling shift --discrete_flow_shift S` (sd-scripts' FLUX.1 LoRA
  example uses sigmoid sampling with S = 3.1582; its default S is 3.0). SD3's scheduler config has 3.0.
- FLUX.1's resolution-dependent shift (`ResolutionShift`): mu = diffusers' `calculate_shift` of the image
  sequence length (linear from base_shift 0.5 at 256 tokens to max_shift 1.15 at 4096, FLUX.1's scheduler
  config), then sigma' = e^mu / (e^mu + (1 / sigma - 1)), the exponential time shift that
  FlowMatchEulerDiscreteScheduler applies with `use_dynamic_shifting` at inference and that sd-scripts'
  `--timestep_sampling flux_shift` applies in training (there after sigmoid sampling).

Loss weighting (`weighting`): `none` (every anchor's FLUX default), or SD3's `sigma_sqrt` / `cosmap` by
diffusers' `compute_loss_weighting_for_sd3` (sigma_sqrt's sigma is floored at 1/1000, the smallest sigma of
the 1000-step schedule diffusers samples from, so a continuous draw near 0 cannot give an infinite weight).

The denoiser's timestep is sigma * `timestep_scale`: 1000 (diffusers' scheduler timesteps, what the SD3
transformer takes); FLUX.1's transformer takes sigma itself (its pipeline passes timestep / 1000), so its
family sets 1.0. FLUX.1 [dev]'s guidance embedding (diffusers' and sd-scripts' training default
`--guidance_scale` 3.5; sd-scripts' LoRA example 1.0) is the family's denoiser input, not the objective's.

Every draw comes from the sample's own generator: a step stays a pure function of (seed, step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from sdlora.errors import ConfigError
from sdlora.train.objective import Objective

SAMPLINGS = ("uniform", "logit_normal", "sigmoid")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
SIGMA_SQRT_FLOOR = 1e-3  # the smallest sigma of the 1000-step schedule


@dataclass(frozen=True)
class ResolutionShift:
    """FLUX.1's resolution-dependent shift: mu linear in the image's token count (diffusers'
    `calculate_shift`, FLUX.1's scheduler config), `patch` latent cells per token side (FLUX packs 2x2)."""

    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    patch: int = 2

    def seq_len(self, latent_shape: Sequence[int]) -> int:
        """Image tokens of a (C, H, W) latent: (H / patch) * (W / patch)."""
        height, width = latent_shape[-2:]
        return (int(height) // self.patch) * (int(width) // self.patch)

    def mu(self, seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return seq_len * slope + self.base_shift - slope * self.base_seq_len


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """The static shift: shift * s / (1 + (shift - 1) * s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift_exponential(sigmas: Tensor, mu: float) -> Tensor:
    """e^mu / (e^mu + (1 / s - 1)): sigma 0 stays 0, 1 stays 1."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


@dataclass(frozen=True)
class FlowMatching(Objective):
    """The flow-matching objective; defaults are diffusers' FLUX LoRA script's (uniform, no shift, no weights)."""

    sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigmoid_scale: float = 1.0
    shift: float | None = None  # a fixed shift
    resolution_shift: ResolutionShift | None = None  # FLUX.1's; not with `shift`
    weighting: str = "none"
    timestep_scale: float = 1000.0
    prediction_type: str = "flow_matching"

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"unknown timestep sampling {self.sampling!r} (one of {', '.join(SAMPLINGS)})")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown loss weighting {self.weighting!r} (one of {', '.join(WEIGHTINGS)})")
        if self.shift is not None and not self.shift > 0:
            raise ConfigError(f"the timestep shift must be positive (3.0 is SD3's and sd-scripts'), got {self.shift}")
        if self.shift is not None and self.resolution_shift is not None:
            raise ConfigError("a fixed timestep shift and the resolution-dependent shift exclude each other")
        if not (self.logit_std > 0 and self.sigmoid_scale > 0):
            raise ConfigError("logit_std and sigmoid_scale must be positive")

    def sample_timesteps(self, generator: torch.Generator, n: int, latent_shape: Sequence[int]) -> Tensor:
        """`n` sigmas in [0, 1] (float32, on the CPU) for latents of `latent_shape`."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        gen_device = generator.device if generator is not None else torch.device("cpu")
        if self.sampling == "sigmoid":
            sigmas = torch.sigmoid(self.sigmoid_scale * torch.randn((n,), generator=generator, device=gen_device))
        else:
            scheme = "logit_normal" if self.sampling == "logit_normal" else "none"
            sigmas = compute_density_for_timestep_sampling(
                scheme, n, self.logit_mean, self.logit_std, device=gen_device, generator=generator
            )
        return self.shifted(sigmas.float().cpu(), latent_shape)

    def shifted(self, sigmas: Tensor, latent_shape: Sequence[int]) -> Tensor:
        """`sigmas` after the fixed or the resolution-dependent shift (unchanged without either)."""
        if self.shift is not None:
            return shift_sigmas(sigmas, self.shift)
        if self.resolution_shift is not None:
            rs = self.resolution_shift
            return time_shift_exponential(sigmas, rs.mu(rs.seq_len(latent_shape)))
        return sigmas

    def validation_timesteps(self, count: int) -> Tensor:
        """Evenly spaced sigmas (k + 0.5) / count, unshifted: the same for every sampling setting, so
        validation losses compare across them."""
        return (torch.arange(count, dtype=torch.float32) + 0.5) / count

    def noisy_input(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        sigma = _per_sample(t, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def target(self, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - latents

    def loss_weights(self, t: Tensor) -> Tensor | None:
        if self.weighting == "none":
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        sigmas = t.float().clamp(min=SIGMA_SQRT_FLOOR) if self.weighting == "sigma_sqrt" else t.float()
        return compute_loss_weighting_for_sd3(self.weighting, sigmas)

    def model_timesteps(self, t: Tensor) -> Tensor:
        return t * self.timestep_scale


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """(B,) sigmas shaped to broadcast over (B, ...) latents, in their dtype and on their device."""
    return t.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
