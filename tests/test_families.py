"""The model-family seam: detection from the model's own config, complete declarations, no family named
outside models/families/, and a new family picked up by registering it alone."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch
from safetensors.torch import save_file

import sdlora
from sdlora.models import families, load_pipeline, single_file
from sdlora.models.families import FAMILIES, SD1, SDXL, Family, UnknownFamily, detect_family


def test_the_family_comes_from_the_pipeline_class_in_model_index():
    assert detect_family({"_class_name": "StableDiffusionXLPipeline"}) is SDXL
    assert detect_family({"_class_name": "StableDiffusionPipeline"}) is SD1
    # The pipeline class wins over the denoiser config; the config decides only where the class says nothing.
    assert (
        detect_family({"_class_name": "StableDiffusionPipeline"}, unet_config={"addition_embed_type": "text_time"})
        is SD1
    )
    assert detect_family({}, unet_config={"addition_embed_type": "text_time", "cross_attention_dim": 8}) is SDXL
    with pytest.raises(UnknownFamily, match="StableDiffusion3Pipeline"):
        detect_family({"_class_name": "StableDiffusion3Pipeline"})


def test_a_folder_named_xl_that_holds_sd1_is_sd1(tmp_path: Path):
    folder = tmp_path / "my-sdxl-finetune-XL"
    load_pipeline("tiny-sd")[0].save_pretrained(folder)
    pipe, family = load_pipeline(str(folder))
    assert family is SD1 and type(pipe).__name__ == "StableDiffusionPipeline"


def test_a_folder_of_a_family_sdlora_does_not_train_is_one_line(tmp_path: Path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(UnknownFamily, match=r"model_index|WanPipeline") as info:
        load_pipeline(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_declares_every_field(family: Family):
    for field in dataclasses.fields(Family):
        value = getattr(family, field.name)
        assert value is not None and (value != () and value != "" or isinstance(value, bool)), field.name
    assert len(family.text_encoders) == len(family.tokenizers) == len(family.kohya_te_prefixes)
    # Every text encoder's key, in order; one may be listed again for a second key (FLUX.1's T5: t5, t5xxl).
    assert list(dict.fromkeys(encoder for encoder, _ in family.embedding_keys)) == list(family.text_encoders)
    assert family.denoiser and family.lora_targets and family.sample_guidance >= 0  # Z-Image-Turbo: 0
    assert family.kohya_unet_layout in ("diffusers", "sgm", "bfl", "z-image")  # bfl: FLUX's own (double_blocks...)
    # The shipped configs a single file loads with; the transformer families' files are refused before they are needed
    # (single_file.detect finds no SD UNet in them).
    configs = Path(sdlora.__file__).parent / "models" / "base_configs" / family.base_config
    assert configs.is_dir() or family in (families.FLUX1, families.FLUX2_KLEIN, families.ZIMAGE)
    assert families.family_named(family.name) is family and families.tiny_family(family.tiny_model) is family
    # Every method of the interface is filled in (the base raises NotImplementedError).
    methods = ("matches_unet", "build_tiny", "training_objective", "denoise", "tokenize", "encode_tokens")
    for method in (*methods, "prompt_embeds_kwargs"):
        assert getattr(type(family), method) is not getattr(Family, method), method


def test_names_are_unique_and_lookups_of_unknown_names_fail_clearly():
    for attr in ("name", "tiny_model", "single_file_key", "base_config"):
        values = [getattr(f, attr) for f in FAMILIES]
        assert len(values) == len(set(values)), attr
    assert families.find_family("flux9") is None and families.find_family(None) is None
    with pytest.raises(UnknownFamily, match="flux9"):
        families.family_named("flux9")


# Outside models/families/ nothing branches on a family or imports one: the loop, export, sampling,
# the card and the loaders ask the family object. Model builders name the architecture they build:
# models/tiny.py (the tiny builds the families' `build_tiny` call) and world/trainers/ (world-sd, an
# SD 1.x pipeline trained on the miniature world).
_FAMILY_NAMES = r"sd1|sdxl|sd15|tiny-sd|tiny-sdxl|flux2-klein|tiny-flux2-klein|zimage|tiny-zimage"
_NAMING = re.compile(
    rf"is_sdxl|[=!]=\s*[\"']({_FAMILY_NAMES})[\"']|[\"']({_FAMILY_NAMES})[\"']\s*(if|[=!]=|in)\b"
    r"|models\.families\.(sd1|sdxl|unet_clip|flux2|zimage)|families import .*\b(SD1|SDXL|FLUX2_KLEIN|ZIMAGE)\b"
    r"|StableDiffusion(XL)?(Img2Img)?Pipeline|Flux2KleinPipeline|ZImagePipeline"
)


def test_nothing_outside_families_names_a_family():
    src = Path(sdlora.__file__).parent
    allowed = {src / "models" / "tiny.py", *(src / "world" / "trainers").glob("*.py")}
    found = [
        f"{p.relative_to(src)}:{n}: {line.strip()}"
        for p in sorted(src.rglob("*.py"))
        if "families" not in p.relative_to(src).parts and p not in allowed
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if _NAMING.search(line)
    ]
    assert found == [], found


def test_the_grep_catches_a_branch_on_a_family():
    assert _NAMING.search('    cls = Big if arch.name == "sdxl" else Small')
    assert _NAMING.search("if arch.is_sdxl:")
    assert _NAMING.search("from sdlora.models.families.sdxl import SDXL")
    assert _NAMING.search('    if family.name == "zimage":') and _NAMING.search("from diffusers import ZImagePipeline")
    assert _NAMING.search('if family.name == "flux2-klein":')
    assert _NAMING.search("from sdlora.models.families.flux2_keys import kohya_module")
    assert _NAMING.search("    cls = diffusers.Flux2KleinPipeline")
    assert not _NAMING.search('    "arch": state.arch.name,')


# ---- a third family, registered in the test alone --------------------------------------------------


class FakePipeline:
    """Stands in for a diffusers pipeline of a new family: its denoiser (here under the name the fields it
    copies from SD1 give, `unet`) is all the loaders touch."""

    def __init__(self, source: str = "built"):
        self.source = source
        self.unet = torch.nn.Linear(1, 1)

    @classmethod
    def from_pretrained(cls, model: str, **kwargs: Any) -> "FakePipeline":
        return cls(model)


@dataclass(frozen=True)
class FakeFamily(Family):  # the interface itself, not the UNet + CLIP base
    def matches_unet(self, unet_config: Mapping[str, Any]) -> bool:
        return False

    def pipeline_cls(self) -> Any:
        return FakePipeline

    def build_tiny(self) -> Any:
        return FakePipeline()


FAKE = FakeFamily(
    **{
        **{f.name: getattr(SD1, f.name) for f in dataclasses.fields(Family)},
        "name": "fake",
        "label": "Fake",
        "pipeline_classes": ("FakePipeline",),
        "tiny_model": "tiny-fake",
        "single_file_key": "fake_text_encoder.",
        "base_config": "fake",
    }
)


def test_a_registered_family_is_detected_without_touching_other_code(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", (*FAMILIES, FAKE))
    assert detect_family({"_class_name": "FakePipeline"}) is FAKE
    assert families.family_named("fake") is FAKE
    # The loaders ask the registry: a folder whose model_index.json names the class loads as the family,
    folder = tmp_path / "some-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FakePipeline"}))
    pipe, family = load_pipeline(str(folder))
    assert family is FAKE and pipe.source == str(folder)
    # its tiny model is a `--model` name, and a checkpoint file with its key is recognised from the header.
    pipe, family = load_pipeline("tiny-fake")
    assert family is FAKE and pipe.source == "built"
    checkpoint = tmp_path / "some-model.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
            "fake_text_encoder.w": torch.zeros(1),
        },
        str(checkpoint),
    )
    assert single_file.detect(checkpoint) is FAKE
    monkeypatch.undo()
    with pytest.raises(UnknownFamily):
        detect_family({"_class_name": "FakePipeline"})


def test_sample_steps_follow_the_loaded_model_where_a_variant_is_distilled():
    """`sdlora sample --steps` and `--validation-steps` unset: each pipeline's own default for the model loaded
    (FluxPipeline 28, Flux2KleinPipeline and ZImagePipeline 50), and the few steps a step-distilled variant
    samples in, told from its config: FLUX.1 [schnell] (no guidance embedding), the distilled FLUX.2 [klein]
    (`is_distilled` in model_index.json), Z-Image-Turbo (its scheduler's static shift 3.0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sdlora.models.families import FLUX1, FLUX2_KLEIN, ZIMAGE

    assert SD1.sample_steps(None) == SDXL.sample_steps(None) == 30  # whatever the model
    dev = FLUX1.build_tiny()
    assert FLUX1.sample_steps(dev) == 28
    dev.transformer.register_to_config(guidance_embeds=False)
    assert FLUX1.sample_steps(dev) == 4
    klein = FLUX2_KLEIN.build_tiny()
    assert FLUX2_KLEIN.sample_steps(klein) == 50  # the tiny model is [klein] base's architecture
    klein.register_to_config(is_distilled=True)
    assert FLUX2_KLEIN.sample_steps(klein) == 4
    zimage = ZIMAGE.build_tiny()
    assert ZIMAGE.sample_steps(zimage) == 8  # the tiny model has Z-Image-Turbo's scheduler config
    assert ZIMAGE.guidance_for(zimage) == 0.0  # Turbo: no classifier-free guidance
    zimage.scheduler = FlowMatchEulerDiscreteScheduler(shift=6.0)
    assert ZIMAGE.sample_steps(zimage) == 50
    assert ZIMAGE.guidance_for(zimage) == 5.0  # Z-Image base: ZImagePipeline's default CFG
    assert SD1.guidance_for(None) == 7.5 and FLUX1.guidance_for(dev) == 3.5


def test_validation_steps_unset_are_the_models_capped_for_previews_and_a_given_value_stays():
    from sdlora.config import load_config
    from sdlora.errors import ConfigError
    from sdlora.models.families import ZIMAGE
    from sdlora.train.resolve import VALIDATION_STEPS, resolve_family_defaults

    cfg = load_config(None, {"model.name": "tiny-zimage"}, [])
    assert cfg.validation.steps is None
    zimage = ZIMAGE.build_tiny()
    assert resolve_family_defaults(cfg, ZIMAGE, zimage).validation.steps == 8
    assert resolve_family_defaults(cfg, SD1, None).validation.steps == VALIDATION_STEPS == 20
    given = load_config(None, {"model.name": "tiny-zimage", "validation.steps": 3}, [])
    assert resolve_family_defaults(given, ZIMAGE, zimage).validation.steps == 3
    with pytest.raises(ConfigError, match="--validation-steps must be at least 1"):
        load_config(None, {"validation.steps": 0}, [])
