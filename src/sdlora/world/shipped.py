"""The world's base models, shipped inside the package: `--model world-sd` (or `world-sdxl`, `world-flux`), `--clip-model
world-clip`, `--dino-model world-dino`.

`python -m sdlora.world build` trains them from seeds (world/trainers/); the published folders are
copied into `weights/` here and ship as package data (38 MB, fp16). Each is a folder in its
library's own format, so a name resolves to a folder and the usual loaders read it: diffusers'
pipeline loader, open_clip's `local-dir:`, transformers' `ViTModel`.
A name is looked up before the hub, as the tiny models' names are.
"""

from __future__ import annotations

from pathlib import Path

from sdlora.errors import ModelError

WEIGHTS = Path(__file__).parent / "weights"
MODELS = ("world-sd", "world-clip", "world-dino", "world-sdxl", "world-flux")
# What each is to the rest of sdlora: the base model, the CLIP scorer, the DINO scorer, and the SDXL- and
# FLUX.1-architecture base models.
BASE, CLIP, DINO, BASE_XL, BASE_FLUX = MODELS


def shipped_folder(name: str) -> Path | None:
    """The folder of the shipped world model called `name`; None for any other name. ModelError when
    the name is a world model's but its folder is missing (an install without the package data)."""
    if name not in MODELS:
        return None
    folder = WEIGHTS / name
    if not folder.is_dir():
        raise ModelError(
            f"{name}: not installed with this copy of sdlora ({folder} is missing); "
            "reinstall it, or build the world's models with `python -m sdlora.world build`"
        )
    return folder


def is_world(name: str) -> bool:
    return name in MODELS
