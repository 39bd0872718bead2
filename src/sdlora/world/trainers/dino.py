"""The world's DINO-style ViT: a transformers ViTModel trained with an object-identity objective.

Not DINO's self-distillation: the world knows which object is in each scene, so the ViT learns
identity directly. Each step renders BATCH base objects twice, each time in a different scene
(background, place, size, turn, light, blur, noise), and an InfoNCE loss pulls the two CLS
embeddings of an object together and pushes other objects' apart (objects of the same
composition count as the same identity). The input is the DINO scorer's own preprocessing
(evaluate/dino.py: 256 bicubic, centre crop 224, ImageNet mean/std) of a 32 px render, and the
embedding is the scorer's (last_hidden_state[:, 0], no pooler), so the scorer loads it as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdlora.world.trainers import common, pool

NAME = "world-dino"
SEED = 4
STEPS = 2000  # about 0.65 s a step (rendering included): done before phase B's UNet (4000 x 0.45 s)
BATCH = 32  # objects per step, two views each
LR = 5e-4
WARMUP = 50
WEIGHT_DECAY = 0.05
TEMPERATURE = 0.1


def config():
    from transformers import ViTConfig

    from sdlora.evaluate.dino import CROP

    return ViTConfig(
        image_size=CROP,
        patch_size=28,  # 8x8 patches of the 224 px crop: 4x4 pixels of the 32 px scene each
        num_channels=3,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        qkv_bias=True,
    )


def build_model():
    from transformers import ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return ViTModel(config(), add_pooling_layer=False)


def views(step: int) -> tuple[torch.Tensor, list[str]]:
    """(2 * BATCH, 3, 224, 224) scorer-preprocessed renders, view pairs at i and BATCH + i, and the
    composition of each object."""
    from sdlora.evaluate.dino import dino_transform
    from sdlora.world.objects import sample_base
    from sdlora.world.scenes import sample_scene

    rng, transform = common.step_rng(SEED, step), dino_transform()
    objects = [sample_base(rng) for _ in range(BATCH)]
    images = [sample_scene(rng, pool.SIZE, obj=obj).image for _ in range(2) for obj in objects]
    return torch.stack([transform(im) for im in images]), [repr(o.composition) for o in objects]


def train(out: Path, scale: float = 1.0):
    common.one_thread()
    model = build_model().train()
    opt = common.adamw(model, LR, WEIGHT_DECAY)

    def step(i: int):
        pixels, identity = views(i)
        cls = torch.nn.functional.normalize(model(pixel_values=pixels).last_hidden_state[:, 0], dim=-1)
        a, b = cls[:BATCH], cls[BATCH:]
        logits = a @ b.T / TEMPERATURE
        same = torch.tensor([[x == y for y in identity] for x in identity], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = (
            torch.sum(-target * logits.log_softmax(1), 1).mean()
            + torch.sum(-target * logits.T.log_softmax(1), 1).mean()
        ) / 2
        acc = float((logits.argmax(1) == torch.arange(BATCH)).float().mean())
        return loss, {"acc": acc}

    steps = common.scaled(STEPS, scale)
    common.Trainer(NAME, model, opt, steps, LR, common.scaled(WARMUP, scale), out / common.WORK / f"{NAME}.pt").run(
        step
    )
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    common.main(NAME, _build, argv)


def _build(args) -> None:
    common.build_once(NAME, args.out / NAME, lambda: train(args.out, args.steps_scale))


if __name__ == "__main__":
    main()
