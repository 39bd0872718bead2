"""Small random-weight models of the real SD 1.x and SDXL architectures, built in memory.

They follow diffusers' own test configs (UNet `block_out_channels=(32, 64)`, two-block VAE,
small CLIP text encoders) and use a real CLIP tokenizer built offline from the BPE file that
open_clip ships, so token handling is exactly that of the real models. The weights come from a
fixed seed: every process that builds `tiny-sd` gets the same model, so a LoRA trained on it
in one process samples correctly in another. Their images are noise.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

import torch

from sdlora.fsutil import cache_dir, write_text

TINY_RESOLUTION = 64


@functools.lru_cache(maxsize=1)
def _clip_tokenizer_files() -> tuple[str, str]:
    """vocab.json and merges.txt of the CLIP tokenizer, rebuilt once from open_clip's BPE file."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    folder = cache_dir() / "clip-tokenizer"
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    if vocab_path.is_file() and merges_path.is_file():
        return str(vocab_path), str(merges_path)
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    # Same construction as OpenAI's CLIP SimpleTokenizer: 48,894 merges, 49,408 tokens.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    write_text(vocab_path, json.dumps({t: i for i, t in enumerate(vocab)}))
    write_text(merges_path, "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return str(vocab_path), str(merges_path)


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A real CLIP tokenizer (49,408 tokens, 77 positions), built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_tokenizer_files()
    return CLIPTokenizer(vocab, merges, pad_token=pad_token, model_max_length=77)


def _text_config(hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=49408,
        projection_dim=projection,
        hidden_act="gelu",
    )


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    # The real SD 1.5 / SDXL training noise schedule.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


def _seeded(build):
    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return build(*args, **kwargs)

    return wrapper


# The UNet both tiny models share (diffusers' test config); SDXL adds its conditioning on top.
_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=TINY_RESOLUTION // 2,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)


@_seeded
def tiny_sd():
    """A StableDiffusionPipeline with tiny random weights (about 2 M parameters)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(**_UNET, cross_attention_dim=32)
    return StableDiffusionPipeline(
        unet=unet,
        vae=_vae(0.18215),
        text_encoder=CLIPTextModel(_text_config(32, 32)).eval(),
        tokenizer=clip_tokenizer(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@_seeded
def tiny_sdxl(text_encoder_2_width: int = 32):
    """A StableDiffusionXLPipeline with tiny random weights and two text encoders (the second may be wider,
    as SDXL's 1280 beside 768)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        **_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + text_encoder_2_width,  # 6 time ids x 8 + pooled text
        cross_attention_dim=32 + text_encoder_2_width,  # text encoder 32 + text encoder 2
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(0.13025),
        text_encoder=CLIPTextModel(_text_config(32, 32)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(text_encoder_2_width, text_encoder_2_width)).eval(),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        scheduler=_scheduler(),
    )


TINY_CLIPSEG = "tiny-clipseg"
TINY_CLIPSEG_SIZE = 64  # the processor's input side (the real CLIPSeg: 352)


@_seeded
def tiny_clipseg():
    """(CLIPSegForImageSegmentation, CLIPSegProcessor) with tiny random weights, for `prepare --masks auto`
    tests: 2-layer, 32-wide text and vision towers, the real CLIP tokenizer. Its masks are noise."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessor

    text = _text_config(32, 16).to_dict()
    text.update(num_hidden_layers=2, intermediate_size=64)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=TINY_CLIPSEG_SIZE,
        patch_size=16,
        projection_dim=16,
    )
    config = CLIPSegConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=16,
        extract_layers=(0, 1),
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    model = CLIPSegForImageSegmentation(config).eval()
    image_processor = ViTImageProcessor(
        do_resize=True,
        size={"height": TINY_CLIPSEG_SIZE, "width": TINY_CLIPSEG_SIZE},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return model, CLIPSegProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())
