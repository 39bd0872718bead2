"""Image embeddings cached by file content: one safetensors file per scorer model.

Keys are the images' sha256, so a renamed or re-listed image is not embedded again and adding
images embeds only the new ones. The file's metadata names the scorer (model, revision,
preprocessing); a cache written by a different scorer setup is ignored, never mixed in.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sdlora.fsutil import atomic_path


def cache_file(folder: Path, key: str) -> Path:
    return Path(folder) / (re.sub(r"[^A-Za-z0-9._-]+", "_", key) + ".safetensors")


class EmbeddingCache:
    """sha256 -> embedding for one scorer; `folder=None` keeps it in memory only."""

    def __init__(self, folder: Path | None, key: str, meta: dict[str, str]):
        self.path = cache_file(folder, key) if folder is not None else None
        self.meta = {"scorer": key, **meta}
        self.vectors: dict[str, torch.Tensor] = {}
        self._dirty = False
        if self.path is not None and self.path.is_file():
            self._read()

    def _read(self) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                if (f.metadata() or {}) != self.meta:
                    return  # written for another scorer setup: start afresh (the file is replaced on save)
                self.vectors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception:  # a damaged cache costs a re-embed, never a failure
            self.vectors = {}

    def __contains__(self, digest: str) -> bool:
        return digest in self.vectors

    def put(self, digest: str, vector: torch.Tensor) -> None:
        self.vectors[digest] = vector.detach().to(torch.float32).contiguous().clone()
        self._dirty = True

    def stack(self, digests: list[str]) -> torch.Tensor:
        return torch.stack([self.vectors[d] for d in digests])

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        from safetensors.torch import save_file

        with atomic_path(self.path) as tmp:
            save_file(self.vectors, str(tmp), metadata=self.meta)
        self._dirty = False
