"""The world's VAE: a two-block diffusers AutoencoderKL, 32 px scenes -> 16x16x4 latents.

Trained as benchmarks/world_feasibility.py measured (AdamW, MSE + 1e-6 KL, batch 32: about 23.6 dB
held-out PSNR at 460 steps). Its `scaling_factor` is set after training, as SD's was: one over
the standard deviation of its latents over the pool, so the UNet sees unit-variance latents.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.world.trainers import common, pool

NAME = "vae"
SEED = 2
STEPS = 1500
BATCH = 32
LR = 1e-3
WARMUP = 25
KL_WEIGHT = 1e-6
SCALE_SAMPLES = 1024  # pool scenes that measure the latents' standard deviation


def build_model():
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=16,
            sample_size=pool.SIZE,
        )


def train(out: Path, scale: float = 1.0):
    common.one_thread()
    data = pool.load_pool(out, scale)
    model = build_model().train()
    opt = common.adamw(model, LR)

    def step(i: int):
        images, _ = pool.sample_batch(data, common.step_rng(SEED, i), BATCH)
        x = common.to_pixels(images)
        post = model.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=common.step_generator(SEED, i))
        mse = torch.nn.functional.mse_loss(model.decode(z).sample, x)
        psnr = float(10 * torch.log10(4 / mse.detach()))  # pixels span 2: peak^2 = 4
        return mse + KL_WEIGHT * post.kl().mean(), {"psnr": psnr}

    steps = common.scaled(STEPS, scale)
    common.Trainer(NAME, model, opt, steps, LR, common.scaled(WARMUP, scale), out / common.WORK / f"{NAME}.pt").run(
        step
    )
    model.eval()
    with torch.no_grad():
        n = min(SCALE_SAMPLES, len(data.captions))
        latents = torch.cat(
            [model.encode(common.to_pixels(data.images[i : i + 64])).latent_dist.mean for i in range(0, n, 64)]
        )
    model.register_to_config(scaling_factor=float(1 / latents.std()))
    print(f"[{NAME}] scaling_factor {model.config.scaling_factor:.5f}", flush=True)
    return model


def main(argv: list[str] | None = None) -> None:
    common.main(NAME, _build, argv)


def _build(args) -> None:
    common.build_once(NAME, args.out / common.WORK / NAME, lambda: train(args.out, args.steps_scale))


if __name__ == "__main__":
    main()
