"""The model families sdlora trains, one module each, and how a model is matched to one.

The family comes from the model's own config, never from its name: the pipeline class that
`model_index.json` records (`_class_name`), or, where there is none to go by (a pipeline built in
memory, a folder without it), the denoiser's config. What files record (config.yaml, the LoRA
metadata `sdlora.architecture`) is looked up by the family's `name`. Everything outside this package
asks the family it is given (`base.Family`); nothing names one.

Adding a family: write its module here (a `Family` filled in, see base.py) and list it in FAMILIES.
"""

from __future__ import annotations

from typing import Any, Mapping

from sdlora.errors import ModelError
from sdlora.models.families.base import Family, OnDevice
from sdlora.models.families.flux import FLUX1
from sdlora.models.families.flux2 import FLUX2_KLEIN
from sdlora.models.families.sd1 import SD1
from sdlora.models.families.sdxl import SDXL
from sdlora.models.families.zimage import ZIMAGE

# Asked in this order where several could match (an SDXL UNet config is also a text-conditioned UNet;
# an SDXL checkpoint file also has SD 1.x-like keys; FLUX.1's transformer config test also matches a FLUX.2
# one): the more specific first. Z-Image's transformer config matches no other family's.
FAMILIES: tuple[Family, ...] = (SDXL, SD1, FLUX2_KLEIN, FLUX1, ZIMAGE)


class UnknownFamily(ModelError, ValueError):
    """A model, or a file's recorded family, that is none of the families sdlora trains."""


def supported() -> str:
    """The families, as a message lists them: "SDXL, SD 1.x"."""
    return ", ".join(family.label for family in FAMILIES)


def find_family(name: str | None) -> Family | None:
    """The family a file records by `name` ("sd1", "sdxl"); None for an unknown or missing name."""
    return next((family for family in FAMILIES if family.name == name), None)


def family_named(name: str) -> Family:
    """The family a file records by `name`; UnknownFamily for one this sdlora does not know."""
    family = find_family(name)
    if family is None:
        raise UnknownFamily(f"unknown model family {name!r} (this sdlora knows {', '.join(f.name for f in FAMILIES)})")
    return family


def tiny_family(model: str) -> Family | None:
    """The family whose tiny random-weight model `model` names (`tiny-sd`, ...), else None."""
    return next((family for family in FAMILIES if family.tiny_model == model), None)


def detect_family(
    model_index: Mapping[str, Any] | None = None, *, unet_config: Mapping[str, Any] | None = None
) -> Family:
    """The family of a model from its `model_index.json` (its `_class_name`), else from its denoiser config
    (a dict or diffusers FrozenDict); UnknownFamily (one line) when neither matches a family."""
    class_name = (model_index or {}).get("_class_name")
    found = next((family for family in FAMILIES if class_name in family.pipeline_classes), None)
    if found is None and unet_config is not None:
        found = next((family for family in FAMILIES if family.matches_unet(unet_config)), None)
    if found is not None:
        return found
    what = f"a {class_name}" if class_name else "its denoiser config" if unet_config is not None else "nothing"
    raise UnknownFamily(f"not a model family sdlora trains ({what} matches none of {supported()})")


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded (or built) pipeline: its class, else its UNet's config."""
    unet = getattr(pipe, "unet", None)
    return detect_family({"_class_name": type(pipe).__name__}, unet_config=getattr(unet, "config", None))


__all__ = [
    "FAMILIES",
    "FLUX1",
    "FLUX2_KLEIN",
    "Family",
    "OnDevice",
    "SD1",
    "SDXL",
    "UnknownFamily",
    "ZIMAGE",
    "detect_family",
    "family_named",
    "family_of_pipeline",
    "find_family",
    "supported",
    "tiny_family",
]
