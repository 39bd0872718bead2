"""What the command line needs to know about each config field: help, flags, panel, metavar, kind.

All of it comes from the field declarations in `schema` (docstring and `cli(...)` metadata);
`sdlora.cli.train` turns `options()` into Typer options, and error messages use `flag_for`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from sdlora.config.schema import GROUPS, PANELS, _default

# The metavar shown beside a flag that takes a value, by type (a field's `cli(metavar=...)` wins).
_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT"}


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
    """The flag that error messages name for a dotted key (`lora.rank` -> `--rank`)."""
    section, name = key.split(".", 1)
    return GROUPS[section].flag(name)


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in GROUPS.items() for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class FieldOption:
    """One config field as a command-line option."""

    key: str  # dotted: "lora.rank"
    flags: tuple[str, ...]  # "--learning-rate", "--lr"
    panel: str
    # flag: an on/off switch pair; list: one comma-separated value; repeat: the flag given again per item
    kind: Literal["value", "flag", "list", "repeat"]
    type: type  # int, float, str or bool: what the command line parses (choices are checked by the config)
    metavar: str
    help: str
    default: Any  # the field's default (None: resolved later, or off)


def _base_type(hint: Any) -> tuple[str, type]:
    """(kind, type) of a field's type hint, Optional[...] unwrapped."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return _base_type(next(a for a in args if a is not type(None)))
    if origin is list:
        return "list", str
    if origin is Literal:
        return "value", str
    if hint is bool:
        return "flag", bool
    return "value", hint


def options() -> list[FieldOption]:
    """Every config field as an option, in help-panel order (`PANELS`), then declaration order."""
    found = []
    for section, cls in GROUPS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind, typ = _base_type(hints[f.name])
            if kind == "list" and f.metadata.get("repeat"):
                kind = "repeat"
            if typing.get_origin(hints[f.name]) is Literal or any(
                typing.get_origin(a) is Literal for a in typing.get_args(hints[f.name])
            ):
                default_metavar = "NAME"
            else:
                default_metavar = "A,B" if kind == "list" else _METAVARS.get(typ, "")
            metavar = "" if kind == "flag" else f.metadata.get("metavar") or default_metavar
            found.append(
                FieldOption(
                    key=f"{section}.{f.name}",
                    flags=cls.flags(f.name),
                    panel=cls.panel(f.name),
                    kind=kind,  # type: ignore[arg-type]
                    type=typ,
                    metavar=metavar,
                    help=field_help(f"{section}.{f.name}"),
                    default=_default(cls, f.name),
                )
            )
    return sorted(found, key=lambda o: PANELS.index(o.panel))
