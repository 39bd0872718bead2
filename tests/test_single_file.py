"""`--model FILE.safetensors`: SD 1.x and SDXL single-file checkpoints, loaded offline with the package's configs.

The files are written from the tiny models in the original layout (tests/single_file_helpers.py) and
load back through diffusers' real `from_single_file`, with `single_file.CONFIGS` pointed at the tiny
models' configs (sdlora ships SD 1.5's and SDXL base's there).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error
from sdlora.cli import app
from sdlora.errors import ModelError
from sdlora.models import single_file
from sdlora.models.loading import load_base_vae, load_pipeline
from single_file_helpers import tiny_configs, tiny_pipeline, write_single_file

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The tiny models' configs (root "configs"), one checkpoint file per family and its source pipeline."""
    root = tmp_path_factory.mktemp("single-file")
    pipes = {family: tiny_pipeline(family) for family in ("sd15", "sdxl")}
    out: dict = {"configs": tiny_configs(root / "configs", pipes), "pipes": pipes}
    for family, pipe in pipes.items():
        out[family] = write_single_file(pipe, root / f"tiny-{family}.safetensors")
    return out


@pytest.fixture(autouse=True)
def _tiny_configs(files, monkeypatch):
    monkeypatch.setattr(single_file, "CONFIGS", files["configs"])


def test_the_family_comes_from_the_header_alone(files, monkeypatch):
    def no_full_load(*args, **kwargs):
        raise AssertionError("the whole file was loaded")

    monkeypatch.setattr("safetensors.torch.load_file", no_full_load)
    monkeypatch.setattr(torch, "load", no_full_load)
    assert single_file.family_of(files["sd15"]) == "sd15"
    assert single_file.family_of(files["sdxl"]) == "sdxl"


@pytest.mark.parametrize("family, arch_name", [("sd15", "sd1"), ("sdxl", "sdxl")])
def test_a_file_loads_back_the_same_model_offline(files, family: str, arch_name: str):
    source = files["pipes"][family]
    pipe, arch = load_pipeline(str(files[family]))
    assert arch.name == arch_name
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(source, name, None) is None:
            continue
        want, got = getattr(source, name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() <= got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    # The tokenizers are the real ones, built offline: SD 1.5 pads with the end token, SDXL's second with "!".
    assert (pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id, pipe.tokenizer.pad_token_id) == (
        49406,
        49407,
        49407,
    )
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == 77
    if family == "sdxl":
        assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2.pad_token_id == 0
    assert pipe.scheduler.config.prediction_type == "epsilon"
    vae = load_base_vae(str(files[family]), dtype=torch.float32)
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in source.vae.state_dict().items())


def test_the_shipped_configs_are_sd15_and_sdxl_base():
    from diffusers import UNet2DConditionModel

    real = Path(single_file.__file__).parent / "base_configs"
    for family, params, cross in (("sd15", 859_520_964, 768), ("sdxl", 2_567_463_684, 2048)):
        config = json.loads((real / family / "unet" / "config.json").read_text())
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        assert sum(p.numel() for p in unet.parameters()) == params and config["cross_attention_dim"] == cross
        index = json.loads((real / family / "model_index.json").read_text())
        components = [k for k, v in index.items() if isinstance(v, list) and v[0] and not k.startswith("tokenizer")]
        assert all((real / family / name).is_dir() for name in components), (family, components)


def fake_sd_file(path: Path, **extra: torch.Tensor) -> Path:
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3), **extra}, str(path))
    return path


@pytest.mark.parametrize(
    "make, fragment",
    [
        (
            lambda p: fake_sd_file(p.with_name("random.safetensors"), **{"a.b": torch.zeros(2)}),
            "unsupported model family",
        ),
        (
            lambda p: fake_sd_file(
                p.with_name("sd2.safetensors"), **{"cond_stage_model.model.ln_final.weight": torch.zeros(2)}
            ),
            "SD 2.x",
        ),
        (
            lambda p: _write(p.with_name("noise.safetensors"), {"x": torch.zeros(3)}),
            "not a Stable Diffusion checkpoint",
        ),
        (
            lambda p: fake_sd_file(
                p.with_name("inpaint.safetensors"),
                **{
                    "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3),
                    "cond_stage_model.transformer.x": torch.zeros(1),
                },
            ),
            "9 input channels",
        ),
        (lambda p: p.with_name("missing.safetensors"), "no such file"),
    ],
)
def test_a_file_it_cannot_load_is_one_line(tmp_path: Path, make, fragment: str):
    path = make(tmp_path / "x")
    with pytest.raises(ModelError, match=fragment) as info:
        load_pipeline(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def _write(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


def test_a_truncated_file_is_one_line(files, tmp_path: Path, tiny_dataset: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(files["sd15"].read_bytes()[:-1000])
    result = runner.invoke(app, ["train", "--model", str(cut), "--dataset", str(tiny_dataset)])
    one_line_error(result, str(cut), "damaged or incomplete")


class _Trap:
    """Unpickling this writes a marker file: proof that a .ckpt was opened."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_checkpoint_is_refused_unopened_with_how_to_convert(tmp_path: Path, tiny_dataset: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "unpickled"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(pickle.dumps(_Trap(str(marker))))
    result = runner.invoke(app, ["train", "--model", str(ckpt), "--dataset", str(tiny_dataset)])
    one_line_error(result, str(ckpt), "pickle", "weights_only=True", "model.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()


def test_train_sample_and_export_from_a_file_offline(files, tmp_path: Path, tiny_dataset: Path, monkeypatch):
    from sdlora.fsutil import sha256_file
    from sdlora.safetensors_io import read_metadata
    from sdlora.train.kohya import legacy_model_hash

    monkeypatch.chdir(tmp_path)
    model = files["sdxl"]
    args = ["train", "--model", str(model), "--dataset", str(tiny_dataset), "--name", "f", "--rank", "2"]
    args += ["--max-steps", "1", "--validate-every", "0", "--checkpoint-every", "0", "validation.prompts=[]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "training sdxl" in result.output
    lora = tmp_path / "runs" / "f" / "lora"
    [kohya] = [
        p
        for p in lora.glob("*.safetensors")
        if p.name not in ("pytorch_lora_weights.safetensors", "embeddings.safetensors")
    ]
    meta = read_metadata(kohya)
    assert meta["ss_sd_model_name"] == model.name
    assert meta["ss_new_sd_model_hash"] == sha256_file(model) == hashlib.sha256(model.read_bytes()).hexdigest()
    assert meta["ss_sd_model_hash"] == legacy_model_hash(model) and len(meta["ss_sd_model_hash"]) == 8
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert read_metadata(lora / "pytorch_lora_weights.safetensors")["sdlora.base_model"] == str(model)

    sampled = runner.invoke(app, ["sample", "sksToy on a beach", "-n", "1", "--steps", "1", "--no-baseline"])
    assert sampled.exit_code == 0, sampled.output
    assert len(list((tmp_path / "runs" / "f" / "samples").rglob("lora-*.png"))) == 1


def test_the_legacy_hash_reads_64_kib_from_1_mib(tmp_path: Path):
    from sdlora.train.kohya import base_model_keys, legacy_model_hash

    data = bytes(range(256)) * (5 * 4096 + 1)
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    keys = base_model_keys(str(path))
    assert (
        keys["ss_sd_model_name"] == "m.safetensors" and keys["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    )
    assert base_model_keys("stabilityai/stable-diffusion-xl-base-1.0") == {
        "ss_sd_model_name": "stabilityai/stable-diffusion-xl-base-1.0"
    }
