"""The world's FLUX.1-architecture transformer, then world-flux, a FluxPipeline folder: flow matching learns too.

FLUX.1's parts on the world's: a `FluxTransformer2DModel` (2 double-stream + 4 single-stream blocks, 2.4 M
parameters) on the VAE's 16x16x4 latents packed into 8x8 tokens of 2x2 cells; the world CLIP's text tower as
CLIP-L (its pooled output); a small T5 encoder (`T5EncoderModel`, T5 v1.1's gated-GELU) over a T5 tokenizer of
the world's words, whose hidden states the transformer reads token by token.

Trained in two stages, as FLUX.1 [dev] was made from a model that sampled with classifier-free guidance:

1. the teacher: flow matching (velocity noise - x0) with SD3's logit-normal sigmas and FLUX.1's resolution
   shift, one caption in ten dropped to "", the T5 trained with it (the world has no text corpus to pretrain
   it on; FLUX.1's T5 came pretrained and frozen), EMA weights kept;
2. guidance distillation (Meng et al. 2023, https://arxiv.org/abs/2210.03142): a student with the guidance
   embedding, started from the teacher's EMA weights with that embedding's last layer at zero (so it starts as
   the teacher), learns to give in one pass what the teacher gives with guidance g in two:
   v("") + g * (v(caption) - v("")), g drawn from GUIDANCE. The T5 stays as the teacher left it.

world-flux ships the student: [dev]'s architecture, sampled like [dev] (28 steps, the guidance value an input,
no negative prompt), and LoRA-trained like [dev] (sdlora feeds it the training guidance 1.0: the conditional
velocity). The VAE is world-sd's with FLUX's `shift_factor` (the pool latents' mean) and a scaling factor
measured about it; FluxPipeline's scheduler config is FLUX.1 [dev]'s.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from sdlora.world.trainers import common, pool, unet
from sdlora.world.trainers.tokenizer import world_words

NAME = "flux"
PIPELINE = "world-flux"
SEED = 6
STEPS = 3000  # the teacher's, batches of BATCH
DISTILL_STEPS = 1000
BATCH = 32
LR = 5e-4
DISTILL_LR = 2e-4
WARMUP = 100
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999
GUIDANCE = (1.0, 6.0)  # the guidance values distilled, drawn uniformly (FluxPipeline's default 3.5 inside)
T5_WIDTH = 64  # the T5's d_model: the transformer's joint attention width
T5_WINDOW = 32  # positions: a world caption is 10-20 T5 tokens


def t5_tokenizer():
    from sdlora.models.tiny import t5_tokenizer as build

    return build(T5_WINDOW, world_words())


def build_t5(vocab_size: int):
    from sdlora.models.tiny import t5_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return t5_encoder(vocab_size, d_model=T5_WIDTH, d_kv=16, d_ff=128, buckets=16, max_distance=T5_WINDOW)


def build_model(guidance: bool):
    """The transformer: the teacher without the guidance embedding ([schnell]'s inputs), the student with it."""
    from diffusers import FluxTransformer2DModel

    from sdlora.world.trainers import clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * 4,  # 4 latent channels x 2 x 2 packed cells
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=T5_WIDTH,
            pooled_projection_dim=clip.WIDTH,  # the CLIP text tower's pooled output
            guidance_embeds=guidance,
            axes_dims_rope=(8, 12, 12),  # sums to attention_head_dim
        )


def objective():
    """SD3's logit-normal sigmas with FLUX.1's resolution shift (its scheduler's, at 64 tokens: mu 0.47)."""
    from sdlora.train.flow_matching import FlowMatching, ResolutionShift

    return FlowMatching(sampling="logit_normal", resolution_shift=ResolutionShift(), timestep_scale=1.0)


class Prompts:
    """Caption -> (CLIP token ids (77,), T5 token ids (T5_WINDOW,)), each tokenized once; and the CLIP's
    pooled output, encoded once (the CLIP is frozen, as FLUX.1's)."""

    def __init__(self, clip_encoder, clip_tokenizer, t5_tok):
        self.clip_encoder, self.clip_tokenizer, self.t5_tokenizer = clip_encoder, clip_tokenizer, t5_tok
        self.ids: dict[str, torch.Tensor] = {}
        self.pooled: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 ids (B, T5_WINDOW), CLIP pooled (B, 128))."""
        missing = [c for c in dict.fromkeys(captions) if c not in self.ids]
        if missing:
            clip_ids = self.clip_tokenizer(
                missing, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
            t5_ids = self.t5_tokenizer(
                missing, padding="max_length", max_length=T5_WINDOW, truncation=True, return_tensors="pt"
            ).input_ids
            self.ids.update(zip(missing, t5_ids))
            self.pooled.update(zip(missing, self.clip_encoder(clip_ids).pooler_output.half()))
        return torch.stack([self.ids[c] for c in captions]), torch.stack([self.pooled[c] for c in captions]).float()


def velocity(transformer, noisy, sigmas, embeds, pooled, guidance=None):
    """The transformer's velocity for (B, 4, 16, 16) latents, as sdlora's FLUX.1 family runs it."""
    from sdlora.models.families.flux import latent_ids, pack_latents, unpack_latents

    _, _, height, width = noisy.shape
    out = transformer(
        hidden_states=pack_latents(noisy),
        timestep=sigmas,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=torch.zeros(embeds.shape[1], 3),
        img_ids=latent_ids(height, width, noisy.device, noisy.dtype),
        return_dict=False,
    )[0]
    return unpack_latents(out, height, width)


def student_of(teacher):
    """The distillation's student: the teacher's weights, and a guidance embedding whose last layer is zero, so
    that it starts out giving the teacher's velocity whatever the guidance value."""
    student = build_model(guidance=True)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("time_text_embed.guidance_embedder.") for k in missing), missing
    last = student.time_text_embed.guidance_embedder.linear_2
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return student


def latent_stats(means: torch.Tensor, stds: torch.Tensor) -> tuple[float, float]:
    """(shift_factor, scaling_factor): the pool latents' mean, and one over their standard deviation about it
    (the latents being mean + std * noise)."""
    means, stds = means.float(), stds.float()
    shift = float(means.mean())
    return shift, float(1 / (means.var() + stds.pow(2).mean()).sqrt())


def flow_batch(seed: int, i: int, data: pool.Pool, latents: tuple, dropout: float):
    """Step i's batch: (captions, one in `dropout` dropped to "", noisy latents, clean latents, noise, sigmas),
    every draw from (seed, i). `latents` is (means, stds, shift, scale)."""
    means, stds, shift, scale = latents
    rng, gen = common.step_rng(seed, i), common.step_generator(seed, i)
    idx = rng.integers(len(data.captions), size=BATCH)
    captions = ["" if rng.random() < dropout else data.captions[j] for j in idx]
    mean, std = means[idx].float(), stds[idx].float()
    clean = (mean + std * torch.randn(mean.shape, generator=gen) - shift) * scale
    noise = torch.randn(clean.shape, generator=gen)
    flow = objective()
    sigmas = flow.sample_timesteps(gen, BATCH, clean.shape[1:])
    return captions, flow.noisy_input(clean, noise, sigmas), clean, noise, sigmas


def train(out: Path, scale: float = 1.0):
    common.one_thread()
    autoencoder, clip_encoder, clip_tokenizer = unet.load_parts(out)
    data = pool.load_pool(out, scale)
    means, stds = unet.encode_pool(autoencoder, data)
    shift, factor = latent_stats(means, stds)
    autoencoder.register_to_config(shift_factor=shift, scaling_factor=factor)
    print(f"[{NAME}] VAE shift_factor {shift:.5f} scaling_factor {factor:.5f}", flush=True)
    t5_tok = t5_tokenizer()
    prompts = Prompts(clip_encoder, clip_tokenizer, t5_tok)
    stats = (means, stds, shift, factor)

    # 1. the teacher, with its T5
    teacher = torch.nn.ModuleDict({"transformer": build_model(guidance=False), "t5": build_t5(len(t5_tok))}).train()
    ema = copy.deepcopy(teacher).eval().requires_grad_(False)

    def teacher_step(i: int):
        captions, noisy, clean, noise, sigmas = flow_batch(SEED, i, data, stats, CAPTION_DROPOUT)
        ids, pooled = prompts(captions)
        embeds = teacher["t5"](ids).last_hidden_state
        pred = velocity(teacher["transformer"], noisy, sigmas, embeds, pooled)
        return torch.nn.functional.mse_loss(pred, noise - clean)

    steps, warmup = common.scaled(STEPS, scale), common.scaled(WARMUP, scale)
    common.Trainer(
        NAME,
        teacher,
        common.adamw(teacher, LR),
        steps,
        LR,
        warmup,
        out / common.WORK / f"{NAME}.pt",
        ema=ema,
        ema_decay=EMA_DECAY,
    ).run(teacher_step)

    # 2. guidance distillation into the student
    t5, frozen = ema["t5"], ema["transformer"]
    student = student_of(frozen).train()
    embeds_of: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def t5_embeds(captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in embeds_of]
        if missing:
            embeds_of.update(zip(missing, t5(prompts(missing)[0]).last_hidden_state.half()))
        return torch.stack([embeds_of[c] for c in captions]).float()

    def distill_step(i: int):
        seed = SEED + 1000  # draws of their own, not the teacher's batches again
        captions, noisy, _, _, sigmas = flow_batch(seed, i, data, stats, 0.0)
        gen = common.step_generator(seed + 1, i)
        guidance = GUIDANCE[0] + (GUIDANCE[1] - GUIDANCE[0]) * torch.rand(BATCH, generator=gen)
        cond, uncond = t5_embeds(captions), t5_embeds([""] * BATCH)
        pooled, pooled_uncond = prompts(captions)[1], prompts([""] * BATCH)[1]
        with torch.no_grad():
            both = velocity(
                frozen,
                torch.cat([noisy, noisy]),
                torch.cat([sigmas, sigmas]),
                torch.cat([cond, uncond]),
                torch.cat([pooled, pooled_uncond]),
            )
            v_cond, v_uncond = both.chunk(2)
            target = v_uncond + guidance.view(-1, 1, 1, 1) * (v_cond - v_uncond)
        pred = velocity(student, noisy, sigmas, cond, pooled, guidance)
        return torch.nn.functional.mse_loss(pred, target)

    common.Trainer(
        f"{NAME}-distill",
        student,
        common.adamw(student, DISTILL_LR),
        common.scaled(DISTILL_STEPS, scale),
        DISTILL_LR,
        warmup,
        out / common.WORK / f"{NAME}-distill.pt",
    ).run(distill_step)
    return student.eval(), autoencoder, clip_encoder, clip_tokenizer, t5.eval(), t5_tok


def pipeline(transformer, autoencoder, clip_encoder, clip_tokenizer, t5, t5_tok):
    from diffusers import FluxPipeline

    from sdlora.models.tiny import flux_dev_scheduler

    return FluxPipeline(
        scheduler=flux_dev_scheduler(),
        vae=autoencoder,
        text_encoder=clip_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


main = common.pipeline_main(NAME, PIPELINE, train, pipeline)


if __name__ == "__main__":
    main()
