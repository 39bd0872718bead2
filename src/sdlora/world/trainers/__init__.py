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
"""
