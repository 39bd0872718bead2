"""Config from layers: YAML files and presets, command-line flags, dotted overrides; saving and comparing.

Precedence: the dataclass defaults (`schema`, the only place defaults live), then a YAML file
(`--config FILE` or a packaged preset name), then command-line flags, then dotted `key=value`
overrides. Every problem found on the way is collected and raised as ONE `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

from sdlora import yamlfile
from sdlora.config.schema import GROUPS, PRESETS, Config
from sdlora.errors import ConfigError

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
            raise ConfigError(f"{where}: {_show(value)} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        return [_coerce(v, args[0], where) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{where}: expected a whole number, got {_show(value)}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{where}: expected a whole number, got {_show(value)}") from None
        if isinstance(number, float) and not number.is_integer():
            raise ConfigError(f"{where}: expected a whole number, got {_show(value)}")
        return int(number)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {_show(value)}")
        return number
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected text, got {_show(value)}")
        return str(value)
    raise TypeError(f"unsupported config type {hint!r}")


def _show(value: Any) -> str:
    """`value` for a one-line message: its repr, cut short (a config value can be a huge list)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text):,} characters)"


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# Sections a train config file may carry for other verbs; `sdlora train` leaves them alone.
SIDE_SECTIONS = ("tune",)


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
            if section in SIDE_SECTIONS:  # read by another verb from the same file (`sdlora tune`)
                continue
            if section not in GROUPS:
                problems.append(f"{where}: unknown section {section!r}{_suggest(str(section), list(GROUPS))}")
                continue
            if values is None:
                continue
            if not isinstance(values, dict):
                problems.append(f"{where}: section {section!r} must be a mapping, got {_show(values)}")
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
            value = yamlfile.loads(raw, f"override {key}") if raw.strip() else None
        except yamlfile.YamlError:
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
    path = Path(source)
    if str(source) in PRESETS and not path.exists():
        where = f"preset {source}"
        text = resources.files("sdlora").joinpath("configs", f"{source}.yaml").read_text(encoding="utf-8")
        data = yamlfile.loads(text, f"--config {where}") or {}
    else:
        if not path.is_file():
            raise ConfigError(f"--config {source}: no such file (or give a preset: {', '.join(PRESETS)})")
        where = str(path)
        data = yamlfile.read(path, f"--config {where}") or {}
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
    return _HEADER.format(path=path) + yamlfile.dumps(cfg.to_dict())


def save_config(cfg: Config, path: str | Path) -> None:
    from sdlora.fsutil import write_text

    write_text(path, config_yaml(cfg, path))


# Sections that change what is trained; the others (logging, cadence, run name) may differ on resume.
TRAINING_SECTIONS = ("model", "data", "lora", "embedding", "train", "prior")


def save_run_config(cfg: Config, path: str | Path) -> None:
    """A run's config.yaml (and a checkpoint's): the config without the run's name, so that
    `--config runs/x/config.yaml` makes a new run."""
    save_config(replace(cfg, run={"name": None}), path)


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
