"""The training config: typed groups with one docstring per field, YAML in and out, overrides.

Precedence: the dataclass defaults below (the only place defaults live), then a YAML file
(`--config FILE` or a packaged preset name: `sd15`, `sdxl`, `tiny`), then command-line flags,
then dotted `key=value` overrides (`lora.rank=8`). Every problem found on the way (unknown
keys, wrong types, bad values) is collected and raised as ONE `ConfigError`, naming the flag.

A few values default to `None` and are resolved by the trainer from the dataset and model
(`data.resolution`, `data.token`, `data.class_word`, `lora.alpha`); the run's `config.yaml`
holds the resolved values, so `sdlora train --config runs/x/config.yaml` repeats the run.
No torch import here: the CLI's `--help` and config checks stay fast.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from sdlora.errors import ConfigError

PRESETS = ("sd15", "sdxl", "tiny")
DEFAULT_VALIDATION_PROMPT = "a photo of {token} {class}"


def _flag(name: str) -> dict[str, Any]:
    """Field metadata: the command-line flag that sets this field (for help and error messages)."""
    return {"flag": name}


class _Group:
    """Shared by all groups: collect every problem, then raise one error naming the flags."""

    def _check(self) -> list[str]:
        return []

    def __post_init__(self) -> None:
        problems = self._check()
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def flag(cls, name: str) -> str:
        meta = cls.__dataclass_fields__[name].metadata
        return meta.get("flag") or "--" + name.replace("_", "-")

    def _minimums(self, *, at_least_1: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> list[str]:
        """One message per field below its minimum, naming the flag."""
        problems = [
            f"{self.flag(n)} must be at least 1, got {getattr(self, n)}" for n in at_least_1 if getattr(self, n) < 1
        ]
        return problems + [
            f"{self.flag(n)} must be >= 0, got {getattr(self, n)}" for n in non_negative if getattr(self, n) < 0
        ]


@dataclass
class ModelArgs(_Group):
    name: str = field(default="stable-diffusion-v1-5/stable-diffusion-v1-5", metadata=_flag("--model"))
    """Base model: a hub id, a local diffusers folder, or tiny-sd / tiny-sdxl (random weights, for tests)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the base model."""
    variant: Optional[str] = None
    """Weight file variant to load, e.g. fp16 (smaller download, same results in mixed precision)."""
    vae: Optional[str] = None
    """Replacement VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix to encode SDXL latents in fp16."""

    def _check(self) -> list[str]:
        return [] if self.name.strip() else ["--model is empty"]


@dataclass
class DataArgs(_Group):
    dataset: str = "dataset"
    """Prepared dataset folder (`sdlora prepare` writes it)."""
    resolution: Optional[int] = None
    """Training resolution in pixels; default: the dataset's (images are center-cropped/resized to it)."""
    token: Optional[str] = None
    """The identifier token in the captions; default: the dataset manifest's."""
    class_word: Optional[str] = None
    """The object's class word (used in validation prompts); default: the dataset manifest's."""
    random_flip: bool = False
    """Also train on mirrored images: more variety, but mirrors text and logos on the object."""
    cache: bool = True
    """Keep encoded latents and text embeddings in <dataset>/.cache so later runs skip the encoders."""

    def _check(self) -> list[str]:
        problems = []
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            problems.append(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if not str(self.dataset).strip():
            problems.append("--dataset is empty")
        return problems


@dataclass
class LoraArgs(_Group):
    rank: int = 16
    """LoRA rank: higher learns more detail but uses more memory and overfits sooner."""
    alpha: Optional[float] = None
    """LoRA alpha (the update is scaled by alpha/rank); default: equal to the rank."""
    dropout: float = 0.0
    """Dropout on the LoRA input: a little (0.05-0.1) can reduce overfitting on few photos."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet modules that get a LoRA; add ff.net.0.proj,ff.net.2 (feed-forward) for more capacity."""
    text_encoder_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Text-encoder modules that get a LoRA with --train-text-encoder."""
    train_text_encoder: bool = False
    """Also train a LoRA on the text encoder(s) (both for SDXL): better identity, more memory, no text cache."""
    dora: bool = False
    """DoRA (weight-decomposed LoRA, peft's use_dora): often better at low rank, about 2x slower steps."""

    def _check(self) -> list[str]:
        problems = self._minimums(at_least_1=("rank",))
        if self.alpha is not None and self.alpha <= 0:
            problems.append(f"--alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            problems.append("--target-modules is empty; give e.g. to_q,to_k,to_v,to_out.0")
        return problems


@dataclass
class EmbeddingArgs(_Group):
    train: Optional[bool] = field(default=None, metadata=_flag("--train-token-embedding"))
    """Pivotal tuning: give the token its own trained embedding (default: on when the tokenizer splits the token, as sksToy; off for a known word such as sks)."""
    init_token: Optional[str] = field(default=None, metadata=_flag("--init-token"))
    """Word whose embedding the token's starts from; default: the class word."""
    learning_rate: float = field(default=5e-3, metadata=_flag("--embedding-lr"))
    """Learning rate of the token embedding (textual-inversion rates are ~50-100x the LoRA's)."""
    steps_fraction: float = field(default=0.5, metadata=_flag("--embedding-steps-fraction"))
    """Train the embedding for this fraction of --max-steps, then freeze it so the LoRA settles on it (1.0: all steps)."""

    def _check(self) -> list[str]:
        problems = []
        if self.learning_rate <= 0:
            problems.append(f"--embedding-lr must be positive, got {self.learning_rate}")
        if not 0.0 < self.steps_fraction <= 1.0:
            problems.append(f"--embedding-steps-fraction must be in (0, 1], got {self.steps_fraction}")
        if self.init_token is not None and not self.init_token.strip():
            problems.append("--init-token is empty; give a word such as the class word")
        return problems


@dataclass
class OptimArgs(_Group):
    max_steps: int = 1000
    """Optimizer steps to train; 500-1500 at batch 1 suits 20-200 photos."""
    batch_size: int = 1
    """Images per process per step: larger is smoother and faster per image, uses more memory."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step: a larger effective batch without more memory."""
    learning_rate: float = 1e-4
    """Learning rate of the UNet LoRA: higher learns faster and overfits sooner."""
    text_encoder_lr: Optional[float] = None
    """Learning rate of the text-encoder LoRA; default: --learning-rate."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """adamw, or adamw8bit (bitsandbytes, CUDA only: less optimizer memory)."""
    weight_decay: float = 1e-2
    """AdamW weight decay of the LoRA weights."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    lr_scheduler: Literal["constant", "cosine", "linear", "constant_with_warmup"] = "constant"
    """Learning-rate schedule over --max-steps: constant, cosine, linear or constant_with_warmup."""
    lr_warmup_steps: int = 0
    """Steps of linear warm-up at the start."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """auto (bf16 on GPUs that have it, else fp16; fp32 on a CPU), no (fp32), fp16 (CUDA) or bf16: faster, less memory; LoRA weights stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory, about 30% slower steps."""
    seed: int = 0
    """Seed for LoRA init, data order, noise and timesteps: the same seed repeats a run exactly."""
    snr_gamma: Optional[float] = None
    """Min-SNR loss weighting gamma (5.0 is the paper's): faster convergence; off by default."""
    noise_offset: float = 0.0
    """Offset noise (e.g. 0.05): lets the model learn very dark or bright images."""

    def _check(self) -> list[str]:
        problems = self._minimums(
            at_least_1=("max_steps", "batch_size", "gradient_accumulation"),
            non_negative=("lr_warmup_steps", "max_grad_norm", "noise_offset"),
        )
        for name in ("learning_rate", "text_encoder_lr"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{self.flag(name)} must be positive, got {value}")
        if self.lr_scheduler == "constant" and self.lr_warmup_steps > 0:
            problems.append(
                "--lr-warmup-steps needs --lr-scheduler constant_with_warmup, cosine or linear "
                "(constant ignores warm-up)"
            )
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            problems.append(f"--snr-gamma must be positive (5.0 is the paper's choice), got {self.snr_gamma}")
        return problems


@dataclass
class PriorArgs(_Group):
    class_prompt: Optional[str] = None
    """Prompt for prior-preservation class images (e.g. 'a photo of a toy'); unset = no prior preservation."""
    num_class_images: int = 100
    """Class images to use (generated once with the base model when missing, then cached)."""
    prior_loss_weight: float = 1.0
    """Weight of the class-image loss: higher keeps the class more general, learns the object slower."""
    class_dir: Optional[str] = None
    """Folder of class images (yours are used first); default: <dataset>/.cache/class-images."""

    def _check(self) -> list[str]:
        problems = self._minimums(at_least_1=("num_class_images",), non_negative=("prior_loss_weight",))
        if self.class_prompt is not None and not self.class_prompt.strip():
            problems.append("--class-prompt is empty; give a prompt such as 'a photo of a toy'")
        return problems


@dataclass
class ValidationArgs(_Group):
    validate_every: int = 100
    """Validation loss and sample images every N steps and at the end (0: only at the end)."""
    prompts: list[str] = field(
        default_factory=lambda: [DEFAULT_VALIDATION_PROMPT], metadata=_flag("--validation-prompt")
    )
    """Prompts for the sample images, repeatable ({token} and {class} are filled in); validation.prompts=[] for none."""
    num_images: int = 1
    """Sample images per prompt (seeds seed, seed+1, ...): more shows variety, costs time."""
    steps: int = 20
    """Inference steps per sample image: fewer is cheaper and rougher."""
    guidance: float = 7.5
    """Classifier-free guidance scale of the sample images."""
    seed: int = 0
    """Seed of the sample images and of the fixed validation noise (same across steps and runs)."""
    loss_timesteps: int = 5
    """Fixed timesteps per val image for the validation loss: more is less noisy, costs forwards."""
    score_every: int = 0
    """DINO of the sample images vs the val photos every N steps (a multiple of --validate-every); 0: off.
    It scores the validation samples, so it costs their sampling time: meant for GPUs."""
    dino_model: str = "facebook/dino-vits16"
    """DINO scorer for --score-every: a hub id, a local folder, or tiny-dino (random weights, offline)."""
    best_by: Literal["val_loss", "dino"] = "val_loss"
    """What picks best/: the lowest validation loss, or the highest DINO (needs --score-every)."""

    @classmethod
    def flag(cls, name: str) -> str:
        special = {
            "validate_every": "--validate-every",
            "num_images": "--validation-images",
            "steps": "--validation-steps",
            "guidance": "--validation-guidance",
            "seed": "--validation-seed",
            "loss_timesteps": "--val-loss-timesteps",
            "score_every": "--score-every",
            "dino_model": "--dino-model",
            "best_by": "--best-by",
        }
        return special.get(name) or super().flag(name)

    def _check(self) -> list[str]:
        problems = self._minimums(
            at_least_1=("num_images", "steps", "loss_timesteps"), non_negative=("validate_every", "score_every")
        )
        if self.score_every > 0 and self.validate_every > 0 and self.score_every % self.validate_every:
            problems.append(
                f"--score-every {self.score_every} must be a multiple of --validate-every "
                f"{self.validate_every} (DINO scores the validation samples)"
            )
        if self.score_every and not self.prompts:
            problems.append("--score-every scores the validation samples: give at least one --validation-prompt")
        if self.best_by == "dino" and not self.score_every:
            problems.append("--best-by dino needs --score-every N (DINO is only computed then)")
        return problems


@dataclass
class LoggingArgs(_Group):
    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    report_to: Literal["none", "tensorboard", "wandb", "clearml"] = "none"
    """Also send metrics to a tracker: none, tensorboard, wandb or clearml (install it first)."""

    def _check(self) -> list[str]:
        return self._minimums(at_least_1=("log_every",))


@dataclass
class CheckpointArgs(_Group):
    checkpoint_every: int = 250
    """Save a resumable checkpoint every N steps (0: only on Ctrl-C)."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints (each holds LoRA, optimizer and RNG states)."""

    def _check(self) -> list[str]:
        return self._minimums(at_least_1=("keep_checkpoints",), non_negative=("checkpoint_every",))


@dataclass
class RunArgs(_Group):
    runs_dir: str = "runs"
    """Folder that holds the run folders (and the `latest` link)."""
    name: Optional[str] = None
    """Run folder name; default: the start time (YYYYMMDD-HHMMSS)."""

    def _check(self) -> list[str]:
        if self.name is not None and (not self.name.strip() or "/" in self.name or self.name in (".", "..", "latest")):
            return [f"--name {self.name!r}: give a plain folder name (not 'latest', no '/')"]
        return []


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    embedding: EmbeddingArgs = field(default_factory=EmbeddingArgs)
    train: OptimArgs = field(default_factory=OptimArgs)
    prior: PriorArgs = field(default_factory=PriorArgs)
    validation: ValidationArgs = field(default_factory=ValidationArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def __post_init__(self) -> None:
        problems = []
        if self.train.lr_warmup_steps > self.train.max_steps:
            problems.append(
                f"--lr-warmup-steps {self.train.lr_warmup_steps} is more than --max-steps {self.train.max_steps}"
            )
        if problems:
            raise ConfigError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def effective_alpha(self) -> float:
        return float(self.lora.alpha if self.lora.alpha is not None else self.lora.rank)


GROUPS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


# ----------------------------------------------------------------------------- field help


@functools.lru_cache(maxsize=None)
def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal that follows it)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(cls: type, name: str) -> Any:
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def field_help(key: str) -> str:
    """Help text for a dotted key: its docstring and its default (for `--help`)."""
    section, name = key.split(".", 1)
    cls = GROUPS[section]
    doc = _field_docs(cls).get(name, "")
    default = _default(cls, name)
    if isinstance(default, list):
        default = ",".join(default) if default else "none"
    if default is None or isinstance(default, bool):
        return doc
    return f"{doc} (default: {default})"


def flag_for(key: str) -> str:
    section, name = key.split(".", 1)
    return GROUPS[section].flag(name)


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in GROUPS.items() for f in dataclasses.fields(cls)]


# ----------------------------------------------------------------------------- building


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as type `hint` (from YAML or a `key=value` string); ConfigError naming `where`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{where}: expected a whole number, got {value!r}") from None
        if isinstance(number, float) and not number.is_integer():
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {hint!r}")


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def build_config(*layers: dict[str, Any], sources: tuple[str, ...] = ()) -> Config:
    """A Config from nested dicts applied in order (later wins); all problems as one ConfigError.

    `sources` names each layer for messages (e.g. the YAML file's path).
    """
    problems: list[str] = []
    merged: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
    for i, layer in enumerate(layers):
        where = sources[i] if i < len(sources) else "config"
        if not isinstance(layer, dict):
            problems.append(f"{where}: expected a mapping of sections ({', '.join(GROUPS)})")
            continue
        for section, values in layer.items():
            if section not in GROUPS:
                problems.append(f"{where}: unknown section {section!r}{_suggest(str(section), list(GROUPS))}")
                continue
            if values is None:
                continue
            if not isinstance(values, dict):
                problems.append(f"{where}: section {section!r} must be a mapping, got {values!r}")
                continue
            cls = GROUPS[section]
            hints = typing.get_type_hints(cls)
            for key, value in values.items():
                if key not in hints:
                    names = list(cls.__dataclass_fields__)
                    problems.append(f"{where}: unknown key {section}.{key}{_suggest(str(key), names)}")
                    continue
                try:
                    merged[section][key] = _coerce(value, hints[key], f"{cls.flag(key)} ({section}.{key})")
                except ConfigError as exc:
                    problems.append(str(exc))
    groups = {}
    for section, values in merged.items():
        try:
            groups[section] = GROUPS[section](**values)
        except ConfigError as exc:
            problems.append(str(exc))
    if not problems:
        try:
            return Config(**groups)
        except ConfigError as exc:
            problems.append(str(exc))
    raise ConfigError("; ".join(dict.fromkeys(problems)))


def parse_dotted(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["lora.rank=8", "train.seed=3"]` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            hint = " (flags go before the overrides, e.g. --rank 8)" if item.startswith("-") else ""
            problems.append(f"override {item!r}: expected section.key=value, e.g. lora.rank=8{hint}")
            continue
        section, name = key.strip().split(".", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        nested.setdefault(section, {})[name] = value
    if problems:
        raise ConfigError("; ".join(problems))
    return nested


def flat_to_nested(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return nested


def read_yaml(source: str | Path) -> dict[str, Any]:
    """A config file, or a packaged preset by name (`sd15`, `sdxl`, `tiny`)."""
    text: str
    path = Path(source)
    if str(source) in PRESETS and not path.exists():
        text = resources.files("sdlora").joinpath("configs", f"{source}.yaml").read_text(encoding="utf-8")
        where = f"preset {source}"
    else:
        if not path.is_file():
            raise ConfigError(f"--config {source}: no such file (or give a preset: {', '.join(PRESETS)})")
        text = path.read_text(encoding="utf-8")
        where = str(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {where}: expected sections such as 'model:' and 'train:'")
    return data


def load_config(
    config_file: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Defaults, then the YAML file, then `flags` ({"lora.rank": 8}), then dotted overrides."""
    layers, sources = [], []
    problems = []
    if config_file is not None:
        try:
            layers.append(read_yaml(config_file))
            sources.append(str(config_file))
        except ConfigError as exc:
            problems.append(str(exc))
    if flags:
        layers.append(flat_to_nested(flags))
        sources.append("command line")
    try:
        layers.append(parse_dotted(overrides))
        sources.append("overrides")
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        cfg = build_config(*layers, sources=tuple(sources))
    except ConfigError as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


# ----------------------------------------------------------------------------- saving and comparing

_HEADER = "# sdlora training config (fully resolved). Repeat this run: sdlora train --config {path}\n"


def config_yaml(cfg: Config, path: str | Path = "config.yaml") -> str:
    return _HEADER.format(path=path) + yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


def save_config(cfg: Config, path: str | Path) -> None:
    from sdlora.fsutil import write_text

    write_text(path, config_yaml(cfg, path))


# Sections that change what is trained; the others (logging, cadence, run name) may differ on resume.
TRAINING_SECTIONS = ("model", "data", "lora", "embedding", "train", "prior")


def config_hash(cfg: Config | dict[str, Any]) -> str:
    data = cfg.to_dict() if isinstance(cfg, Config) else cfg
    relevant = {k: data.get(k) for k in TRAINING_SECTIONS}
    relevant["train"] = {k: v for k, v in (relevant["train"] or {}).items() if k != "max_steps"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def diff_configs(a: Config | dict[str, Any], b: Config | dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ: {key: (a's, b's)}."""
    da = a.to_dict() if isinstance(a, Config) else a
    db = b.to_dict() if isinstance(b, Config) else b
    out = {}
    for section in GROUPS:
        sa, sb = da.get(section) or {}, db.get(section) or {}
        for key in dict.fromkeys([*sa, *sb]):
            if sa.get(key) != sb.get(key):
                out[f"{section}.{key}"] = (sa.get(key), sb.get(key))
    return out


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of `cfg` with some fields changed: replace(cfg, data={"resolution": 64})."""
    groups = {name: getattr(cfg, name) for name in GROUPS}
    for name, values in sections.items():
        groups[name] = dataclasses.replace(groups[name], **values)
    return Config(**groups)
