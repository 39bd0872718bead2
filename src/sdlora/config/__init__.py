"""The training config: typed groups with one docstring per field, YAML in and out, overrides.

Precedence: the dataclass defaults (`schema`, the only place defaults live), then a YAML file
(`--config FILE` or a packaged preset name: `sd15`, `sdxl`, `tiny`), then command-line flags,
then dotted `key=value` overrides (`lora.rank=8`). Every problem found on the way (unknown
keys, wrong types, bad values) is collected and raised as ONE `ConfigError`, naming the flag.

A few values default to `None` and are resolved by the trainer from the dataset and model
(`data.resolution`, `data.token`, `data.class_word`, `lora.alpha`); the run's `config.yaml`
holds the resolved values, so `sdlora train --config runs/x/config.yaml` repeats the run.
No torch (and no Typer) import here: the CLI's `--help` and config checks stay fast.

Modules: `schema` (the groups, each field with its help, flag and panel), `fields` (what the
command line needs per field), `load` (layers in, YAML out, hashing and diffs).
"""

from __future__ import annotations

from sdlora.config.fields import FieldOption, all_keys, field_help, flag_for, options
from sdlora.config.load import (
    TRAINING_SECTIONS,
    build_config,
    config_hash,
    config_yaml,
    diff_configs,
    flat_to_nested,
    load_config,
    parse_dotted,
    read_yaml,
    replace,
    save_config,
    save_run_config,
)
from sdlora.config.schema import (
    DEFAULT_VALIDATION_PROMPT,
    GROUPS,
    PANELS,
    PRESETS,
    CheckpointArgs,
    Config,
    DataArgs,
    EmbeddingArgs,
    LoggingArgs,
    LoraArgs,
    ModelArgs,
    OptimArgs,
    PriorArgs,
    RunArgs,
    ValidationArgs,
)

__all__ = [
    "DEFAULT_VALIDATION_PROMPT",
    "GROUPS",
    "PANELS",
    "PRESETS",
    "TRAINING_SECTIONS",
    "CheckpointArgs",
    "Config",
    "DataArgs",
    "EmbeddingArgs",
    "FieldOption",
    "LoggingArgs",
    "LoraArgs",
    "ModelArgs",
    "OptimArgs",
    "PriorArgs",
    "RunArgs",
    "ValidationArgs",
    "all_keys",
    "build_config",
    "config_hash",
    "config_yaml",
    "diff_configs",
    "field_help",
    "flag_for",
    "flat_to_nested",
    "load_config",
    "options",
    "parse_dotted",
    "read_yaml",
    "replace",
    "save_config",
    "save_run_config",
]
