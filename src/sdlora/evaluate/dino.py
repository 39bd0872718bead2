"""DINO image embeddings: the CLS token of a self-supervised ViT, as in the DreamBooth paper.

The embedding is `last_hidden_state[:, 0]` of transformers' ViTModel built without a pooler
head (the final layernorm is applied, nothing after it), L2-normalised. Preprocessing is the
DINO evaluation recipe: shorter side to 256 (bicubic), center crop 224, ImageNet mean/std.
`facebook/dino-vits16` (ViT-S/16) is the paper's model; `facebook/dinov2-small` works the same
way (CLS token, same recipe); `tiny-dino` is a random model for tests and the offline demo.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from sdlora.devices import resolve_device
from sdlora.errors import ModelError
from sdlora.evaluate.hub import cached_revision, folder_fingerprint
from sdlora.evaluate.tiny import SEED, TINY_DINO, tiny_dino
from sdlora.models.hub import hub_error, hub_offline

DEFAULT_DINO = "facebook/dino-vits16"
RESIZE = 256
CROP = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS = (
    f"convert to RGB; resize the shorter side to {RESIZE} (PIL bicubic, antialiased; the longer side "
    f"to int({RESIZE} * long / short)); center crop {CROP}x{CROP}; scale to [0, 1]; "
    f"normalise with ImageNet mean {IMAGENET_MEAN} and std {IMAGENET_STD}"
)
EMBEDDING = "CLS token of the last layer's output after the final layernorm (last_hidden_state[:, 0]), no pooler head; L2-normalised"
# Model types whose last_hidden_state[:, 0] is the CLS token after the final layernorm.
SUPPORTED_TYPES = ("vit", "dinov2", "dinov2_with_registers")


def dino_transform():
    """The DINO evaluation preprocessing as a torchvision transform (PIL image -> 3x224x224 tensor)."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize(RESIZE, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(CROP),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@dataclass
class DinoScorer:
    """A loaded DINO model; `embed` maps PIL images to L2-normalised CLS embeddings (on CPU)."""

    model_id: str
    model: Any = field(repr=False)
    device: torch.device
    revision: str | None = None
    transform: Any = field(default_factory=dino_transform, repr=False)
    kind: str = "dino"

    @property
    def key(self) -> str:
        """Cache key: the model id and the revision its weights came from."""
        return f"dino--{self.model_id}--{self.revision or 'unknown'}"

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def info(self) -> dict[str, Any]:
        import transformers

        return {
            "model": self.model_id,
            "revision": self.revision,
            "architecture": f"{type(self.model).__name__} ({self.model.config.model_type}, "
            f"{self.model.config.num_hidden_layers} layers, hidden {self.dim}, "
            f"patch {self.model.config.patch_size})",
            "library": f"transformers {transformers.__version__}",
            "embedding": EMBEDDING,
            "preprocess": PREPROCESS,
            "dim": self.dim,
        }

    @torch.inference_mode()
    def embed(self, images: Sequence[Any]) -> torch.Tensor:
        pixels = torch.stack([self.transform(im) for im in images]).to(self.device)
        cls = self.model(pixel_values=pixels).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls.float(), dim=-1).cpu()


def load_dino(model_id: str = DEFAULT_DINO, device: str | torch.device | None = None) -> DinoScorer:
    """Load a DINO scorer (hub id, local folder, or `tiny-dino`); ModelError if it cannot be had."""
    return _load(model_id, str(resolve_device(device)))


@functools.lru_cache(maxsize=2)
def _load(model_id: str, device: str) -> DinoScorer:
    if model_id == TINY_DINO:
        return DinoScorer(TINY_DINO, tiny_dino().to(device), torch.device(device), revision=f"random-seed-{SEED}")
    from transformers import AutoConfig, AutoModel, ViTModel

    from sdlora.world.shipped import shipped_folder

    world = shipped_folder(model_id)  # world-dino: a ViTModel folder shipped in the package
    name, model_id = model_id, str(world) if world is not None else model_id
    if not Path(model_id).is_dir():
        hub_offline()
    try:
        config = AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        raise _error(model_id, exc) from exc
    if config.model_type not in SUPPORTED_TYPES:
        raise ModelError(
            f"--dino-model {model_id}: a {config.model_type!r} model; use a ViT or DINOv2 model "
            f"(e.g. {DEFAULT_DINO} or facebook/dinov2-small)"
        )
    try:
        if config.model_type == "vit":
            model = ViTModel.from_pretrained(model_id, add_pooling_layer=False)
        else:
            model = AutoModel.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        raise _error(model_id, exc) from exc
    revision = (
        folder_fingerprint(Path(model_id)) if Path(model_id).is_dir() else cached_revision(model_id, ("config.json",))
    )
    return DinoScorer(name, model.eval().to(device), torch.device(device), revision=revision)


def _error(model_id: str, exc: BaseException) -> ModelError:
    return hub_error(f"scorer model {model_id}", exc, f"or use --dino-model {TINY_DINO} for an offline try")
