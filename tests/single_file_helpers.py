"""Single-file checkpoints written from the tiny models, in the original (LDM / SGM) layout that Civitai and
ComfyUI files have: the inverse of diffusers' single-file key conversion (what diffusers'
`scripts/convert_diffusers_to_original_stable_diffusion.py` does for the real sizes), for any block count.

`write_single_file(pipe, path)` writes the file; `tiny_configs(root)` writes the tiny models' configs as
`root/sd15/` and `root/sdxl/`, the shape of sdlora's shipped `models/base_configs/`, so a test points
`single_file.CONFIGS` at them and the file loads back through the real `from_single_file` path.

The SDXL file comes from `tiny_sdxl_wide()`, tiny-sdxl with a wider second text encoder (48 against 32):
diffusers tells SDXL's two encoders apart by their widths (768 and 1280 in the real model), and with
tiny-sdxl's two 32-wide ones it would load the first encoder's weights into the second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

RESNET = (  # diffusers -> original, inside a UNet resnet
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
VAE_ATTENTION = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def _replace_all(text: str, pairs) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def _unet(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]}
    if config.addition_embed_type == "text_time":
        fixed.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    per = config.layers_per_block + 1
    up_has_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key in fixed:
            new = fixed[key]
        elif parts[0] == "down_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                new = f"input_blocks.{per * (block + 1)}.0.op." + ".".join(parts[5:])
            else:
                index = per * block + int(parts[3]) + 1
                rest = ".".join(parts[4:])
                new = (
                    f"input_blocks.{index}.0.{_replace_all(rest, RESNET)}"
                    if kind == "resnets"
                    else (f"input_blocks.{index}.1.{rest}")
                )
        elif parts[0] == "mid_block":
            rest = ".".join(parts[3:])
            if parts[1] == "resnets":
                new = f"middle_block.{2 * int(parts[2])}.{_replace_all(rest, RESNET)}"
            else:
                new = f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                slot = 2 if block in up_has_attention else 1
                new = f"output_blocks.{per * block + per - 1}.{slot}." + ".".join(parts[4:])
            else:
                index = per * block + int(parts[3])
                rest = ".".join(parts[4:])
                new = (
                    f"output_blocks.{index}.0.{_replace_all(rest, RESNET)}"
                    if kind == "resnets"
                    else (f"output_blocks.{index}.1.{rest}")
                )
        else:
            raise KeyError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def _vae(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n = len(config.up_block_types)
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key in fixed:
            new = fixed[key]
        elif parts[1] == "down_blocks":
            if parts[3] == "downsamplers":
                new = f"encoder.down.{parts[2]}.downsample." + ".".join(parts[5:])
            else:
                new = f"encoder.down.{parts[2]}.block.{parts[4]}." + ".".join(parts[5:])
        elif parts[1] == "up_blocks":
            block = n - 1 - int(parts[2])
            if parts[3] == "upsamplers":
                new = f"decoder.up.{block}.upsample." + ".".join(parts[5:])
            else:
                new = f"decoder.up.{block}.block.{parts[4]}." + ".".join(parts[5:])
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
        elif parts[1] == "mid_block":
            new = f"{parts[0]}.mid.attn_1." + _replace_all(".".join(parts[4:]), VAE_ATTENTION)
            if value.ndim == 2:  # the original attention is 1x1 convolutions
                value = value[:, :, None, None]
        else:
            raise KeyError(f"unmapped VAE key {key}")
        out["first_stage_model." + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def _clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModel as the original files hold it: the transformers keys under `text_model.`."""
    return {prefix + "text_model." + key.removeprefix("text_model."): value for key, value in state.items()}


def _open_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection in open_clip's layout (SDXL's second text encoder)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("text_model.")
        if key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.split(".")[-1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            parts = key.split(".")
            layer, rest = parts[2], ".".join(parts[3:])
            base = f"transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(base + "attn.in_proj_" + parts[-1], {})[rest.split(".")[1]] = value
                continue
            rest = _replace_all(
                rest,
                (
                    ("self_attn.", "attn."),
                    ("layer_norm1", "ln_1"),
                    ("layer_norm2", "ln_2"),
                    ("fc1", "c_fc"),
                    ("fc2", "c_proj"),
                ),
            )
            out[base + rest] = value
        elif key != "embeddings.position_ids":
            raise KeyError(f"unmapped text encoder key {key}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return {prefix + key: value for key, value in out.items()}


def original_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the keys an original SD 1.x / SDXL checkpoint uses."""
    state = {**_unet(pipe.unet.state_dict(), pipe.unet.config), **_vae(pipe.vae.state_dict(), pipe.vae.config)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        state.update(_clip(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        state.update(_open_clip(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    else:
        state.update(_clip(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    return {key: value.detach().contiguous() for key, value in state.items()}


def write_single_file(pipe: Any, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(original_state_dict(pipe), str(path))
    return path


def tiny_sdxl_wide() -> Any:
    """tiny-sdxl with a 48-wide second text encoder: diffusers' single-file loader tells SDXL's two text
    encoders apart by width, so tiny-sdxl's two 32-wide ones would load into each other."""
    from sdlora.models import tiny

    return tiny.tiny_sdxl(text_encoder_2_width=48)


def tiny_pipeline(family: str) -> Any:
    from sdlora.models.loading import load_pipeline

    return load_pipeline("tiny-sd")[0] if family == "sd15" else tiny_sdxl_wide()


def tiny_configs(root: Path, pipes: dict[str, Any] | None = None) -> Path:
    """root/sd15 and root/sdxl with the tiny models' component configs (JSON only), as base_configs/ holds them;
    `pipes` (family -> pipeline) saves building them again."""
    for family in ("sd15", "sdxl"):
        pipe = (pipes or {}).get(family) or tiny_pipeline(family)
        folder = root / family
        index = {"_class_name": type(pipe).__name__}
        for name, component in pipe.components.items():
            if component is None or name.startswith("tokenizer") or name in ("feature_extractor", "safety_checker"):
                continue
            library = "transformers" if name.startswith("text_encoder") else "diffusers"
            index[name] = [library, type(component).__name__]
            (folder / name).mkdir(parents=True, exist_ok=True)
            if library == "transformers":
                (folder / name / "config.json").write_text(component.config.to_json_string())
            else:
                component.save_config(folder / name)
        for name in ("tokenizer", "tokenizer_2"):
            if getattr(pipe, name, None) is not None:
                index[name] = ["transformers", "CLIPTokenizer"]
        if family == "sd15":
            index.update(safety_checker=[None, None], feature_extractor=[None, None])
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
