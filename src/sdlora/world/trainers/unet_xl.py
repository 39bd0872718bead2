"""The world's SDXL-architecture UNet, then world-sdxl, a StableDiffusionXLPipeline folder.

SDXL's conditioning on the world's parts: two text encoders, both the world CLIP's text tower (as
SDXL's are two CLIPs; the second, `CLIPTextModelWithProjection`, gives the pooled text: the CLIP's own
text embedding), whose penultimate hidden states are concatenated (77x256); the UNet adds the pooled
text and six size ids (`addition_embed_type="text_time"`) to its time embedding. The same VAE latents,
batches, noise schedule, caption dropout and EMA as world-sd's UNet (unet.py's `noised_batch`). A
dropped caption gets zero embeddings, which is what SDXL's pipelines use for the empty prompt
(`force_zeros_for_empty_prompt`).

The size ids vary as a user's photos make them: `sdlora train` gives each photo's original size and
crop (a 640x480 world photo cropped to 32x32 gives (480, 640, 0, 80, 32, 32)); the pool's scenes are
32 px, so the ids here are drawn at random and the UNet learns they say nothing about the image.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from sdlora.world.trainers import clip, common, pool, unet

NAME = "unet_xl"
PIPELINE = "world-sdxl"
SEED = 5
STEPS = 3000  # batches of unet.BATCH, as world-sd's UNet
LR = 3e-4
WARMUP = 100
TIME_EMBED = 8  # addition_time_embed_dim (SDXL's: 256)
ORIGINAL_SIDES = (32, 1024)  # the range of original sides drawn for the size ids
CROP_MAX = 128  # crop offsets drawn from 0..CROP_MAX


def build_model():
    from diffusers import UNet2DConditionModel

    projection = clip.model_config()["embed_dim"]
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
            cross_attention_dim=2 * clip.WIDTH,  # both encoders' hidden states, concatenated
            attention_head_dim=8,
            norm_num_groups=16,
            use_linear_projection=True,  # SDXL's
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED,
            projection_class_embeddings_input_dim=projection + 6 * TIME_EMBED,  # pooled text + 6 size ids
        )


def text_encoders(out: Path):
    """(text_encoder, text_encoder_2): the world CLIP's text tower, without and with its projection, from
    the world-clip folder clip.py publishes."""
    import open_clip
    from safetensors.torch import load_file

    from sdlora.errors import ModelError

    folder = out / clip.NAME
    if not folder.is_dir():
        raise ModelError(f"{folder}: missing; build it first (python -m sdlora.world build --only clip)")
    model = open_clip.CLIP(**clip.model_config())
    model.load_state_dict({k: v.float() for k, v in load_file(str(folder / "open_clip_model.safetensors")).items()})
    return clip.text_encoder(model), clip.text_encoder(model, projection=True)


class Conditioning:
    """Caption -> SDXL's prompt embeddings (77, 256) and pooled text (64,), each encoded once (kept fp16);
    "" (a dropped caption) -> zeros."""

    def __init__(self, encoders, tokenizer):
        self.encoders, self.tokenizer = encoders, tokenizer
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from sdlora.models.families.sdxl import SDXL

        missing = [c for c in dict.fromkeys(captions) if c not in self.cache and c]
        if missing:
            ids = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            embeds, pooled = SDXL.encode_tokens(self.encoders, [ids, ids])  # what sdlora's training encodes
            self.cache.update(zip(missing, zip(embeds.half(), pooled.half())))
        if "" in captions and "" not in self.cache:
            embeds, pooled = next(iter(self.cache.values()))
            self.cache[""] = (torch.zeros_like(embeds), torch.zeros_like(pooled))
        embeds, pooled = zip(*(self.cache[c] for c in captions))
        return torch.stack(embeds).float(), torch.stack(pooled).float()


def size_ids(rng, batch: int) -> torch.Tensor:
    """(batch, 6) size ids: a random original size and crop, the 32 px target (module docstring)."""
    original = rng.integers(ORIGINAL_SIDES[0], ORIGINAL_SIDES[1] + 1, size=(batch, 2))
    crop = rng.integers(0, CROP_MAX + 1, size=(batch, 2))
    target = torch.full((batch, 2), float(pool.SIZE))
    return torch.cat([torch.from_numpy(original).float(), torch.from_numpy(crop).float(), target], dim=1)


def train(out: Path, scale: float = 1.0):
    common.one_thread()
    autoencoder, _, tokenizer = unet.load_parts(out)
    encoders = text_encoders(out)
    data = pool.load_pool(out, scale)
    means, stds = unet.encode_pool(autoencoder, data)
    factor = autoencoder.config.scaling_factor
    condition = Conditioning(encoders, tokenizer)
    noise_schedule = unet.scheduler()
    model = build_model().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = common.adamw(model, LR)

    def step(i: int):
        rng, captions, noisy, noise, t = unet.noised_batch(SEED, i, data, (means, stds, factor), noise_schedule)
        embeds, pooled = condition(captions)
        added = {"text_embeds": pooled, "time_ids": size_ids(rng, unet.BATCH)}
        pred = model(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        return torch.nn.functional.mse_loss(pred, noise)

    steps = common.scaled(STEPS, scale)
    ckpt = out / common.WORK / f"{NAME}.pt"
    trainer = common.Trainer(
        NAME, model, opt, steps, LR, common.scaled(WARMUP, scale), ckpt, ema=ema, ema_decay=unet.EMA_DECAY
    )
    trainer.run(step)
    return ema, autoencoder, encoders, tokenizer


def pipeline(model, autoencoder, encoders, tokenizer):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        unet=model,
        vae=autoencoder,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=DPMSolverMultistepScheduler.from_config(unet.scheduler().config),
        force_zeros_for_empty_prompt=True,  # what it was trained with for a dropped caption
        add_watermarker=False,
    )


main = common.pipeline_main(NAME, PIPELINE, train, pipeline)


if __name__ == "__main__":
    main()
