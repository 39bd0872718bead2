"""The world's CLIP: an open_clip ViT + text transformer trained contrastively on scene-caption pairs.

Its image and text towers together are the world's CLIP scorer (an open_clip `local-dir:` folder,
what evaluate/clip.py loads); its text tower, converted to transformers' CLIPTextModel, is
world-sd's text encoder, as OpenAI's CLIP text tower is SD 1.x's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sdlora.world.trainers import common, pool
from sdlora.world.trainers.tokenizer import CONTEXT, vocab_size, world_tokenizer

NAME = "world-clip"
SEED = 1
STEPS = 2000  # about 0.5 s a step: done before phase A's VAE (1500 x 0.65-0.85 s)
BATCH = 64
LR = 5e-4
WARMUP = 50
WEIGHT_DECAY = 0.1
WIDTH = 128  # the text tower's width: world-sd's cross-attention width
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's (OpenAI's) defaults, what its transform uses
STD = (0.26862954, 0.26130258, 0.27577711)


def model_config() -> dict:
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": pool.SIZE, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32},
        "text_cfg": {
            "context_length": CONTEXT,
            "vocab_size": vocab_size(),
            "width": WIDTH,
            "heads": 4,
            "layers": 4,
            # Any name makes open_clip read the tokenizer files of a local-dir: folder (ours).
            "hf_tokenizer_name": NAME,
        },
    }


def build_model() -> torch.nn.Module:
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return open_clip.CLIP(**model_config())


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, 32, 32, 3) -> what open_clip's inference transform gives for a 32 px image."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


class Tokens:
    """Caption -> token ids (77,), each tokenized once."""

    def __init__(self):
        self.tokenizer = world_tokenizer()
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(
                missing, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt"
            )
            self.cache.update(zip(missing, ids.input_ids))
        return torch.stack([self.cache[c] for c in captions])


def encode_text(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's `encode_text(ids, normalize=True)`, run only over the positions up to the longest
    caption's end token: the mask is causal, so the padding after it changes nothing (4x less work)."""
    from open_clip.transformer import text_global_pool

    n = int(ids.argmax(1).max()) + 1  # the end token has the highest id
    x = model.token_embedding(ids[:, :n]) + model.positional_embedding[:n]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = text_global_pool(x, ids[:, :n], model.text_pool_type) @ model.text_projection
    return torch.nn.functional.normalize(x, dim=-1)


def train(out: Path, scale: float = 1.0) -> torch.nn.Module:
    common.one_thread()
    data = pool.load_pool(out, scale)
    model = build_model().train()
    opt = common.adamw(model, LR, WEIGHT_DECAY)
    tokens = Tokens()

    def step(i: int):
        images, captions = pool.sample_batch(data, common.step_rng(SEED, i), BATCH)
        img = model.encode_image(normalise(images), normalize=True)
        txt = encode_text(model, tokens(captions))
        logits = model.logit_scale.exp() * img @ txt.T
        # Scenes with the same caption are positives of each other (the pool repeats compositions).
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = (
            torch.sum(-target * logits.log_softmax(1), 1).mean()
            + torch.sum(-target * logits.T.log_softmax(1), 1).mean()
        ) / 2
        acc = float((logits.argmax(1) == torch.arange(len(captions))).float().mean())
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: a temperature of 1/100
        return loss, {"acc": acc}

    trainer = common.Trainer(
        NAME,
        model,
        opt,
        common.scaled(STEPS, scale),
        LR,
        common.scaled(WARMUP, scale),
        out / common.WORK / f"{NAME}.pt",
    )
    trainer.run(step)
    return model.eval()


def text_encoder_config():
    from transformers import CLIPTextConfig

    tok = world_tokenizer()
    text = model_config()["text_cfg"]
    return CLIPTextConfig(
        vocab_size=text["vocab_size"],
        hidden_size=text["width"],
        intermediate_size=text["width"] * 4,
        num_hidden_layers=text["layers"],
        num_attention_heads=text["heads"],
        max_position_embeddings=text["context_length"],
        hidden_act="gelu",  # open_clip's nn.GELU (not OpenAI's QuickGELU)
        layer_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=model_config()["embed_dim"],
    )


def text_encoder(model: torch.nn.Module, projection: bool = False):
    """The CLIP's text tower as a transformers CLIPTextModel (last_hidden_state = open_clip's ln_final output);
    `projection`: as a CLIPTextModelWithProjection, whose text_embeds are open_clip's `encode_text` before
    its normalising (world-sdxl's second text encoder)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sd = model.state_dict()
    new = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
    }
    for i in range(model_config()["text_cfg"]["layers"]):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for name in ("weight", "bias"):
            q, k, v = sd[src + f"attn.in_proj_{name}"].chunk(3)
            new |= {
                dst + f"self_attn.q_proj.{name}": q,
                dst + f"self_attn.k_proj.{name}": k,
                dst + f"self_attn.v_proj.{name}": v,
            }
            for a, b in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                new[dst + f"{b}.{name}"] = sd[src + f"{a}.{name}"]
    if projection:
        encoder = CLIPTextModelWithProjection(text_encoder_config())
        encoder.text_projection.weight.data.copy_(sd["text_projection"].T)  # open_clip: x @ P; a Linear: W x
        target = encoder.text_model
    else:
        encoder = CLIPTextModel(text_encoder_config())
        # transformers 5's CLIPTextModel holds the transformer's modules itself (4.x: under .text_model).
        target = getattr(encoder, "text_model", encoder)
    new = {k.removeprefix("text_model."): v for k, v in new.items()}
    missing, unexpected = target.load_state_dict(new, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"text tower conversion: missing {missing}, unexpected {unexpected}")
    return encoder.eval()


def save_scorer(model: torch.nn.Module, folder: Path) -> None:
    """An open_clip local-dir: folder: open_clip_config.json, open_clip_model.safetensors (fp16), tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_config(),
        "preprocess_cfg": {
            "size": pool.SIZE,
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    world_tokenizer().save_pretrained(folder)


def save(model: torch.nn.Module, out: Path) -> None:
    common.publish(out / NAME, lambda tmp: save_scorer(model, tmp))

    # world-sd's text encoder and tokenizer, picked up by unet.py when it assembles the pipeline.
    def write(tmp: Path) -> None:
        text_encoder(model).to(torch.float16).save_pretrained(tmp / "text_encoder")
        world_tokenizer().save_pretrained(tmp / "tokenizer")

    common.publish(out / common.WORK / "text", write)


def main(argv: list[str] | None = None) -> None:
    common.main(NAME, _build, argv)


def _build(args) -> None:
    if (args.out / NAME).is_dir() and (args.out / common.WORK / "text").is_dir():
        print(f"[{NAME}] already built in {args.out / NAME}", flush=True)
        return
    save(train(args.out, args.steps_scale), args.out)
    print(f"[{NAME}] saved {args.out / NAME}", flush=True)


if __name__ == "__main__":
    main()
