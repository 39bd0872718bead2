"""Every YAML document sdlora reads, read one way: UTF-8, bounded, without anchors or aliases.

Config files, run folders' config.yaml, `--space` files and `key=value` override values all go
through `read` (a file) or `loads` (text); `dumps` writes YAML that `read` takes back. sdlora never
writes anchors or aliases, and an alias is how a small file expands to billions of values ("billion
laughs": PyYAML builds the shared nodes, and everything that walks or prints them expands them), so
a document that uses one is refused before it is built, as is one nested deeper than MAX_DEPTH or a
file over MAX_BYTES.
Every problem is one `YamlError` line naming the file (a ConfigError: the CLI prints it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sdlora.errors import ConfigError

MAX_BYTES = 256 * 1024  # a resolved config.yaml is about 3 KB; a hand-written one rarely 10 KB
MAX_DEPTH = 32  # a config is 2 levels deep, a tune space 4
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: the same YAML, faster


class YamlError(ConfigError):
    """A YAML file or text sdlora cannot read; `reason` is the message without the file's name."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


def read(path: str | Path, where: str | None = None) -> Any:
    """The YAML document in `path` (None for an empty file); `where` names it in errors (default: the path)."""
    path = Path(path)
    where = str(path) if where is None else where
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise YamlError(where, f"cannot read it ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_BYTES:
        raise YamlError(where, f"over {MAX_BYTES // 1024} KiB, too large for a sdlora YAML file (a config is a few KB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(
            where, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None
    return loads(text.removeprefix("\ufeff"), where)


def loads(text: str, where: str) -> Any:
    """The YAML document in `text` (None when empty), checked as `read` checks a file."""
    if len(text) > MAX_BYTES:
        raise YamlError(where, f"over {MAX_BYTES // 1024} KiB of YAML, too large for sdlora")
    try:
        _check_events(text, where)
        return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader (CSafeLoader or SafeLoader)
    except yaml.YAMLError as exc:
        raise YamlError(where, f"not valid YAML ({_first_line(exc)})") from None
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise YamlError(where, f"not valid YAML ({_first_line(exc)})") from None


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # a value used twice is written out twice, so `read` takes back what sdlora wrote


def dumps(data: Any) -> str:
    """`data` as YAML that `read` accepts: no anchors or aliases, in key order, UTF-8 text as is."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def _check_events(text: str, where: str) -> None:
    """Refuse anchors, aliases and deep nesting from the parser's events, before any node is built."""
    depth = 0
    for event in yaml.parse(text, Loader=_LOADER):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise YamlError(
                where,
                f"line {event.start_mark.line + 1}: YAML anchors and aliases (&name, *name, <<) are not "
                "allowed in sdlora files; write the values out",
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise YamlError(where, f"line {event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _first_line(exc: Exception) -> str:
    """What is wrong and where: "did not find expected node content at line 3", not the parser's context."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        line = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        return f"{exc.problem}{line}"[:200]
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
