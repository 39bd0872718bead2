"""`python -m sdlora.world build`: the world's base models, trained from seeds on its scenes.

One module per model, each with its config declared once and a seeded trainer that prints its
curve, checkpoints (so an interrupted build resumes where it stopped, bit for bit) and saves in
its library's real format, fp16, into the output folder:

    <out>/world-sd/     a diffusers StableDiffusionPipeline folder (model_index.json): the CLIP's
                        text tower as text_encoder + the world's CLIPTokenizer, vae.py's
                        AutoencoderKL, unet.py's UNet2DConditionModel, a DDPMScheduler
    <out>/world-sdxl/   a diffusers StableDiffusionXLPipeline folder: the same VAE and tokenizer (twice), the
                        CLIP's text tower twice (the second with its projection: the pooled text),
                        unet_xl.py's SDXL-architecture UNet2DConditionModel
    <out>/world-flux/   a diffusers FluxPipeline folder: flux.py's FLUX.1 [dev]-architecture transformer
                        (guidance-distilled), the CLIP's text tower as CLIP-L, a T5 encoder and T5 tokenizer
                        of the world's words, the same VAE with FLUX's shift_factor
    <out>/world-clip/   the CLIP as an open_clip local folder (open_clip_config.json, weights,
                        tokenizer): `score --clip-model local-dir:<out>/world-clip`
    <out>/world-dino/   a transformers ViTModel folder: `score --dino-model <out>/world-dino`
    <out>/work/         the rendered scene pool and the trainers' checkpoints (not shipped)

The build runs in phases of one-thread processes side by side (orchestrate.py): 0 renders the
scene pool (two shards), A trains the VAE and the CLIP, B the UNet (on the VAE's latents and the
CLIP text tower's embeddings) and the DINO-style ViT, C the SDXL-architecture UNet and the FLUX.1-architecture
transformer.

The shipped weights are this build's, run on 2026-12-06 (`python -m sdlora.world build`) on the shared
2-core machine beside other work: 74.6 minutes in all. One thread per process; CPU seconds per step
from each trainer's printed curve (about the wall time on an idle core):

    0      pool: 6,000 scenes a shard, ~14 ms each                                          ~2 min
    A      vae  1500 steps x 0.56-0.85 s (batch 32)  31 min  |  clip 2000 x 0.40-0.57 s (batch 64)
    B      unet 4000 steps x 0.40-0.60 s (batch 32, EMA) 41 min  |  dino 2000 x 0.60-0.78 s (32 pairs)
    C      unet_xl 3000 steps x 0.41-0.58 s (batch 32, EMA)  34 min, run afterwards with --only unet_xl
           beside benchmarks (2026-12-06)  |  flux 3000 teacher steps x 0.47-0.55 s (batch 32, EMA), then
           1000 distillation steps x 0.72-0.87 s  39 min, run alone afterwards (`python -m
           sdlora.world.trainers.flux`, 2026-12-06, beside tests); a build from scratch is about 115 minutes

Where each ended: the VAE at 26.9 dB PSNR on its batches, the CLIP at 97% in-batch caption
accuracy, the ViT at 82% in-batch identity accuracy, the UNet and the SDXL UNet at an epsilon loss of
0.19, the FLUX teacher at a velocity loss of 0.73 and its distillation at 0.13. Half the steps of the first plan (3000 / 4000 / 8000 / 4000 over a 24,000-scene pool, ~95 minutes on idle
cores) so that the build fits a working session; the base model already draws what it is asked
(docs/world.md). Shipped sizes, fp16: world-sd 12 MB (UNet 8.2, text encoder 1.8, VAE 1.3),
world-sdxl 14 MB (UNet 8.9, two text encoders 1.8 each, VAE 1.3), world-flux 7.8 MB (transformer 4.6, CLIP 1.8,
T5 0.2, VAE 1.3), world-clip 3.4 MB, world-dino 2.2 MB: 38 MB in all.
"""
