"""benchmarks/train_speed.py's model folders: the real SD 1.5 / SDXL architectures, a folder sdlora loads.

The benchmark's figures mean something only if its random-weight models have the real models' size;
building them takes minutes and 4-14 GB, so this checks their configs on the meta device (no memory)
and the folder-writing path with tiny networks.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_speed  # noqa: E402  (benchmarks/ is a folder of scripts)

# Parameter counts of the published checkpoints (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-xl-base-1.0), part by part.
REAL_PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}


@pytest.mark.parametrize("arch", sorted(REAL_PARAMETERS))
def test_random_models_have_the_real_architectures_size(arch):
    with torch.device("meta"):
        counts = {
            name: sum(p.numel() for p in build().parameters())
            for name, build in train_speed.ARCHS[arch].networks().items()
        }
    assert counts == REAL_PARAMETERS[arch]


@pytest.mark.slow  # ~2.5 s idle, ~5 s under load: over the default suite's budget for a by-hand benchmark's path
def test_sdxl_folder_is_written_part_by_part_and_loads_as_sdxl(tmp_path, monkeypatch):
    from sdlora.models.loading import load_pipeline
    from sdlora.models.tiny import tiny_sdxl

    tiny = tiny_sdxl()
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    spec = dataclasses.replace(
        train_speed.ARCHS["sdxl"], networks=lambda: {n: (lambda n=n: getattr(tiny, n)) for n in names}
    )
    monkeypatch.setitem(train_speed.ARCHS, "sdxl", spec)
    folder = train_speed.build_sdxl_random(tmp_path / "sdxl-random")

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert not (tmp_path / "sdxl-random.partial").exists()
    pipe, arch = load_pipeline(str(folder))
    assert arch.name == "sdxl"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert torch.equal(pipe.unet.conv_in.weight, tiny.unet.conv_in.weight)
