"""Base models: loading (hub id, local folder, single .safetensors file, tiny random models), the model
families (families/: one module each, behind one interface), and the hub checks every loader shares
(reachable or offline, one-line errors)."""

from sdlora.models.families import Family, detect_family
from sdlora.models.hub import hub_error, hub_offline
from sdlora.models.loading import is_tiny, load_pipeline, tiny_models

__all__ = ["Family", "detect_family", "hub_error", "hub_offline", "load_pipeline", "is_tiny", "tiny_models"]
