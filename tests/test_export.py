"""LoRA export: the diffusers file and the kohya file load in diffusers and give the trained model's images.

Tiny random-weight models; LoRA B matrices set to random values (peft starts them at zero) and
alpha != rank, so a wrong scale or a dropped module changes the images.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

import sdlora
from sdlora.errors import ConfigError, RunError, SdloraError
from sdlora.models import load_pipeline
from sdlora.models.families import SD1, SDXL
from sdlora.run import DIFFUSERS_LORA
from sdlora.train import export
from sdlora.train.export import build_metadata, check_exportable, save_lora
from sdlora.train.kohya import KohyaKeyError, KohyaNames, kohya_to_peft, load_kohya

RANK, ALPHA = 4, 2.0
UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
    "conv1",
    "conv2",
    "time_emb_proj",
    "conv_shortcut",
]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROMPT = "a photo of sks toy"


def _randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.3
        elif "lora_magnitude_vector" in name:
            param.data = param.data * (1 + 0.2 * torch.randn(param.shape, generator=generator))


def _lora_pipe(model: str, *, text_encoder: bool = False, dora: bool = False, targets=UNET_TARGETS):
    """A tiny pipeline with LoRA injected the way train/lora.py does it, B non-zero."""
    pipe, arch = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(7)
    pipe.unet.add_adapter(
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets), init_lora_weights="gaussian", use_dora=dora)
    )
    _randomize(pipe.unet, generator)
    encoders = None
    if text_encoder:
        encoders = []
        for name in arch.text_encoders:
            encoder = getattr(pipe, name)
            config = LoraConfig(
                r=RANK, lora_alpha=ALPHA, target_modules=TE_TARGETS, init_lora_weights="gaussian", use_dora=dora
            )
            inject_adapter_in_model(config, encoder, "default")
            encoder.peft_config = {"default": config}
            _randomize(encoder, generator)
            encoders.append(encoder)
    return pipe, arch, encoders


def _metadata(model: str, arch) -> dict[str, str]:
    return build_metadata(
        base_model=model,
        arch=arch,
        rank=RANK,
        alpha=ALPHA,
        token="sks",
        class_word="toy",
        steps=12,
        resolution=64,
        seed="3",
    )


def _images(pipe) -> np.ndarray:
    return pipe(
        PROMPT, num_inference_steps=2, height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images


def _prompt_embeds(pipe, arch) -> torch.Tensor:
    with torch.no_grad():
        return arch.encode_prompts(pipe, [PROMPT])[0]


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_kohya_file_maps_back_to_the_same_tensors(tmp_path: Path, model: str):
    pipe, arch, encoders = _lora_pipe(model, text_encoder=True)
    save_lora(tmp_path, pipe.unet, encoders, arch, metadata=_metadata(model, arch), kohya_name="run")

    kohya, _ = load_kohya(tmp_path / "run.safetensors")
    lora, alphas = kohya_to_peft(kohya, KohyaNames.for_models(arch, pipe.unet.config, encoders))
    diffusers_file, _ = load_kohya(tmp_path / DIFFUSERS_LORA)
    models = {"unet": pipe.unet, **dict(zip(arch.text_encoders, encoders))}
    assert set(lora) == set(models)
    for name, module in models.items():
        expected = get_peft_model_state_dict(module)
        assert set(lora[name]) == set(expected)
        for key, tensor in expected.items():
            assert lora[name][key].dtype == tensor.dtype
            assert torch.equal(lora[name][key], tensor), key
            assert torch.equal(diffusers_file[f"{name}.{key}"], tensor), key
        # the configured alpha, not the rank, for every module
        assert set(alphas[name].values()) == {ALPHA}
        assert len(alphas[name]) == len(expected) // 2
    assert len(diffusers_file) == sum(len(get_peft_model_state_dict(m)) for m in models.values())
    assert len([k for k in kohya if k.endswith(".alpha")]) == len(kohya) // 3
    assert all(kohya[k].shape == () and kohya[k].item() == ALPHA for k in kohya if k.endswith(".alpha"))


def test_kohya_names_follow_sd_scripts(tmp_path: Path):
    names = {}
    for model in ("tiny-sd", "tiny-sdxl"):
        pipe, arch, encoders = _lora_pipe(model, text_encoder=True, targets=["to_q", "ff.net.2", "conv1"])
        save_lora(tmp_path / model, pipe.unet, encoders, arch, metadata=_metadata(model, arch), kohya_name="run")
        names[model] = {k.partition(".")[0] for k in load_kohya(tmp_path / model / "run.safetensors")[0]}
    # SD 1.x: diffusers block names
    assert {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_unet_up_blocks_1_resnets_2_conv1",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_4_mlp_fc1",
    } <= names["tiny-sd"]
    # SDXL: SGM block names (tiny UNet: layers_per_block 2, attention in the second down block)
    assert {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_q",
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2",
        "lora_unet_middle_block_2_in_layers_2",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_output_blocks_2_1_transformer_blocks_1_ff_net_2",
        "lora_unet_output_blocks_5_0_in_layers_2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_4_mlp_fc1",
    } <= names["tiny-sdxl"]
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names["tiny-sdxl"])


def test_real_sdxl_unet_names():
    """The full-size SDXL UNet (3 blocks, 2 layers each, 10-deep transformers) maps like sd-scripts' files."""
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    names = KohyaNames.for_models(SDXL, unet.config)
    blocks = set()
    for path, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and (".attentions." in path or ".resnets." in path):
            kohya = names.to_kohya("unet", path)
            assert names.from_kohya(kohya) == ("unet", path)
            if ".attentions." in path:
                blocks.add(kohya.split("_transformer_blocks_")[0].split("_proj_")[0])
    assert blocks == {
        "lora_unet_input_blocks_4_1",
        "lora_unet_input_blocks_5_1",
        "lora_unet_input_blocks_7_1",
        "lora_unet_input_blocks_8_1",
        "lora_unet_middle_block_1",
        *(f"lora_unet_output_blocks_{i}_1" for i in range(6)),
    }
    assert (
        names.to_kohya("unet", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0")
        == "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0"
    )
    assert (
        names.to_kohya("unet", "up_blocks.2.resnets.2.conv_shortcut") == "lora_unet_output_blocks_8_0_skip_connection"
    )
    assert names.to_kohya("unet", "mid_block.resnets.1.time_emb_proj") == "lora_unet_middle_block_2_emb_layers_1"


@pytest.mark.parametrize("text_encoder", [False, True], ids=["unet", "unet+te"])
@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_diffusers_loads_both_files_with_the_trained_scale(tmp_path: Path, model: str, text_encoder: bool):
    pipe, arch, encoders = _lora_pipe(model, text_encoder=text_encoder)
    save_lora(tmp_path, pipe.unet, encoders, arch, metadata=_metadata(model, arch), kohya_name="run")
    trained = _images(pipe)
    trained_embeds = _prompt_embeds(pipe, arch)

    fresh, _ = load_pipeline(model)
    fresh.set_progress_bar_config(disable=True)
    base = _images(fresh)
    base_embeds = _prompt_embeds(fresh, arch)
    fresh.load_lora_weights(tmp_path)
    from_diffusers = _images(fresh)
    diffusers_embeds = _prompt_embeds(fresh, arch)
    fresh.unload_lora_weights()
    fresh.load_lora_weights(str(tmp_path / "run.safetensors"))
    from_kohya = _images(fresh)
    kohya_embeds = _prompt_embeds(fresh, arch)

    assert np.abs(trained - base).mean() > 0.02  # the LoRA really changes the images
    # Same images as the model that was saved: all modules there, scaled by alpha / rank.
    np.testing.assert_allclose(from_diffusers, trained, atol=1e-4)
    np.testing.assert_allclose(from_kohya, from_diffusers, atol=1e-4)
    torch.testing.assert_close(diffusers_embeds, trained_embeds)
    torch.testing.assert_close(kohya_embeds, trained_embeds)
    assert torch.equal(trained_embeds, base_embeds) != text_encoder


def test_metadata_in_both_files(tmp_path: Path):
    pipe, arch, encoders = _lora_pipe("tiny-sdxl")
    save_lora(tmp_path, pipe.unet, encoders, arch, metadata=_metadata("tiny-sdxl", arch), kohya_name="toy-run")
    _, diffusers_meta = load_kohya(tmp_path / DIFFUSERS_LORA)
    _, kohya_meta = load_kohya(tmp_path / "toy-run.safetensors")
    ours = {
        "sdlora.version": sdlora.__version__,
        "sdlora.base_model": "tiny-sdxl",
        "sdlora.architecture": "sdxl",
        "sdlora.rank": "4",
        "sdlora.alpha": "2",
        "sdlora.token": "sks",
        "sdlora.class_word": "toy",
        "sdlora.steps": "12",
        "sdlora.resolution": "64",
        "sdlora.seed": "3",
    }
    for meta in (diffusers_meta, kohya_meta):
        assert ours.items() <= meta.items()
    # diffusers keeps its own keys, and its adapter config carries lora_alpha != rank
    adapter = json.loads(diffusers_meta["lora_adapter_metadata"])
    assert (adapter["unet.r"], adapter["unet.lora_alpha"]) == (RANK, ALPHA)
    assert diffusers_meta["format"] == "pt"
    assert "lora_adapter_metadata" not in kohya_meta
    # only the LoraConfig fields that shape the adapter: a field an older peft lacks would fail LoraConfig(**meta)
    assert {key.partition(".")[2] for key in adapter} == set(export.ADAPTER_FIELDS)
    # each file says which programs read it
    assert diffusers_meta["sdlora.format"] == "diffusers" and kohya_meta["sdlora.format"] == "kohya"
    assert diffusers_meta["sdlora.load_in"].startswith(
        "diffusers only: pipe.load_lora_weights(folder). Not for ComfyUI"
    )
    assert "use toy-run.safetensors beside it" in diffusers_meta["sdlora.load_in"]
    assert kohya_meta["sdlora.load_in"].startswith("ComfyUI, AUTOMATIC1111, Forge, kohya sd-scripts")
    assert {
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "2",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": "toy-run",
        "modelspec.resolution": "64x64",
    }.items() <= kohya_meta.items()

    sd_meta = build_metadata(
        base_model="tiny-sd", arch=SD1, rank=16, alpha=16.0, token="t", class_word="c", steps=1, resolution=512
    )
    assert sd_meta["sdlora.alpha"] == "16" and sd_meta["sdlora.architecture"] == "sd1"
    assert all(isinstance(v, str) for v in sd_meta.values())
    sd_kohya = export.kohya_metadata(SD1, LoraConfig(r=16, lora_alpha=8), sd_meta, "t")
    assert sd_kohya["ss_base_model_version"] == "sd_v1"
    assert sd_kohya["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert sd_kohya["ss_network_alpha"] == "8"


def test_load_kohya_errors(tmp_path: Path):
    with pytest.raises(RunError, match="no such LoRA file"):
        load_kohya(tmp_path / "missing.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RunError, match="broken.safetensors: damaged or incomplete file"):
        load_kohya(tmp_path / "broken.safetensors")


def test_unknown_keys_raise(tmp_path: Path):
    names = KohyaNames(SD1, 2)
    good = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4),
    }
    kohya_to_peft(good, names)
    for bad in (
        "lora_unet_conv_in.lora_down.weight",  # outside the tables
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a",  # LoHa
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",  # no 2nd encoder in SD 1.x
        "lora_vae_decoder_conv_in.lora_down.weight",
    ):
        with pytest.raises(KohyaKeyError):
            kohya_to_peft({**good, bad: torch.zeros(4, 4)}, names)
    for sgm in (
        "lora_unet_input_blocks_3_0_op",  # a downsampler
        "lora_unet_input_blocks_0_0",  # conv_in
        "lora_unet_output_blocks_8_1_conv",  # an upsampler
        "lora_unet_down_blocks_1_attentions_0_proj_in",
    ):  # diffusers names in an SDXL file
        with pytest.raises(KohyaKeyError):
            KohyaNames(SDXL, 2).from_kohya(sgm)

    # A LoRA on a module the kohya format cannot name: found before training, and no file is written.
    pipe, arch, encoders = _lora_pipe("tiny-sd", targets=["to_q", "conv1"], text_encoder=True)
    check_exportable(pipe.unet, encoders, arch)
    pipe, arch, _ = _lora_pipe("tiny-sd", targets=["to_q", "conv_in"])
    with pytest.raises(KohyaKeyError, match="conv_in"):
        check_exportable(pipe.unet, None, arch)
    with pytest.raises(SdloraError, match="conv_in"):  # one line in the CLI
        save_lora(tmp_path, pipe.unet, None, arch, metadata={}, kohya_name="run")
    assert list(tmp_path.iterdir()) == []


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pipe, arch, _ = _lora_pipe("tiny-sd", targets=["to_q", "to_v"])
    save_lora(tmp_path, pipe.unet, None, arch, metadata=_metadata("tiny-sd", arch), kohya_name="run")
    assert sorted(p.name for p in tmp_path.iterdir()) == [DIFFUSERS_LORA, "run.safetensors"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    # The second file fails half-way: neither file changes, no temp file is left behind.
    _randomize(pipe.unet, torch.Generator().manual_seed(99))
    real_save, calls = export.save_file, []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half")
            raise OSError("disk full")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(export, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_lora(tmp_path, pipe.unet, None, arch, metadata=_metadata("tiny-sd", arch), kohya_name="run")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    monkeypatch.setattr(export, "save_file", real_save)
    save_lora(tmp_path, pipe.unet, None, arch, metadata=_metadata("tiny-sd", arch), kohya_name="run")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in after)

    for bad_name in ("", "../run", "sub/run", ".hidden", "pytorch_lora_weights"):
        with pytest.raises(ConfigError):
            save_lora(tmp_path, pipe.unet, None, arch, metadata={}, kohya_name=bad_name)


def test_dora(tmp_path: Path):
    """DoRA: the diffusers file reloads exactly; the kohya file holds LyCORIS output-axis dora_scale."""
    pipe, arch, _ = _lora_pipe("tiny-sd", dora=True, targets=["to_q", "to_out.0", "conv1"])
    save_lora(tmp_path, pipe.unet, None, arch, metadata=_metadata("tiny-sd", arch), kohya_name="run")
    kohya, meta = load_kohya(tmp_path / "run.safetensors")
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["dora_wd"] == "True"
    lora, _ = kohya_to_peft(kohya, KohyaNames.for_models(arch, pipe.unet.config))
    expected = get_peft_model_state_dict(pipe.unet)
    assert any("lora_magnitude_vector" in k for k in expected)
    assert set(lora["unet"]) == set(expected) and all(torch.equal(lora["unet"][k], v) for k, v in expected.items())

    # Merging by the LyCORIS rule (W + alpha/r up@down, rescaled per output row to dora_scale)
    # reproduces peft's DoRA layer.
    for path, name in [
        (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        ),
        ("up_blocks.0.resnets.1.conv1", "lora_unet_up_blocks_0_resnets_1_conv1"),
    ]:
        layer = pipe.unet.get_submodule(path)
        base = layer.base_layer.weight
        up, down = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"]
        scale = kohya[f"{name}.dora_scale"]
        assert scale.shape == (base.shape[0], *[1] * (base.dim() - 1))
        merged = base + kohya[f"{name}.alpha"] / RANK * (up.flatten(1) @ down.flatten(1)).reshape(base.shape)
        merged = scale * merged / merged.flatten(1).norm(dim=1).reshape(scale.shape)
        with torch.no_grad():
            if base.dim() == 2:
                x = torch.randn(3, base.shape[1])
                torch.testing.assert_close(layer(x), F.linear(x, merged, layer.base_layer.bias))
            else:
                x = torch.randn(1, base.shape[1], 8, 8)
                torch.testing.assert_close(layer(x), layer.base_layer._conv_forward(x, merged, layer.base_layer.bias))

    fresh, _ = load_pipeline("tiny-sd")
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(tmp_path)
    np.testing.assert_allclose(_images(fresh), _images(pipe), atol=1e-4)


@pytest.mark.parametrize("damage", [lambda b: b[:-1], lambda b: b[: len(b) // 3], lambda b: b"", lambda b: b"{}" * 40])
def test_every_reader_of_our_files_names_a_damaged_one(tmp_path: Path, damage):
    """safetensors_io is the one reader: kohya round trips, the sampler's checks and the embedding loader."""
    from sdlora import safetensors_io
    from sdlora.generate.pipeline import load_embeddings

    path = tmp_path / "run.safetensors"
    from safetensors.torch import save_file

    save_file({"emb_params": torch.ones(1, 32)}, str(path), metadata={"sdlora.rank": "4"})
    assert safetensors_io.read_metadata(path) == {"sdlora.rank": "4"} and safetensors_io.problem(path) is None
    path.write_bytes(damage(path.read_bytes()))
    message = rf"^{re.escape(str(path))}: damaged or incomplete file \(.+\); re-export it or train again$"
    for read in (load_kohya, safetensors_io.read_metadata, lambda p: load_embeddings(None, SD1, p, "sks")):
        with pytest.raises(RunError, match=message):
            read(path)
    assert re.match(message, safetensors_io.problem(path))
