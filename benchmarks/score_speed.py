"""How fast `sdlora score` embeds images: images/s per scorer, batched vs one at a time.

Scorers (random weights; the compute is the same as with the real weights):
  tiny-dino, tiny-clip   the test/demo models
  dino-vits16            transformers ViTModel in the ViT-S/16 layout of facebook/dino-vits16
                         (12 layers, hidden 384, 6 heads), no pooler head
  clip-vit-b-32          open_clip ViT-B-32 (12 layers, width 768, patch 32), QuickGELU as with
                         the OpenAI weights, with open_clip's own transform
Each timing is the real embedding path (`embed_files`): decode the PNG, the scorer's preprocess
(resize 256/224 bicubic, center crop, normalise), forward, L2-normalise; the embedding cache is
in memory and empty, so every image is embedded. Images are 512 px PNGs (SD 1.5 sample size).
Run from the repository root:

    python benchmarks/score_speed.py                       # all four scorers, 64 images, batch 32
    python benchmarks/score_speed.py --scorers tiny --images 32 --threads 1
    python benchmarks/score_speed.py --device cuda --images 256

The figures depend on what else runs on the machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_images(folder: Path, count: int, size: int) -> list[Path]:
    """Photo-like PNGs: smooth colour fields with noise (PNG decode cost close to real samples)."""
    from PIL import Image

    paths = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        rng = np.random.default_rng(i)
        base = np.stack([np.sin(xx * rng.uniform(2, 9) + c) * np.cos(yy * rng.uniform(2, 9)) for c in range(3)], -1)
        pixels = ((base * 0.5 + 0.5) * 220 + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)
        paths.append(folder / f"img{i:04d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def build_scorers(names: list[str], device: str):
    from transformers import ViTConfig, ViTModel

    from sdlora.evaluate.clip import ClipScorer, _quiet_logging, load_clip
    from sdlora.evaluate.dino import DinoScorer, load_dino

    scorers = {}
    for name in names:
        if name == "tiny-dino":
            scorers[name] = load_dino("tiny-dino", device)
        elif name == "tiny-clip":
            scorers[name] = load_clip("tiny-clip", None, device)
        elif name == "dino-vits16":
            config = ViTConfig(
                image_size=224,
                patch_size=16,
                hidden_size=384,
                num_hidden_layers=12,
                num_attention_heads=6,
                intermediate_size=1536,
                qkv_bias=True,
            )
            model = ViTModel(config, add_pooling_layer=False).eval().to(device)
            scorers[name] = DinoScorer("dino-vits16 (random)", model, torch.device(device), revision="random")
        elif name == "clip-vit-b-32":
            import open_clip

            with _quiet_logging():  # "no pretrained weights loaded": intended here
                model, _, preprocess = open_clip.create_model_and_transforms(
                    "ViT-B-32", pretrained=None, device=device, force_quick_gelu=True
                )
            scorers[name] = ClipScorer(
                "ViT-B-32 (random)",
                None,
                model.eval(),
                preprocess,
                open_clip.get_tokenizer("ViT-B-32"),
                torch.device(device),
                revision="random",
            )
        else:
            raise SystemExit(f"unknown scorer {name}")
    return scorers


def images_per_second(scorer, paths: list[Path], batch_size: int, device: str) -> float:
    from sdlora.evaluate.cache import EmbeddingCache
    from sdlora.evaluate.score import embed_files

    digests = [str(i) for i in range(len(paths))]
    scorer.embed(_open(paths[: min(batch_size, 4)]))  # warm-up: first-call allocations, kernels
    _sync(device)
    start = time.perf_counter()
    _, embedded = embed_files(scorer, paths, digests, EmbeddingCache(None, scorer.key, {}), batch_size=batch_size)
    _sync(device)
    assert embedded == len(paths)
    return len(paths) / (time.perf_counter() - start)


def _open(paths: list[Path]):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in paths]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scorers",
        default="all",
        help="all, tiny, real, or a comma list of tiny-dino,tiny-clip,dino-vits16,clip-vit-b-32",
    )
    parser.add_argument("--images", type=int, default=64, help="images per timing")
    parser.add_argument(
        "--single-images", type=int, default=None, help="images for the one-at-a-time timing (default: --images)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=512, help="PNG side in pixels")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    groups = {
        "all": "tiny-dino,tiny-clip,dino-vits16,clip-vit-b-32",
        "tiny": "tiny-dino,tiny-clip",
        "real": "dino-vits16,clip-vit-b-32",
    }
    names = groups.get(args.scorers, args.scorers).split(",")

    from rich.console import Console
    from rich.table import Table

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images, args.size)
        scorers = build_scorers(names, args.device)
        table = Table(
            title=f"images/s embedded on {args.device} ({torch.get_num_threads()} torch threads, "
            f"{args.images} x {args.size} px PNGs, load avg {os.getloadavg()[0]:.1f})",
            title_justify="left",
        )
        for column in ("scorer", "image params", f"batch {args.batch_size}", "one at a time", "speed-up"):
            table.add_column(column, justify="left" if column == "scorer" else "right")
        for name, scorer in scorers.items():
            model = scorer.model.visual if hasattr(scorer.model, "visual") else scorer.model
            params = sum(p.numel() for p in model.parameters())
            batched = images_per_second(scorer, paths, args.batch_size, args.device)
            single = images_per_second(scorer, paths[: args.single_images or args.images], 1, args.device)
            table.add_row(name, f"{params / 1e6:.2f} M", f"{batched:.1f}", f"{single:.1f}", f"{batched / single:.2f}x")
            console.print(f"{name}: batched {batched:.1f} img/s, single {single:.1f} img/s", highlight=False)
    console.print(table)


if __name__ == "__main__":
    main()
