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
# stabilityai/stable-diffusion-xl-base-1.0, black-forest-labs/FLUX.1-dev), part by part.
REAL_PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
    "flux1": {
        "transformer": 11_901_408_320,
        "vae": 83_819_683,
        "text_encoder": 123_060_480,
        "text_encoder_2": 4_762_310_656,  # T5-XXL's encoder
    },
}


@pytest.mark.parametrize("arch", sorted(REAL_PARAMETERS))
def test_random_models_have_the_real_architectures_size_and_dtype(arch):
    dtype = getattr(torch, train_speed.ARCHS[arch].dtype)  # FLUX.1: built in bf16, never cast from fp32
    with torch.device("meta"), train_speed.default_dtype(dtype):
        networks = {name: build() for name, build in train_speed.ARCHS[arch].networks().items()}
    assert {name: sum(p.numel() for p in net.parameters()) for name, net in networks.items()} == REAL_PARAMETERS[arch]
    assert {p.dtype for net in networks.values() for p in net.parameters()} == {dtype}
    assert torch.get_default_dtype() == torch.float32  # restored


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


@pytest.mark.slow  # ~10 s: builds, saves and loads a (tiny-size) FLUX.1 folder
def test_flux_folder_is_built_in_bf16_and_loads_as_flux1(tmp_path, monkeypatch):
    """benchmarks/gpu.py builds FLUX.1 [dev] this way on the GPU (33.5 GB): here at tiny size, the same path."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors import safe_open
    from transformers import CLIPTextModel, T5EncoderModel

    from sdlora.models.loading import load_pipeline
    from sdlora.models.tiny import tiny_flux

    tiny = tiny_flux()
    networks = {  # built from the tiny configs inside build_random, so in the arch's dtype
        "transformer": lambda: FluxTransformer2DModel.from_config(tiny.transformer.config),
        "vae": lambda: AutoencoderKL.from_config(tiny.vae.config),
        "text_encoder": lambda: CLIPTextModel(tiny.text_encoder.config),
        "text_encoder_2": lambda: T5EncoderModel(tiny.text_encoder_2.config),
    }
    monkeypatch.setitem(
        train_speed.ARCHS, "flux1", dataclasses.replace(train_speed.ARCHS["flux1"], networks=lambda: networks)
    )
    folder = train_speed.build_random("flux1", tmp_path / "flux1-random")

    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    for part in ("transformer", "text_encoder_2"):
        (weights,) = (folder / part).glob("*.safetensors")
        with safe_open(str(weights), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, part
    pipe, arch = load_pipeline(str(folder))  # as sdlora train loads it: fp32
    assert arch.name == "flux1" and pipe.transformer.config.guidance_embeds
    assert type(pipe.tokenizer_2).__name__.startswith("T5Tokenizer") and pipe.transformer.dtype == torch.float32


# ----------------------------------------------------------------------------- train_pairs.py: the pairing
import train_pairs  # noqa: E402


def test_pairs_run_every_side_once_per_pair_in_turn():
    assert train_pairs.schedule(2, ["example", "sdlora"]) == [
        (0, "example"),
        (0, "sdlora"),
        (1, "example"),
        (1, "sdlora"),
    ]


def test_ratios_are_taken_within_each_pair_then_summarised():
    # The machine slowed in pair 2: both sides took twice as long, the ratio did not move.
    spread = train_pairs.pair_ratios([6.0, 12.0, 6.6, None], [3.0, 6.0, 2.0, 4.0])
    assert spread.values == [2.0, 2.0, pytest.approx(3.3)]  # a pair missing a side is left out
    assert (spread.median, spread.low, spread.high) == (2.0, 2.0, pytest.approx(3.3))
    assert str(spread) == "2.00 (2.00-3.30)"
    assert train_pairs.pair_ratios([1.0], [None]).values == []


def test_marginal_step_cancels_start_up():
    per_step, startup = train_pairs.marginal((2, 30.0), (5, 45.0))
    assert (per_step, startup) == (5.0, 20.0)


def test_in_loop_median_skips_the_first_step_and_lines_without_a_step_time(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    steps = [{"step": step, "step_time_s": t} for step, t in ((2, 4.0), (3, 5.0), (4, 9.0))]
    lines = [{"step": 1, "step_time_s": 30.0}, {"step": 1, "val_loss": 0.1}, *steps]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step_time_s": 1')  # a half-written line
    assert train_pairs.in_loop_median(metrics) == 5.0
    assert train_pairs.in_loop_median(tmp_path / "missing.jsonl") is None


def test_load_is_sampled_while_a_side_runs():
    readings = iter([2.0, 4.0, 9.0, 9.0, 9.0])
    sampler = train_pairs.LoadSampler(every=0.01, read=lambda: next(readings, 9.0))
    with sampler.sampling():
        while len(sampler.samples) < 3:
            pass
    assert sampler.samples[:3] == [2.0, 4.0, 9.0]
    assert str(train_pairs.LoadSampler()) == "-"


def test_each_side_gets_its_threads_and_wait_policy():
    base = {"PATH": "/bin", "OMP_NUM_THREADS": "4"}
    assert train_pairs.side_env("example", None, base) == base  # accelerate decides the example's own
    assert train_pairs.side_env("sdlora", 1, base)["OMP_NUM_THREADS"] == "1"
    assert train_pairs.side_env("floor", None, base)["OMP_WAIT_POLICY"] == "PASSIVE"  # as sdlora's CLI sets it
    spin = train_pairs.side_env("sdlora-spin", None, base)
    assert spin["OMP_WAIT_POLICY"] == ""  # ignored by libgomp (its default spin), kept by sdlora's setdefault


def test_the_examples_in_loop_step_is_its_progress_bars_last_rate():
    bar = "Steps:  40%|####      | 2/5 [00:30<00:45, 15.02s/it]\rSteps: 100%|##########| 5/5 [01:00<00:00, 6.71s/it, loss=0.1]"
    assert train_pairs.tqdm_step_s(bar) == 6.71
    assert train_pairs.tqdm_step_s("Steps: 100%|#| 5/5 [00:02<00:00, 2.50it/s]") == 0.4
    assert train_pairs.tqdm_step_s("no bar") is None
