"""Small random-weight models of the real SD 1.x, SDXL, FLUX.1, FLUX.2 [klein] and Z-Image architectures,
built in memory, and the T5 and Qwen tokenizers the transformer families need, built without the hub.

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
from typing import Any, Sequence

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


def _vae(scaling_factor: float, latent_channels: int = 4, **extra: Any):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=latent_channels,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
        **extra,
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


# A word-level T5 vocabulary for the tiny FLUX.1's second tokenizer: SentencePiece's Unigram pieces ("▁" starts
# a word), each word of the test prompts whole, any other text spelled out in characters.
_T5_WORDS = "a an the photo picture of sks toy dog cat person on in at with and style".split()
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def t5_tokenizer(model_max_length: int = 512, words: Sequence[str] = _T5_WORDS):
    """A T5 tokenizer (`T5TokenizerFast`: <pad> 0, </s> 1, <unk> 2, a </s> after each text) over a small
    Unigram vocabulary of `words` (whole) and characters, built in memory with `tokenizers` (no hub, no
    SentencePiece file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    vocab += [("\u2581" + word, -3.0) for word in words] + [(c, -8.0) for c in _T5_CHARS]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


# Qwen3's chat template reduced to what the FLUX.2 [klein] and Z-Image pipelines render: one user message,
# the assistant's turn opened, and (enable_thinking=False) the empty think block Qwen3 then writes.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def qwen_tokenizer(model_max_length: int = 512):
    """A Qwen2 tokenizer (`Qwen2TokenizerFast`, the class Qwen3 uses) over a byte-level BPE with no merges
    (every byte a token, then Qwen's special tokens), with the chat template above and <|endoftext|> as the
    pad token, built in memory with `tokenizers` (no hub): for the tiny FLUX.2 [klein] and Z-Image models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(byte_chars))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer


def t5_encoder(vocab_size: int, d_model: int, d_kv: int, d_ff: int, buckets: int, max_distance: int = 128):
    """A T5 v1.1 encoder (`T5EncoderModel`, gated GELU, as FLUX.1's T5-XXL) of the given size, random weights:
    pad id 0 and end id 1, as `t5_tokenizer` numbers them."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=max_distance,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def flux_dev_scheduler():
    """FLUX.1 [dev]'s scheduler config: flow matching with dynamic shifting, base_shift 0.5 / max_shift 1.15 over
    256..4096 image tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


@_seeded
def tiny_flux():
    """A FluxPipeline (FLUX.1 [dev]'s architecture) with tiny random weights: a 1 + 1 block transformer
    with the guidance embedding, a 16-channel VAE, CLIP and T5 text encoders, and FLUX.1-dev's
    flow-matching scheduler config (dynamic shifting, base_shift 0.5 / max_shift 1.15 over 256..4096 tokens).
    `--model tiny-flux` (models/families/flux.py)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer_2 = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2 x 2 packed cells
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's d_model
        pooled_projection_dim=32,  # CLIP's pooled output
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )
    vae = _vae(  # FLUX.1's VAE: 16 latent channels, its scale and shift, no quant convs
        0.3611, latent_channels=16, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    )
    return FluxPipeline(
        scheduler=flux_dev_scheduler(),
        vae=vae,
        text_encoder=CLIPTextModel(_text_config(32, 32)).eval(),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, buckets=8),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
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


@_seeded
def tiny_zimage():
    """A ZImagePipeline (Z-Image's architecture) with tiny random weights: a 2-layer transformer with one noise
    and one context refiner block, 2x2 patches of a 16-channel VAE with FLUX.1's scale and shift (Z-Image's VAE),
    a 2-layer Qwen3 text encoder over `qwen_tokenizer`, and Z-Image-Turbo's scheduler config (static shift 3.0).
    `--model tiny-zimage` (models/families/zimage.py)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_tokenizer()
    transformer = ZImageTransformer2DModel(
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,  # Qwen3's hidden size
        axes_dims=[4, 4, 8],  # sums to the head width, dim / n_heads
    )
    qwen3 = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    vae = _vae(0.3611, latent_channels=16, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=Qwen3Model(qwen3).eval(),
        tokenizer=tokenizer,
        transformer=transformer,
    )


@_seeded
def tiny_flux2_klein(text_layers: tuple[int, ...]):
    """A Flux2KleinPipeline (FLUX.2 [klein] base's architecture: no guidance embedding, true CFG) with tiny
    random weights: a 1 + 1 block transformer, an 8-channel Flux2 VAE whose latents are patchified 2 x 2 into
    32 channels and normalised by its batch-norm statistics (set here to values other than 0 and 1, so the
    normalisation shows), and a 16-wide Qwen3 over the offline Qwen tokenizer with one layer more than the
    deepest of `text_layers`, the layers the prompt embedding reads (so each is an intermediate layer's output, as in the real 36-layer
    Qwen3-4B, and the pipeline runs at its default layers). `--model tiny-flux2-klein` (models/families/flux2.py)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    width, latent_channels = 16, 8
    qwen = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=32,
        num_hidden_layers=max(text_layers) + 1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_cache=False,
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,  # 2 x 2 patchified latent channels
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=width * len(text_layers),  # the stacked hidden states
        axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim
        guidance_embeds=False,  # [klein]: no guidance distillation
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        sample_size=TINY_RESOLUTION,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    channels = vae.bn.running_mean.shape[0]
    vae.bn.running_mean.copy_(0.1 * torch.randn(channels))
    vae.bn.running_var.copy_(0.5 + torch.rand(channels))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,  # the pipeline passes its own mu (compute_empirical_mu)
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=Qwen3ForCausalLM(qwen).eval(),
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )
