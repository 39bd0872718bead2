"""The kohya LoRA format (sd-scripts, AUTOMATIC1111, ComfyUI): name tables and one converter each way.

A kohya file holds, per adapted module, `<name>.lora_down.weight` (peft's lora_A),
`<name>.lora_up.weight` (lora_B), a scalar `<name>.alpha` (the update is scaled by alpha / rank)
and, for DoRA, `<name>.dora_scale`. Module names are the module's path with dots turned into
underscores, behind a prefix per model:

- UNet, SD 1.x: the diffusers path, because sd-scripts trains SD 1.x on a diffusers-layout UNet
  (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`).
- UNet, SDXL: the original SGM path, because sd-scripts trains SDXL on SGM's own UNet
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`); the block numbers follow from
  the UNet config's `layers_per_block` (sd-scripts' `library/sdxl_model_util.py`; diffusers
  reverses it in `loaders/lora_conversion_utils.py::_maybe_map_sgm_blocks_to_diffusers`).
- Text encoders: `lora_te_` (SD 1.x), `lora_te1_` / `lora_te2_` (SDXL), then the transformers
  path (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`).

Underscores are ambiguous on the way back, so both directions go through the tables below, and a
module outside them is an error rather than a guess. Supported: every linear/conv layer of the
UNet's attention blocks and resnets, and the text encoders' attention and MLP projections.

DoRA: peft keeps one magnitude per output feature (`lora_magnitude_vector`, shape (out,), or
(1, out, 1, 1) for convs). It is written as `dora_scale` of shape (out, 1[, 1, 1]): LyCORIS's
layout for a decomposition on the output axis (`wd_on_out`), the one ComfyUI and Forge recognise
by its first dimension. AUTOMATIC1111's built-in loader only knows input-axis DoRA, and
diffusers' `load_lora_weights` drops `dora_scale` from kohya files with a warning: in diffusers,
load a DoRA from the diffusers-format file instead.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import torch

from sdlora.errors import SdloraError

if TYPE_CHECKING:  # the families call this module (base.Family's kohya methods): no import back at run time
    from sdlora.models.families.base import Family

UNET = "unet"
UNET_PREFIX = "lora_unet"

# peft state-dict suffix -> kohya suffix (the alpha is not a peft tensor; see `peft_to_kohya`).
PEFT_TO_KOHYA_SUFFIX = {
    ".lora_A.weight": ".lora_down.weight",
    ".lora_B.weight": ".lora_up.weight",
    ".lora_magnitude_vector": ".dora_scale",
}
KOHYA_TO_PEFT_SUFFIX = {v: k for k, v in PEFT_TO_KOHYA_SUFFIX.items()}
ALPHA_SUFFIX = ".alpha"

# Module paths inside one block, "{}" standing for a number: (diffusers path, SGM path).
# A Transformer2DModel has the same inner names in diffusers and in SGM's SpatialTransformer.
_ATTENTION_INNER = [
    "proj_in",
    "proj_out",
    *(
        f"transformer_blocks.{{}}.{attn}.{proj}"
        for attn in ("attn1", "attn2")
        for proj in ("to_q", "to_k", "to_v", "to_out.0")
    ),
    "transformer_blocks.{}.ff.net.0.proj",
    "transformer_blocks.{}.ff.net.2",
]
ATTENTION_MODULES: list[tuple[str, str]] = [(p, p) for p in _ATTENTION_INNER]
RESNET_MODULES: list[tuple[str, str]] = [
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]
# Inside the CLIP text transformer (kohya names put `text_model_` before these).
TEXT_ENCODER_MODULES: list[str] = [
    *(f"encoder.layers.{{}}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")),
    "encoder.layers.{}.mlp.fc1",
    "encoder.layers.{}.mlp.fc2",
]
# SGM's middle block is resnet, attention, resnet.
SGM_MIDDLE = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}

_DIFFUSERS_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)")
_DIFFUSERS_MID = re.compile(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)")


def _template_regex(template: str, sep: str) -> re.Pattern[str]:
    parts = [re.escape(p.replace(".", sep)) for p in template.split("{}")]
    return re.compile(r"(\d+)".join(parts))


def _translate(name: str, pairs: Iterable[tuple[str, str]], src_sep: str = ".", dst_sep: str = ".") -> str | None:
    """`name` matched against the left templates (separator `src_sep`), rendered with the right one."""
    for left, right in pairs:
        match = _template_regex(left, src_sep).fullmatch(name)
        if match:
            return right.replace(".", dst_sep).format(*match.groups())
    return None


class KohyaKeyError(SdloraError, ValueError):
    """A module or key that has no place in the kohya format (or in the model)."""


@dataclass(frozen=True)
class KohyaNames:
    """Module names of one model family: diffusers/transformers paths <-> kohya names."""

    family: Family
    layers_per_block: int  # the UNet's; SDXL block numbers depend on it
    # Per text encoder, the path of its CLIP text transformer inside the model: "text_model." for
    # CLIPTextModelWithProjection (and CLIPTextModel before transformers 5), "" for transformers 5's
    # CLIPTextModel. kohya names always read `text_model_encoder_...`.
    text_roots: tuple[str, ...] = ()

    @classmethod
    def for_models(
        cls, family: Family, unet_config: Mapping[str, Any], text_encoders: Sequence[torch.nn.Module] | None = None
    ) -> "KohyaNames":
        """Names for a UNet config and (optionally) the text encoders paths are read from and written for."""
        layers = unet_config.get("layers_per_block")
        if not isinstance(layers, int):
            raise KohyaKeyError(f"the kohya format needs one layers_per_block for the whole UNet, got {layers!r}")
        roots = tuple(_text_root(encoder) for encoder in text_encoders or ())
        return cls(family, layers, roots)

    @classmethod
    def for_text_encoders(cls, family: Family, text_encoders: Sequence[torch.nn.Module] | None) -> "KohyaNames":
        """Names of the text encoders' modules alone, for a family whose denoiser has a key map of its own
        (the transformers': models/families/transformer.py); its `unet` part is never asked."""
        return cls(family, 0, tuple(_text_root(encoder) for encoder in text_encoders or ()))

    @property
    def _sgm(self) -> bool:
        """Whether kohya names the UNet's layers by SGM's paths (`Family.kohya_unet_layout`), not diffusers'."""
        return self.family.kohya_unet_layout == "sgm"

    @property
    def prefixes(self) -> dict[str, str]:
        """Component (pipeline attribute) -> kohya prefix."""
        return {UNET: UNET_PREFIX, **dict(zip(self.family.text_encoders, self.family.kohya_te_prefixes))}

    def _root(self, component: str) -> str:
        trained = self.family.lora_text_encoders()  # `text_roots` are of the encoders a LoRA trains on
        index = trained.index(component) if component in trained else len(self.text_roots)
        return self.text_roots[index] if index < len(self.text_roots) else "text_model."

    # ------------------------------------------------------------------ to kohya

    def to_kohya(self, component: str, path: str) -> str:
        prefix = self.prefixes.get(component)
        if prefix is None:
            raise KohyaKeyError(f"no kohya prefix for model part {component!r} of an {self.family.name} pipeline")
        if component == UNET:
            inner = self._unet_to_kohya(path)
        else:
            root = self._root(component)
            inner = (
                _translate(path[len(root) :], [(t, f"text_model.{t}") for t in TEXT_ENCODER_MODULES], dst_sep="_")
                if path.startswith(root)
                else None
            )
        if inner is None:
            raise KohyaKeyError(
                f"a LoRA on {component} module {path!r} cannot be exported in kohya format; target "
                "UNet attention/resnet layers (to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,"
                "proj_in,proj_out,conv1,conv2,time_emb_proj) and text-encoder projections only"
            )
        return f"{prefix}_{inner}"

    def _unet_to_kohya(self, path: str) -> str | None:
        if match := _DIFFUSERS_BLOCK.fullmatch(path):
            kind, block, part, index, inner = match.groups()
        elif match := _DIFFUSERS_MID.fullmatch(path):
            kind, block, (part, index, inner) = "mid_block", "0", match.groups()
        else:
            return None
        table = ATTENTION_MODULES if part == "attentions" else RESNET_MODULES
        if not self._sgm:
            return path.replace(".", "_") if _translate(inner, table) is not None else None
        sgm_inner = _translate(inner, table, dst_sep="_")
        sgm_block = self._sgm_block(kind, int(block), part, int(index))
        return None if sgm_inner is None or sgm_block is None else f"{sgm_block}_{sgm_inner}"

    def _sgm_block(self, kind: str, block: int, part: str, index: int) -> str | None:
        """SGM block of a diffusers block: input_blocks.N.{0 resnet, 1 attention}, middle_block.N, ..."""
        per = self.layers_per_block
        sub = 1 if part == "attentions" else 0
        if kind == "down_blocks" and index < per:  # input_blocks.0 is conv_in; each block ends with a downsampler
            return f"input_blocks_{1 + block * (per + 1) + index}_{sub}"
        if kind == "up_blocks" and index <= per:  # up blocks have one layer more
            return f"output_blocks_{block * (per + 1) + index}_{sub}"
        if kind == "mid_block" and (part, index) in SGM_MIDDLE:
            return f"middle_block_{SGM_MIDDLE[part, index]}"
        return None

    # ------------------------------------------------------------------ from kohya

    def from_kohya(self, name: str) -> tuple[str, str]:
        """(component, module path) of a kohya module name."""
        for component, prefix in self.prefixes.items():
            if name.startswith(prefix + "_"):
                body = name[len(prefix) + 1 :]
                path = (
                    self._unet_from_kohya(body)
                    if component == UNET
                    else _translate(
                        body,
                        [(f"text_model.{t}", self._root(component) + t) for t in TEXT_ENCODER_MODULES],
                        src_sep="_",
                    )
                )
                if path is not None:
                    return component, path
                break
        raise KohyaKeyError(f"unrecognised kohya module {name!r} for an {self.family.name} LoRA")

    def _unet_from_kohya(self, body: str) -> str | None:
        block = self._parse_sgm(body) if self._sgm else self._parse_diffusers(body)
        if block is None:
            return None
        prefix, part, inner = block
        table = ATTENTION_MODULES if part == "attentions" else RESNET_MODULES
        pairs = [(sgm, d) for d, sgm in table] if self._sgm else [(d, d) for d, _ in table]
        inner_path = _translate(inner, pairs, src_sep="_")
        return None if inner_path is None else f"{prefix}.{inner_path}"

    @staticmethod
    def _parse_diffusers(body: str) -> tuple[str, str, str] | None:
        """(diffusers block path, "attentions"/"resnets", rest) of an SD 1.x kohya name."""
        if match := re.fullmatch(r"(down_blocks|up_blocks)_(\d+)_(attentions|resnets)_(\d+)_(.+)", body):
            kind, block, part, index, inner = match.groups()
            return f"{kind}.{block}.{part}.{index}", part, inner
        if match := re.fullmatch(r"mid_block_(attentions|resnets)_(\d+)_(.+)", body):
            part, index, inner = match.groups()
            return f"mid_block.{part}.{index}", part, inner
        return None

    def _parse_sgm(self, body: str) -> tuple[str, str, str] | None:
        """The same for an SDXL (SGM) kohya name; None for conv_in, samplers and anything else."""
        per = self.layers_per_block
        if match := re.fullmatch(r"(input_blocks|output_blocks)_(\d+)_([01])_(.+)", body):
            n, part, inner = int(match[2]), ("resnets", "attentions")[int(match[3])], match[4]
            if match[1] == "output_blocks":
                block, index = divmod(n, per + 1)
                return f"up_blocks.{block}.{part}.{index}", part, inner
            block, index = divmod(n - 1, per + 1)
            if n < 1 or index >= per:  # conv_in, or a downsampler
                return None
            return f"down_blocks.{block}.{part}.{index}", part, inner
        if match := re.fullmatch(r"middle_block_([012])_(.+)", body):
            part, index = {v: k for k, v in SGM_MIDDLE.items()}[int(match[1])]
            return f"mid_block.{part}.{index}", part, match[2]
        return None


def _text_root(encoder: torch.nn.Module) -> str:
    return "text_model." if isinstance(getattr(encoder, "text_model", None), torch.nn.Module) else ""


# ====================================================================== state dicts


def _split_peft_key(key: str) -> tuple[str, str]:
    for suffix in PEFT_TO_KOHYA_SUFFIX:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise KohyaKeyError(f"unrecognised LoRA tensor {key!r} (expected lora_A, lora_B or lora_magnitude_vector)")


def peft_to_kohya(
    lora: Mapping[str, Mapping[str, torch.Tensor]],
    alphas: Mapping[str, Mapping[str, float]],
    names: KohyaNames,
) -> dict[str, torch.Tensor]:
    """kohya state dict from peft state dicts (component -> `get_peft_model_state_dict`).

    `alphas[component][module path]` is the module's lora_alpha (written as is: never the rank).
    Raises `KohyaKeyError` on any key it cannot place.
    """
    out: dict[str, torch.Tensor] = {}
    for component, state_dict in lora.items():
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state_dict.items():
            path, suffix = _split_peft_key(key)
            modules.setdefault(path, {})[suffix] = tensor
        for path, tensors in modules.items():
            if ".lora_A.weight" not in tensors or ".lora_B.weight" not in tensors:
                raise KohyaKeyError(f"{component} module {path!r} lacks lora_A or lora_B")
            if path not in alphas.get(component, {}):
                raise KohyaKeyError(f"no lora_alpha known for {component} module {path!r}")
            name = names.to_kohya(component, path)
            up = tensors[".lora_B.weight"]
            for suffix, tensor in tensors.items():
                if suffix == ".lora_magnitude_vector":
                    # (out,) or (1, out, 1, 1) -> (out, 1[, 1, 1]): LyCORIS's output-axis dora_scale.
                    tensor = tensor.reshape(up.shape[0], *[1] * (up.dim() - 1))
                out[name + PEFT_TO_KOHYA_SUFFIX[suffix]] = tensor.detach().to("cpu").contiguous()
            out[name + ALPHA_SUFFIX] = torch.tensor(float(alphas[component][path]), dtype=torch.float32)
    return out


def kohya_to_peft(
    state_dict: Mapping[str, torch.Tensor], names: KohyaNames
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, float]]]:
    """The inverse of `peft_to_kohya`: (component -> peft state dict, component -> path -> alpha).

    A module without `.alpha` gets alpha = rank, as sd-scripts reads it.
    """
    lora: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    for key, tensor in state_dict.items():
        name, dot, rest = key.partition(".")
        suffix = dot + rest
        if suffix not in KOHYA_TO_PEFT_SUFFIX and suffix != ALPHA_SUFFIX:
            raise KohyaKeyError(f"unrecognised kohya tensor {key!r}")
        component, path = names.from_kohya(name)
        if suffix == ALPHA_SUFFIX:
            alphas.setdefault(component, {})[path] = float(tensor.item())
            continue
        if suffix == ".dora_scale":
            up = state_dict.get(name + ".lora_up.weight")
            if up is None or tensor.shape[0] != up.shape[0] or tensor[0].numel() != 1:
                rows = "?" if up is None else up.shape[0]
                raise KohyaKeyError(f"{key}: expected an output-axis dora_scale of shape ({rows}, 1)")
            tensor = tensor.reshape(-1) if tensor.dim() == 2 else tensor.reshape(1, -1, *[1] * (tensor.dim() - 2))
        lora.setdefault(component, {})[path + KOHYA_TO_PEFT_SUFFIX[suffix]] = tensor
    for component, tensors in lora.items():
        for key, tensor in tensors.items():
            if key.endswith(".lora_A.weight"):
                path = key[: -len(".lora_A.weight")]
                if path + ".lora_B.weight" not in tensors:
                    raise KohyaKeyError(f"{component} module {path!r} has lora_down but no lora_up")
                alphas.setdefault(component, {}).setdefault(path, float(tensor.shape[0]))
    return lora, alphas


def load_kohya(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a kohya-format (or any) .safetensors file (`safetensors_io.load_file`)."""
    from sdlora.safetensors_io import load_file

    return load_file(path, "LoRA file")


def module_alphas(model: torch.nn.Module, adapter: str = "default") -> dict[str, float]:
    """Module path -> the alpha a kohya file needs to reproduce peft's scaling for `adapter`.

    That is peft's lora_alpha, except with rsLoRA (scaling alpha / sqrt(r)), which kohya's
    alpha / r can only express as alpha * sqrt(r).
    """
    from peft.tuners.lora import LoraLayer

    out = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            alpha = float(module.lora_alpha[adapter])
            if module.use_rslora.get(adapter, False):
                alpha *= float(module.r[adapter]) ** 0.5
            out[path] = alpha
    return out


# ====================================================================== LyCORIS (LoKr, LoHa)

# peft's LoKr / LoHa tensor names are LyCORIS's own (peft ported them from LyCORIS), so a module's
# tensors keep their suffix: `lora_unet_..._to_q.lokr_w1`, `.lokr_w2` or `.lokr_w2_a` / `.lokr_w2_b`,
# `.hada_w1_a` ... `.hada_w2_b`, plus `.alpha`, the layout ComfyUI, AUTOMATIC1111/Forge and the
# LyCORIS library read (`ss_network_module: lycoris.kohya`).
LYCORIS_SUFFIXES: dict[str, tuple[str, ...]] = {
    "lokr": (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2"),
    "loha": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2"),
}
_LYCORIS_ALL = tuple(s for suffixes in LYCORIS_SUFFIXES.values() for s in suffixes)


def _split_lycoris_key(key: str) -> tuple[str, str]:
    for suffix in _LYCORIS_ALL:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise KohyaKeyError(f"unrecognised LoKr/LoHa tensor {key!r}")


def _lokr_full(suffixes: Iterable[str]) -> bool:
    """A LoKr module without a low-rank factor: readers scale it by 1, not by alpha / rank."""
    return not any(s.endswith("_b") for s in suffixes)


def peft_to_lycoris(
    lora: Mapping[str, Mapping[str, torch.Tensor]],
    scales: Mapping[str, Mapping[str, tuple[int, float]]],
    names: KohyaNames,
) -> dict[str, torch.Tensor]:
    """LyCORIS state dict from peft LoKr/LoHa state dicts; `scales[component][path]` = (r, alpha).

    peft scales every module by alpha / r; readers scale a LoKr module by alpha / (its factor's rank),
    and by 1 when it has no low-rank factor (both Kronecker factors full): there alpha / r is folded
    into `lokr_w2` and alpha is written as r."""
    out: dict[str, torch.Tensor] = {}
    for component, state_dict in lora.items():
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state_dict.items():
            path, suffix = _split_lycoris_key(key)
            modules.setdefault(path, {})[suffix] = tensor
        for path, tensors in modules.items():
            if path not in scales.get(component, {}):
                raise KohyaKeyError(f"no rank and alpha known for {component} module {path!r}")
            r, alpha = scales[component][path]
            name = names.to_kohya(component, path)
            lokr = any(s.startswith(".lokr") for s in tensors)
            fold = lokr and _lokr_full(tensors)
            for suffix, tensor in tensors.items():
                tensor = tensor.detach().to("cpu")
                if fold and suffix == ".lokr_w2":
                    tensor = tensor * (float(alpha) / r)
                out[name + suffix] = tensor.contiguous()
            out[name + ALPHA_SUFFIX] = torch.tensor(float(r if fold else alpha), dtype=torch.float32)
    return out


def lycoris_to_peft(
    state_dict: Mapping[str, torch.Tensor], names: KohyaNames
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, float]]]:
    """The inverse of `peft_to_lycoris`: (component -> peft state dict, component -> path -> alpha).

    For a module without a low-rank factor the alpha returned is its rank r (peft's scale 1), so
    peft's delta equals the file's. A module without `.alpha` gets alpha = its rank."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    for key, tensor in state_dict.items():
        name, dot, rest = key.partition(".")
        suffix = dot + rest
        if suffix == ALPHA_SUFFIX:
            component, path = names.from_kohya(name)
            alphas.setdefault(component, {})[path] = float(tensor.item())
            continue
        if suffix not in _LYCORIS_ALL:
            raise KohyaKeyError(f"unrecognised LyCORIS tensor {key!r}")
        component, path = names.from_kohya(name)
        lora.setdefault(component, {})[path + suffix] = tensor
    return lora, alphas


def lycoris_scales(model: torch.nn.Module, adapter: str = "default") -> dict[str, tuple[int, float]]:
    """Module path -> (r, alpha) of each LoKr/LoHa layer of `adapter` (peft scales it by alpha / r)."""
    from peft.tuners.lycoris_utils import LycorisLayer

    return {
        path: (int(module.r[adapter]), float(module.alpha[adapter]))
        for path, module in model.named_modules()
        if isinstance(module, LycorisLayer) and adapter in module.r
    }


# The base model, as sd-scripts' train_network.py records it: for a model file its name and two hashes
# (`library/train_util.py`: `model_hash`, AUTOMATIC1111's old short hash, and `calculate_sha256`, its
# new one, by which A1111, ComfyUI managers and Civitai find the checkpoint); a hub id as it is.
LEGACY_HASH_AT, LEGACY_HASH_SIZE = 0x100000, 0x10000


def legacy_model_hash(path: str | Path) -> str:
    """AUTOMATIC1111's old model hash: the first 8 hex digits of sha256 over 64 KiB from 1 MiB in."""
    import hashlib

    with open(path, "rb") as f:
        f.seek(LEGACY_HASH_AT)
        return hashlib.sha256(f.read(LEGACY_HASH_SIZE)).hexdigest()[:8]


def base_model_keys(model: str) -> dict[str, str]:
    """`ss_sd_model_name` and, for a single-file base, `ss_sd_model_hash` / `ss_new_sd_model_hash`."""
    path = Path(model)
    if not path.exists():  # a hub id or a tiny model
        return {"ss_sd_model_name": model}
    if path.is_dir():
        return {"ss_sd_model_name": path.resolve().name}
    stat = path.stat()
    return {"ss_sd_model_name": path.name, **_file_hashes(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}


@functools.lru_cache(maxsize=4)
def _file_hashes(path: str, size: int, mtime_ns: int) -> dict[str, str]:
    """Hashed once per process and file version: a run exports its LoRA many times (checkpoints, best, last)."""
    from sdlora.fsutil import sha256_file

    return {"ss_sd_model_hash": legacy_model_hash(path), "ss_new_sd_model_hash": sha256_file(path)}
