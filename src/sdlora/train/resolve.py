"""What a run's config resolves to before training starts: precision, the dataset (its manifest's
token, resolution and class word, its examples), the LoRA alpha, the token's embedding, and the
config of a resumed run (its saved config.yaml, then the command line, with a stated policy), the masked
loss (on when the dataset has masks) and the preservation (images with --class-prompt, else none).
What lands in the run's config.yaml is the resolved value, so the run repeats from it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from sdlora import config as config_mod
from sdlora.config import Config
from sdlora.errors import ConfigError, DataError, RunError
from sdlora.models.families import Family
from sdlora.run import CONFIG
from sdlora.train.data import Example, load_examples

# `--validation-steps` unset: the model's sampling steps up to this (previews, each validation): sdlora's
# default before the families had their own, which the distilled models' 4 or 8 undercut.
VALIDATION_STEPS = 20

# Keys whose checkpoint value must win on resume (changing them would not load, or trains something else).
LOCKED = (
    "model.",
    "data.dataset",
    "data.resolution",
    "data.token",
    "data.random_flip",
    "data.masked_loss",
    "data.unmasked_weight",
    "lora.",
    "embedding.train",
    "embedding.init_token",
    "train.seed",
    "train.batch_size",
    "train.gradient_accumulation",
    "train.optimizer",
    "prior.",
)


def resolve_precision(cfg: Config) -> Config:
    """`--mixed-precision auto`: on a CUDA GPU bf16 where it has it, else fp16; on a CPU bf16 where it
    computes bf16 natively (AVX512-BF16 or AMX: the UNet step is ~1.5x faster than fp32), else fp32.
    Then `--base-precision` checked against it and this machine (models/precision.py)."""
    from sdlora.models.precision import check

    if cfg.train.mixed_precision == "auto":
        if torch.cuda.is_available():
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_computes_bf16() else "no"
        cfg = config_mod.replace(cfg, train={"mixed_precision": precision})
    check(cfg.train.base_precision, cfg.train.mixed_precision)
    return cfg


def cpu_computes_bf16() -> bool:
    """Does this CPU run bf16 matmuls in hardware (AVX512-BF16 or AMX tiles)? Elsewhere oneDNN emulates
    bf16, slower than fp32. torch only says so in private helpers, so a torch without them counts as no."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    except RuntimeError:  # a build without the CPU-capability probes
        return False


_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(cfg: Config) -> torch.dtype:
    """The dtype of the frozen weights under a resolved --mixed-precision (no, fp16, bf16)."""
    return _DTYPES[cfg.train.mixed_precision]


def dataset_dir(cfg: Config) -> Path:
    """The dataset folder, absolute."""
    return Path(cfg.data.dataset).expanduser().resolve()


def resolve_dataset(cfg: Config) -> tuple[Config, list[Example], list[Example]]:
    """The dataset read and checked before any model loads (DataError for a missing or bad one), and the
    data section resolved from its manifest: absolute path, resolution, token, class word.

    Returns the config and the train and val examples (each with its caption and training size).
    """
    from sdlora.data.manifest import load_manifest

    folder = dataset_dir(cfg)
    manifest = load_manifest(folder)
    token = manifest.token
    if cfg.data.token is not None and cfg.data.token != token:
        raise ConfigError(
            f"--token {cfg.data.token!r} differs from the dataset's {token!r} (its captions carry "
            f"{token!r}); leave --token out, or prepare the dataset with --token {cfg.data.token}"
        )
    resolution = cfg.data.resolution or manifest.resolution
    train = load_examples(folder, manifest, "train", resolution, token)
    if not train:
        raise DataError(f"{folder}: no train images in manifest.json (re-run `sdlora prepare` with more photos)")
    val = load_examples(folder, manifest, "val", resolution, token)
    masked = cfg.data.masked_loss
    if masked and not manifest.has_masks:
        raise ConfigError(
            f"{cfg.data.flag('masked_loss')}: {folder} has no subject masks; run `sdlora prepare` with masks "
            "(auto, alpha or a folder), or leave the flag out"
        )
    data = {
        "dataset": str(folder),
        "resolution": resolution,
        "token": token,
        "class_word": cfg.data.class_word or manifest.class_word,
        "masked_loss": manifest.has_masks if masked is None else bool(masked),
    }
    return config_mod.replace(cfg, data=data, prior={"preservation": cfg.prior.kind}), train, val


def resolve_alpha(cfg: Config) -> Config:
    """`--alpha` unset: the rank's default, written out (`effective_alpha`)."""
    return config_mod.replace(cfg, lora={"alpha": cfg.effective_alpha})


def resolve_family_defaults(cfg: Config, arch: Family, pipe: Any) -> Config:
    """What defaults to the model family's, for the loaded `pipe`: `--target-modules` (`Family.lora_targets`),
    `--validation-guidance` (`Family.guidance_for`) and `--validation-steps` (`Family.sample_steps`, at most
    VALIDATION_STEPS); written out to config.yaml."""
    if cfg.lora.target_modules is None:
        cfg = config_mod.replace(cfg, lora={"target_modules": list(arch.lora_targets)})
    if cfg.validation.guidance is None:
        cfg = config_mod.replace(cfg, validation={"guidance": arch.guidance_for(pipe)})
    if cfg.validation.steps is None:
        cfg = config_mod.replace(cfg, validation={"steps": min(VALIDATION_STEPS, arch.sample_steps(pipe))})
    return cfg


def embedding_steps(cfg: Config) -> int:
    """Steps during which the token's embedding trains (--embedding-steps-fraction of --max-steps)."""
    return max(1, math.ceil(cfg.embedding.steps_fraction * cfg.train.max_steps))


def check_sides(arch: Family, examples: Sequence[Example]) -> None:
    """ConfigError (one line) for an image whose training size the family's denoiser cannot take
    (`Family.pixel_multiple`): before any encoding, where it would fail mid-run as a reshape error."""
    multiple = arch.pixel_multiple()
    bad = next((ex for ex in examples if ex.size[0] % multiple or ex.size[1] % multiple), None)
    if bad is not None:
        height, width = bad.size
        raise ConfigError(
            f"{bad.path}: trained at {width}x{height} px; {arch.label} takes sides that are multiples of {multiple}: "
            f"train with --resolution {max(multiple, round(max(bad.size) / multiple) * multiple)}, "
            "or prepare the photos at such a resolution"
        )


def resolve_token_embedding(cfg: Config, pipe: Any, arch: Family) -> Config:
    """`embedding.train` unset: on when the tokenizer splits the token (sksToy), off for a known word (sks)
    and for a family that leaves it to be asked for (`Family.pivotal_tuning`).

    The init token defaults to the class word. Both land resolved in the run's config.yaml.
    """
    from sdlora.train.embeddings import is_new_token

    train = cfg.embedding.train
    if train is None:
        train = arch.pivotal_tuning() and is_new_token(getattr(pipe, arch.tokenizers[0]), str(cfg.data.token))
    return config_mod.replace(
        cfg, embedding={"train": bool(train), "init_token": cfg.embedding.init_token or cfg.data.class_word}
    )


def resume_config(
    saved: dict[str, Any], layers: list[dict[str, Any]], sources: tuple[str, ...], saved_name: str = CONFIG
) -> tuple[config_mod.Config, list[str]]:
    """The config of a resumed run: saved config.yaml (`saved_name` in messages), then the command line;
    and the warnings."""
    wanted = config_mod.build_config(saved, *layers, sources=(saved_name, *sources))
    base = config_mod.build_config(saved, sources=(saved_name,))
    warnings, keep = [], {}
    for key, (old, new) in config_mod.diff_configs(base, wanted).items():
        flag = config_mod.flag_for(key)
        if key.startswith(LOCKED) or key in LOCKED:
            warnings.append(
                f"{flag} ({key}): the checkpoint has {old!r}, the command line {new!r}; "
                f"using the checkpoint's {old!r} (it defines what is being trained)"
            )
            section, name = key.split(".", 1)
            keep.setdefault(section, {})[name] = old
        elif key not in ("run.name", "run.runs_dir"):
            warnings.append(f"{flag} ({key}): the checkpoint's run used {old!r}; using {new!r} from the command line")
    cfg = config_mod.replace(wanted, **keep) if keep else wanted
    return cfg, warnings


def _newer_unsaved_run(runs: Path) -> Path | None:
    """The newest run folder in `runs` with a config.yaml but neither a checkpoint nor a LoRA (killed before
    its first save), which `runs/latest` therefore skips; None when there is none."""
    from sdlora.run import DIFFUSERS_LORA, LORA_DIR
    from sdlora.train.checkpoint import list_checkpoints

    try:
        folders = [d for d in runs.iterdir() if d.is_dir() and not d.is_symlink() and (d / CONFIG).is_file()]
    except OSError:
        return None
    unsaved = [d for d in folders if not (d / LORA_DIR / DIFFUSERS_LORA).is_file() and not list_checkpoints(d)]
    return max(unsaved, key=lambda d: (d / CONFIG).stat().st_mtime).resolve() if unsaved else None


def resume_run(
    run: str | Path, layers: list[dict[str, Any]], sources: tuple[str, ...], runs_dir: str | Path = "runs"
) -> tuple[Path, Config, list[str]]:
    """The run folder to continue (`latest` = the newest run) and its config with the command line applied.

    Its config.yaml must be readable (one RunError line naming it otherwise); the checkpoint is chosen
    when training starts (train/checkpoint.py: the newest valid one, or step 0 with this config).
    """
    from sdlora import yamlfile
    from sdlora.run import resolve_run_dir

    run_path = Path(runs_dir) / "latest" if str(run) == "latest" else Path(run)
    unsaved = _newer_unsaved_run(Path(runs_dir)) if str(run) == "latest" else None
    hint = f"{unsaved} has no checkpoint or LoRA yet (so `latest` does not point at it): continue it with --resume {unsaved}"
    if unsaved is not None and not (run_path.exists() or run_path.is_symlink()):
        raise RunError(f"{run_path}: no such run folder; {hint}")
    run_dir = resolve_run_dir(run_path)
    config_path = run_dir / CONFIG
    if not config_path.is_file():
        raise RunError(f"{run_dir}: not a run folder (no {CONFIG})")
    copy = " (each checkpoint in checkpoints/ holds a copy of it)"
    try:
        saved = yamlfile.read(config_path) or {}
    except yamlfile.YamlError as exc:
        raise RunError(f"{config_path}: damaged, not a readable config ({exc.reason}){copy}") from None
    if not isinstance(saved, dict):
        raise RunError(f"{config_path}: damaged, not a mapping of config sections{copy}")
    if not isinstance(saved.get("embedding", {}), (dict, type(None))):
        raise RunError(f"{config_path}: damaged, section 'embedding' is not a mapping{copy}")
    saved.setdefault("embedding", {"train": False})  # a run from before pivotal tuning trained no embedding
    if isinstance(saved.get("data"), dict):
        saved["data"].setdefault("masked_loss", False)  # a run from before the masked loss trained unmasked
    try:
        config_mod.build_config(saved, sources=(str(config_path),))
    except ConfigError as exc:
        raise RunError(f"{config_path}: damaged ({exc}){copy}") from None
    cfg, warnings = resume_config(saved, layers, sources, saved_name=str(config_path))
    if unsaved is not None and unsaved != run_dir and (unsaved / CONFIG).stat().st_mtime > config_path.stat().st_mtime:
        warnings.insert(0, f"--resume latest is {run_dir}; the newer run {hint}")
    cfg = config_mod.replace(cfg, run={"runs_dir": str(run_dir.parent), "name": run_dir.name})
    return run_dir, cfg, warnings
