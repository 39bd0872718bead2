"""`python -m sdlora.world build`: the world's base models, trained from seeds on its scenes.

One module per model, each with its config declared once and a seeded trainer that prints its
curve, checkpoints (so an interrupted build resumes where it stopped, bit for bit) and saves in
its library's real format, fp16, into the output folder:

    <out>/world-sd/     a diffusers StableDiffusionPipeline folder (model_index.json): the CLIP's
                        text tower as text_encoder + the world's CLIPTokenizer, vae.py's
                        AutoencoderKL, unet.py's UNet2DConditionModel, a DDPMScheduler
    <out>/world-clip/   the CLIP as an open_clip local folder (open_clip_config.json, weights,
                        tokenizer): `score --clip-model local-dir:<out>/world-clip`
    <out>/world-dino/   a transformers ViTModel folder: `score --dino-model <out>/world-dino`
    <out>/work/         the rendered scene pool and the trainers' checkpoints (not shipped)

The build runs in phases of two one-thread processes side by side (orchestrate.py): 0 renders the
scene pool (two shards), A trains the VAE and the CLIP, B the UNet (on the VAE's latents and the
CLIP text tower's embeddings) and the DINO-style ViT.

Measured 2026-12-06 on the shared 2-core machine (load about 3), one thread, CPU seconds per step
(about the wall time on an idle core), from each trainer's printed curve:

    0      pool: 12,000 scenes a shard, ~14 ms each                                    ~3 min
    A      vae  3000 steps x 0.65-0.70 s (batch 32)   ~35 min  |  clip 4000 x 0.44 s (batch 64)   ~29 min
    B      unet 8000 steps x 0.42 s (batch 32, EMA)   ~56 min  |  dino 4000 x 0.74 s (32 pairs)   ~49 min

so the whole build takes about 3 + 35 + 56 = ~95 minutes on two idle cores. Two processes that
share the cores with other work slow down (0.61 s a UNet step with a third process running).
Shipped sizes, fp16: world-sd 12 MB (UNet 8.2, text encoder 1.8, VAE 1.3), world-clip 3.4 MB,
world-dino 2.2 MB.
"""
