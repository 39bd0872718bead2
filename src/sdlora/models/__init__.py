"""Base models: loading (hub id, local folder, single .safetensors file, tiny random models), the SD 1.x /
SDXL interface, and the hub checks every loader shares (reachable or offline, one-line errors)."""

from sdlora.models.arch import Architecture, detect_architecture
from sdlora.models.hub import hub_error, hub_offline
from sdlora.models.loading import TINY_MODELS, is_tiny, load_pipeline

__all__ = ["Architecture", "detect_architecture", "hub_error", "hub_offline", "load_pipeline", "is_tiny", "TINY_MODELS"]
