"""Base models: loading (hub id, local folder, tiny random models) and the SD 1.x / SDXL interface."""

from sdlora.models.arch import Architecture, detect_architecture
from sdlora.models.loading import TINY_MODELS, is_tiny, load_pipeline

__all__ = ["Architecture", "detect_architecture", "load_pipeline", "is_tiny", "TINY_MODELS"]
