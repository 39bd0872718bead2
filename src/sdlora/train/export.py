"""Writing a trained LoRA: the diffusers file and the kohya file, both with sdlora's metadata.

- `pytorch_lora_weights.safetensors`: written by the pipeline class's own `save_lora_weights`
  (peft state dicts with `unet.` / `text_encoder.` prefixes, as `save_lora_adapter` writes them,
  plus each adapter's LoraConfig as diffusers' adapter metadata, so a lora_alpha other than the
  rank survives loading), so that `pipe.load_lora_weights(out_dir)` loads it.
- `<kohya_name>.safetensors`: the same weights in kohya's format for AUTOMATIC1111 / ComfyUI
  (the family's `kohya_lora`: train/kohya.py for the UNets, models/families/flux_keys.py for FLUX.1),
  with the `ss_*` and `modelspec.*` keys those tools read; not written where the family has no layout
  for the adapter (`Family.writes_kohya`: FLUX.1's LoKr, LoHa, DoRA).

Both files get the `sdlora.*` metadata of `build_metadata`, and `sdlora.format` / `sdlora.load_in`
saying which programs read that file (the diffusers file is not for ComfyUI or A1111: their key maps
know neither peft-style UNet keys nor text-encoder keys without `text_model.`). Nothing is written before both files
are fully built, and each lands by rename: a failure leaves the previous files as they were.
`export_lora` writes a training run's LoRA (and the token's embedding, when it trained) as one set: into
a temp folder that replaces `lora/` (or `best/`) whole (`fsutil.atomic_folder`). Every file carries
the step in `sdlora.steps`; `sdlora sample` refuses a LoRA and an embedding of different steps.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from safetensors.torch import save_file

import sdlora
from sdlora.errors import ConfigError
from sdlora.fsutil import atomic_folder, atomic_path, writing
from sdlora.lora_format import META_PREFIX, PEFT_CONFIG
from sdlora.models.families import Family
from sdlora.run import DIFFUSERS_LORA
from sdlora.train import fsdp
from sdlora.train.kohya import (
    KohyaNames,
    base_model_keys,
    load_kohya,
    lycoris_scales,
    module_alphas,
    peft_to_lycoris,
)

if TYPE_CHECKING:
    from sdlora.train.state import TrainState

ADAPTER = "default"

# Which program reads which file: in each file's metadata (`sdlora.load_in`) and in the README.
DIFFUSERS_USE = (
    "diffusers only: pipe.load_lora_weights(folder). Not for ComfyUI, AUTOMATIC1111 or Forge "
    "(their loaders do not map these peft-style keys): use {kohya_file} beside it"
)
# A family without a kohya key map yet (`Family.writes_kohya`): the diffusers file alone.
DIFFUSERS_ONLY_USE = (
    "diffusers: pipe.load_lora_weights(folder). No ComfyUI / AUTOMATIC1111 file is written for this model family yet"
)
KOHYA_USE = (
    "ComfyUI, AUTOMATIC1111, Forge, kohya sd-scripts; diffusers reads it too "
    "(pipe.load_lora_weights(folder, weight_name=this file's name))"
)


def _number(value: float) -> str:
    """16.0 -> "16", 0.5 -> "0.5": how sd-scripts prints network_alpha."""
    return f"{float(value):g}"


def build_metadata(
    *,
    base_model: str,
    arch: Family,
    rank: int,
    alpha: float,
    token: str,
    class_word: str,
    steps: int,
    resolution: int,
    **extra: str,
) -> dict[str, str]:
    """sdlora's header metadata (all strings, keys `sdlora.<name>`); `extra` adds more keys the same way."""
    metadata = {
        "version": sdlora.__version__,
        "base_model": base_model,
        "architecture": arch.name,
        "rank": str(int(rank)),
        "alpha": _number(alpha),
        "token": token,
        "class_word": class_word,
        "steps": str(int(steps)),
        "resolution": str(int(resolution)),
        **{key: str(value) for key, value in extra.items()},
    }
    return {META_PREFIX + key: value for key, value in metadata.items()}


def kohya_metadata(
    arch: Family, lora_config: Any, metadata: Mapping[str, str], title: str, denoiser_config: Any = None
) -> dict[str, str]:
    """The keys AUTOMATIC1111 / ComfyUI / civitai read from a kohya LoRA (sd-scripts' train_network.py); the
    modelspec architecture as the family names it for the denoiser's config (FLUX.1 [dev] or [schnell])."""
    out = {
        # A1111 files a LoRA as SDXL only by this key.
        "ss_base_model_version": arch.kohya_base_version,
        "ss_network_module": arch.kohya_network_module,
        "ss_network_dim": str(int(lora_config.r)),
        "ss_network_alpha": _number(getattr(lora_config, "lora_alpha", None) or lora_config.alpha),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch.modelspec_arch(denoiser_config or {}),
        "modelspec.implementation": arch.modelspec_implementation,
        "modelspec.title": title,
    }
    algo = lycoris_algo(lora_config)
    if algo is not None:  # LyCORIS' own algorithms, as its kohya-compatible wrapper names them
        out["ss_network_module"] = "lycoris.kohya"
        args = {"algo": algo}
        if algo == "lokr":
            args.update(factor=str(lora_config.decompose_factor), decompose_both=str(lora_config.decompose_both))
        out["ss_network_args"] = json.dumps(args)
    elif lora_config.use_dora:  # dora_scale is LyCORIS's extension of the format
        out["ss_network_module"] = "lycoris.kohya"
        out["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
    if "sdlora.base_model" in metadata:  # the name and, for a model file, its hashes (kohya's keys)
        out.update(base_model_keys(metadata["sdlora.base_model"]))
    if "sdlora.steps" in metadata:
        out["ss_steps"] = metadata["sdlora.steps"]
    if "sdlora.resolution" in metadata:
        size = metadata["sdlora.resolution"]
        out["ss_resolution"] = f"({size}, {size})"
        out["modelspec.resolution"] = f"{size}x{size}"
    if "sdlora.token" in metadata:
        out["modelspec.trigger_phrase"] = metadata["sdlora.token"]
    out["ss_output_name"] = title
    return out


# The LoraConfig fields that shape a loaded adapter. Only these go into the diffusers file's adapter
# metadata: diffusers builds `LoraConfig(**metadata)`, and a field that a user's older peft does not
# know (peft adds some in most releases) would make the whole file unloadable there.
ADAPTER_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "bias",
    "fan_in_fan_out",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
)


def lycoris_algo(config: Any) -> str | None:
    """ "lokr" / "loha" for a peft LoKrConfig / LoHaConfig, None for a LoRA (or DoRA)."""
    kind = str(getattr(config, "peft_type", "")).rsplit(".", 1)[-1].lower()
    return kind if kind in ("lokr", "loha") else None


def adapter_metadata(config: Any) -> dict[str, Any]:
    """The LoraConfig as diffusers' adapter metadata, limited to ADAPTER_FIELDS."""
    full = config.to_dict()
    return {key: full[key] for key in ADAPTER_FIELDS if key in full}


def _components(
    unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module] | None, arch: Family
) -> dict[str, torch.nn.Module]:
    """Pipeline attribute name -> model carrying the LoRA adapter (the denoiser under `arch.denoiser`)."""
    models = {arch.denoiser: unet}
    if text_encoders:
        names = arch.lora_text_encoders()
        if len(text_encoders) != len(names):
            raise ValueError(f"an {arch.name} LoRA has {len(names)} text encoder(s), got {len(text_encoders)}")
        models.update(zip(names, text_encoders))
    for name, model in models.items():
        if ADAPTER not in getattr(model, "peft_config", {}):
            raise ValueError(f"the {name} has no LoRA adapter {ADAPTER!r} to save")
    return models


def _diffusers_file(
    folder: Path, arch: Family, lora: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of the file the pipeline's own `save_lora_weights` writes (in a temp folder)."""
    pipeline_class = arch.pipeline_cls()
    kwargs: dict[str, Any] = {}
    for name, state_dict in lora.items():
        # peft keys as they are: `convert_state_dict_to_diffusers` renames only the attention
        # projections (to_q.lora.down), and diffusers' loader decides the format of the whole UNet
        # dict from its first key, so a mix (with ff.net / proj_in targets) would load half the LoRA.
        kwargs[f"{name}_lora_layers"] = dict(state_dict)
        kwargs[f"{name}_lora_adapter_metadata"] = adapter_metadata(configs[name])
    with tempfile.TemporaryDirectory(dir=folder, prefix=".diffusers-") as tmp:
        pipeline_class.save_lora_weights(tmp, **kwargs)
        return load_kohya(Path(tmp) / DIFFUSERS_LORA)  # any safetensors file: tensors + header


PEFT_USE = (
    "peft only (diffusers' load_lora_weights reads no LoKr/LoHa): inject the sdlora.peft_config adapter, then "
    "set_peft_model_state_dict per component prefix. For ComfyUI, AUTOMATIC1111 or Forge use {kohya_file} beside it"
)


def _peft_file(
    lora: Mapping[str, Mapping[str, torch.Tensor]], configs: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoKr/LoHa in peft's own keys with diffusers' component prefixes (`unet.`, `text_encoder.`) and each
    component's peft config: diffusers cannot load LyCORIS adapters, so this file is for peft."""
    tensors = {f"{name}.{key}": t.detach().cpu().contiguous() for name, sd in lora.items() for key, t in sd.items()}
    peft_configs = {name: config.to_dict() for name, config in configs.items()}
    return tensors, {PEFT_CONFIG: json.dumps(peft_configs, default=_json_value)}


def _json_value(value: Any) -> Any:
    """peft configs hold sets (target_modules): as sorted lists, so the config loads back as it was."""
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def check_exportable(unet: torch.nn.Module, text_encoders: Sequence[torch.nn.Module] | None, arch: Family) -> None:
    """Raise `KohyaKeyError` now if `save_lora` could not name a LoRA module: call it before training."""
    models = _components(unet, text_encoders, arch)
    if not arch.writes_kohya(models[arch.denoiser].peft_config[ADAPTER]):
        return
    paths = {name: [*module_alphas(model, ADAPTER), *lycoris_scales(model, ADAPTER)] for name, model in models.items()}
    arch.check_kohya_names(paths, unet.config, text_encoders)


def save_lora(
    out_dir: Path,
    unet: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module] | None,
    arch: Family,
    *,
    metadata: dict[str, str],
    kohya_name: str,
) -> None:
    """Write out_dir/pytorch_lora_weights.safetensors (diffusers) and out_dir/<kohya_name>.safetensors (kohya).

    `unet` and `text_encoders` carry a peft adapter named "default" (`add_adapter(LoraConfig(...))`);
    `text_encoders` (the family's `lora_text_encoders`, in order) only when they were trained.
    """
    from peft import get_peft_model_state_dict

    out_dir = Path(out_dir)
    kohya_file = f"{kohya_name}.safetensors"
    plain = bool(kohya_name) and Path(kohya_name).name == kohya_name and not kohya_name.startswith(".")
    if not plain or kohya_file == DIFFUSERS_LORA:
        raise ConfigError(f"{kohya_name!r} cannot name the kohya LoRA file; use a plain file name such as the run name")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must be strings: {bad}")

    models = _components(unet, text_encoders, arch)
    lora = {
        name: get_peft_model_state_dict(model, state_dict=fsdp.gathered_state_dict(model), adapter_name=ADAPTER)
        for name, model in models.items()
    }
    configs = {name: model.peft_config[ADAPTER] for name, model in models.items()}
    algo = lycoris_algo(configs[arch.denoiser])
    kohya = _kohya_file(arch, unet, text_encoders, models, lora, configs, metadata, kohya_name)

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, header = _diffusers_file(out_dir, arch, lora, configs) if algo is None else _peft_file(lora, configs)
    use = DIFFUSERS_USE if algo is None else PEFT_USE
    if kohya is None:  # no kohya file beside it to point to
        use = DIFFUSERS_ONLY_USE if algo is None else PEFT_USE.split(". For ComfyUI")[0]
    diffusers_meta = {
        **metadata,
        f"{META_PREFIX}format": "diffusers",
        f"{META_PREFIX}load_in": use.format(kohya_file=kohya_file),
        **header,  # diffusers' own keys (format, lora_adapter_metadata) win
    }
    with atomic_path(out_dir / DIFFUSERS_LORA) as diffusers_tmp:
        with writing(out_dir / DIFFUSERS_LORA):  # a full disk names the file being written, not the last one opened
            save_file(tensors, str(diffusers_tmp), metadata=diffusers_meta)
        if kohya is None:
            return
        with atomic_path(out_dir / kohya_file) as kohya_tmp, writing(out_dir / kohya_file):
            save_file(kohya[0], str(kohya_tmp), metadata=kohya[1])


def _kohya_file(
    arch: Family,
    unet: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module] | None,
    models: Mapping[str, torch.nn.Module],
    lora: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, Any],
    metadata: Mapping[str, str],
    kohya_name: str,
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Tensors and header of the kohya file; None where the family writes none for this adapter
    (`Family.writes_kohya`). Built before anything is written: an unmappable module fails first."""
    if not arch.writes_kohya(configs[arch.denoiser]):
        return None
    algo = lycoris_algo(configs[arch.denoiser])
    if algo is None:
        alphas = {name: module_alphas(model, ADAPTER) for name, model in models.items()}
        kohya = arch.kohya_lora(lora, alphas, unet.config, text_encoders)
    else:  # LyCORIS: train/kohya.py's names (families with a layout of their own write none, above)
        names = KohyaNames.for_models(arch, unet.config, text_encoders)
        kohya = peft_to_lycoris(lora, {name: lycoris_scales(model, ADAPTER) for name, model in models.items()}, names)
    kohya_meta = {
        **metadata,
        **kohya_metadata(arch, configs[arch.denoiser], metadata, title=kohya_name, denoiser_config=unet.config),
        f"{META_PREFIX}format": "kohya",
        f"{META_PREFIX}load_in": KOHYA_USE,
    }
    return kohya, kohya_meta


def export_lora(state: TrainState, out_dir: Path, *, main_only: bool = False) -> Path:
    """A training run's LoRA in diffusers and kohya format, with metadata, and the token's embedding beside
    it when that trained (lora/embeddings.safetensors). Only the main process writes."""
    if not state.is_main:
        return out_dir
    from sdlora.run import EMBEDDINGS
    from sdlora.train.embeddings import save_embeddings

    cfg = state.cfg
    metadata = build_metadata(
        base_model=cfg.model.name,
        arch=state.arch,
        rank=cfg.lora.rank,
        alpha=cfg.effective_alpha,
        token=str(cfg.data.token),
        class_word=str(cfg.data.class_word),
        steps=state.step,
        resolution=int(cfg.data.resolution),  # type: ignore[arg-type]
        seed=str(cfg.train.seed),
        learning_rate=str(cfg.train.learning_rate),
        dora=str(cfg.lora.dora).lower(),
        lora_type=cfg.lora.lora_type,
        run=state.run_dir.name,
    )
    encoders = [state.unwrap(e) for e in state.text_encoders] if state.text_encoders else None
    if state.tokens is not None:
        metadata[f"{META_PREFIX}token_embedding"] = EMBEDDINGS  # the LoRA expects the token's embedding beside it
    # One set: written into a temp folder that then replaces out_dir whole, so a kill or a full disk never
    # leaves a LoRA beside an embedding of another step, nor an older run name's kohya file beside the new.
    with atomic_folder(out_dir) as tmp:
        save_lora(tmp, state.unwrap(state.unet), encoders, state.arch, metadata=metadata, kohya_name=state.run_dir.name)
        if state.tokens is not None:
            save_embeddings(
                tmp / EMBEDDINGS,
                state.tokens,
                state.arch,
                {**metadata, f"{META_PREFIX}init_token": str(cfg.embedding.init_token)},
            )
    return out_dir
