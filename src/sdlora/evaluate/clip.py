"""CLIP image and text embeddings with open_clip (CLIP-I and CLIP-T of the DreamBooth paper).

Both use the projected embeddings (`encode_image`, `encode_text`: the joint image-text space),
L2-normalised, and open_clip's own inference transform and tokenizer for the chosen model.
Default ViT-B-32 with OpenAI's weights; `tiny-clip` is a random model for tests and the demo.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from sdlora.devices import resolve_device
from sdlora.errors import ModelError
from sdlora.evaluate.hub import cached_revision, folder_fingerprint
from sdlora.evaluate.tiny import SEED, TINY_CLIP, TINY_CLIP_CONFIG, tiny_clip
from sdlora.models.hub import hub_error, hub_offline

DEFAULT_CLIP = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"
IMAGE_EMBEDDING = "model.encode_image (projected into the joint image-text space), L2-normalised"
TEXT_EMBEDDING = "model.encode_text of the open_clip tokenizer's ids (projected), L2-normalised"


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """open_clip reports failures through the root logger as well as by raising; keep one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


def describe_transform(transform: Any) -> str:
    """One line naming every step of a torchvision Compose (sizes, interpolation, mean/std)."""
    steps = getattr(transform, "transforms", [transform])
    return " -> ".join(" ".join(repr(step).split()) for step in steps)


@dataclass
class ClipScorer:
    """A loaded open_clip model with its inference transform and tokenizer."""

    model_name: str
    pretrained: str | None
    model: Any = field(repr=False)
    preprocess: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    device: torch.device
    revision: str | None = None
    quick_gelu: bool = False
    kind: str = "clip"

    @property
    def key(self) -> str:
        return f"clip--{self.model_name}--{self.pretrained}--{self.revision or 'unknown'}"

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") else -1

    def info(self) -> dict[str, Any]:
        import open_clip

        return {
            "model": self.model_name,
            "pretrained": self.pretrained,
            "revision": self.revision,
            "quick_gelu": self.quick_gelu,
            "library": f"open_clip {open_clip.__version__}",
            "image_embedding": IMAGE_EMBEDDING,
            "text_embedding": TEXT_EMBEDDING,
            "preprocess": describe_transform(self.preprocess),
            "tokenizer": type(self.tokenizer).__name__,
        }

    @torch.inference_mode()
    def embed(self, images: Sequence[Any]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return self.model.encode_image(pixels, normalize=True).float().cpu()

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float().cpu()


def load_clip(
    model_name: str = DEFAULT_CLIP,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str | torch.device | None = None,
) -> ClipScorer:
    """Load an open_clip scorer (`ViT-B-32`, `hf-hub:org/repo`, ..., or `tiny-clip`); ModelError if it can't."""
    return _load(model_name, pretrained or None, str(resolve_device(device)))


@functools.lru_cache(maxsize=2)
def _load(model_name: str, pretrained: str | None, device: str) -> ClipScorer:
    if model_name == TINY_CLIP:
        model, preprocess, tokenizer = tiny_clip()
        return ClipScorer(
            TINY_CLIP,
            None,
            model.to(device),
            preprocess,
            tokenizer,
            torch.device(device),
            revision=f"random-seed-{SEED}",
        )
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    from sdlora.world.shipped import shipped_folder

    world = shipped_folder(model_name)  # world-clip: an open_clip local-dir: folder shipped in the package
    source = f"local-dir:{world}" if world is not None else model_name
    pretrained = None if world is not None else pretrained
    label = model_name if not pretrained else f"{model_name} ({pretrained})"
    has_schema = source.startswith(("hf-hub:", "local-dir:"))
    tag_cfg: dict[str, Any] = {}
    if not has_schema:
        if model_name not in open_clip.list_models():
            raise ModelError(
                f"--clip-model {model_name}: not an open_clip model (e.g. ViT-B-32, ViT-L-14, "
                f"hf-hub:org/repo; or {TINY_CLIP} offline)"
            )
        if pretrained and not os.path.isfile(pretrained):
            tag_cfg = get_pretrained_cfg(model_name, pretrained)
            if not tag_cfg:
                tags = list_pretrained_tags_by_model(model_name)
                raise ModelError(
                    f"--clip-pretrained {pretrained}: not a weights tag of {model_name} "
                    f"(known: {', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''})"
                )
    # OpenAI's weights were trained with QuickGELU; open_clip only warns when the config differs.
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    if model_name.startswith("hf-hub:") or (pretrained and not os.path.isfile(pretrained)):
        hub_offline()  # the weights (and an hf-hub model's config) come from the hub
    try:
        with _quiet_logging():
            model, _, preprocess = open_clip.create_model_and_transforms(
                source,
                pretrained=None if has_schema else pretrained,
                device=device,
                force_quick_gelu=quick_gelu,
            )
            tokenizer = open_clip.get_tokenizer(source)
    except (RuntimeError, OSError, ValueError) as exc:
        raise hub_error(f"scorer model {label}", exc, f"or use --clip-model {TINY_CLIP} for an offline try") from exc
    return ClipScorer(
        model_name,
        pretrained,
        model.eval(),
        preprocess,
        tokenizer,
        torch.device(device),
        revision=_revision(source, pretrained, tag_cfg),
        quick_gelu=quick_gelu,
    )


def _revision(model_name: str, pretrained: str | None, tag_cfg: dict[str, Any]) -> str | None:
    """Where the weights came from: hub repo@commit, a local folder's or file's fingerprint, or None."""
    if model_name.startswith("local-dir:"):
        return folder_fingerprint(Path(model_name[len("local-dir:") :]))
    repo = tag_cfg.get("hf_hub", "").strip("/")
    if model_name.startswith("hf-hub:"):
        repo = model_name[len("hf-hub:") :]
    if repo:
        commit = cached_revision(repo, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
        return f"{repo}@{commit}" if commit else repo
    if pretrained and os.path.isfile(pretrained):
        stat = Path(pretrained).stat()
        return f"file-{stat.st_size}-{stat.st_mtime_ns}"
    return tag_cfg.get("url") or None


__all__ = ["ClipScorer", "DEFAULT_CLIP", "DEFAULT_PRETRAINED", "TINY_CLIP_CONFIG", "load_clip"]
