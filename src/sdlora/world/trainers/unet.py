"""The world's UNet: a diffusers UNet2DConditionModel on the VAE's 16x16x4 latents, conditioned on
the CLIP text tower's 77x128 embeddings; then world-sd, the StableDiffusionPipeline folder.

The late-attention 4.2 M UNet of benchmarks/world_feasibility.py (0.42 s/step at 16x16, batch 32):
cross-attention only on the two coarser levels. Epsilon prediction on SD 1.x's noise schedule;
one caption in ten is dropped to "" so classifier-free guidance works; world-sd gets the weights'
exponential moving average (decay EMA_DECAY). The pool's latents are
encoded once (mean and std, sampled per step), the captions' embeddings once each.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from sdlora.world.trainers import clip, common, pool, vae

NAME = "unet"
PIPELINE = "world-sd"
SEED = 3
STEPS = 4000
BATCH = 32
LR = 3e-4
WARMUP = 100
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999


def scheduler():
    from diffusers import DDPMScheduler

    # SD 1.x's training noise schedule.
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def build_model():
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return UNet2DConditionModel(
            sample_size=pool.SIZE // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 128),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=clip.WIDTH,
            attention_head_dim=8,
            norm_num_groups=16,
        )


def parts_path(out: Path) -> tuple[Path, Path]:
    """The VAE (vae.py) and the text encoder + tokenizer (clip.py) the UNet trains on."""
    return out / common.WORK / vae.NAME, out / common.WORK / "text"


def load_parts(out: Path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdlora.errors import ModelError

    vae_dir, text_dir = parts_path(out)
    for path, by in ((vae_dir, "vae"), (text_dir, "clip")):
        if not path.is_dir():
            raise ModelError(f"{path}: missing; build it first (python -m sdlora.world build --only {by})")
    return (
        AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval(),
        CLIPTextModel.from_pretrained(text_dir / "text_encoder", torch_dtype=torch.float32).eval(),
        CLIPTokenizer.from_pretrained(text_dir / "tokenizer"),
    )


@torch.no_grad()
def encode_pool(autoencoder, data: pool.Pool) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's latent means and standard deviations (unscaled), fp16."""
    means, stds = [], []
    for i in range(0, len(data.captions), 64):
        post = autoencoder.encode(common.to_pixels(data.images[i : i + 64])).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
    return torch.cat(means), torch.cat(stds)


class Embeddings:
    """Caption -> the text encoder's last_hidden_state (77, 128), each encoded once (kept fp16)."""

    def __init__(self, encoder, tokenizer):
        self.encoder, self.tokenizer = encoder, tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            self.cache.update(zip(missing, self.encoder(ids).last_hidden_state.half()))
        return torch.stack([self.cache[c] for c in captions]).float()


def noised_batch(seed: int, i: int, data: pool.Pool, latents: tuple, noise_schedule):
    """Step i's batch: (its rng, captions with one in CAPTION_DROPOUT dropped to "", noisy latents, the
    noise, the timesteps). `latents` is (means, stds, scaling factor) from `encode_pool`; every draw comes
    from (seed, i), so a resumed trainer repeats it. The rng goes on for draws a trainer adds after these."""
    means, stds, factor = latents
    rng, gen = common.step_rng(seed, i), common.step_generator(seed, i)
    idx = rng.integers(len(data.captions), size=BATCH)
    captions = ["" if rng.random() < CAPTION_DROPOUT else data.captions[j] for j in idx]
    mean, std = means[idx].float(), stds[idx].float()
    clean = (mean + std * torch.randn(mean.shape, generator=gen)) * factor
    noise = torch.randn(clean.shape, generator=gen)
    t = torch.randint(0, noise_schedule.config.num_train_timesteps, (BATCH,), generator=gen)
    return rng, captions, noise_schedule.add_noise(clean, noise, t), noise, t


def train(out: Path, scale: float = 1.0):
    common.one_thread()
    autoencoder, encoder, tokenizer = load_parts(out)
    data = pool.load_pool(out, scale)
    means, stds = encode_pool(autoencoder, data)
    factor = autoencoder.config.scaling_factor
    embed = Embeddings(encoder, tokenizer)
    noise_schedule = scheduler()
    model = build_model().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # what world-sd ships: smoother samples
    opt = common.adamw(model, LR)

    def step(i: int):
        _, captions, noisy, noise, t = noised_batch(SEED, i, data, (means, stds, factor), noise_schedule)
        pred = model(noisy, t, encoder_hidden_states=embed(captions)).sample
        return torch.nn.functional.mse_loss(pred, noise)

    steps = common.scaled(STEPS, scale)
    ckpt = out / common.WORK / f"{NAME}.pt"
    common.Trainer(NAME, model, opt, steps, LR, common.scaled(WARMUP, scale), ckpt, ema=ema, ema_decay=EMA_DECAY).run(
        step
    )
    return ema, autoencoder, encoder, tokenizer


def pipeline(unet, autoencoder, encoder, tokenizer):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=unet,
        vae=autoencoder,
        text_encoder=encoder,
        tokenizer=tokenizer,
        # The training schedule's betas with a sampler that is good in 20-30 steps (DDPM's is not);
        # training reads only the betas and prediction type (train/objective.py).
        scheduler=DPMSolverMultistepScheduler.from_config(scheduler().config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


main = common.pipeline_main(NAME, PIPELINE, train, pipeline)


if __name__ == "__main__":
    main()
