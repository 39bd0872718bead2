"""Reading sdlora's own .safetensors files (the LoRA files, the token embedding) with one error for each
way they can be unusable.

Every reader of a file sdlora exported goes through here: `sample` (LoRA and embedding), `report`
(the list of output files), the exporter's round trips. A missing file raises RunError "PATH: no such
FILE"; a truncated, empty or garbage file (a killed copy, a full disk, a download cut short) raises
RunError "PATH: damaged or incomplete file (REASON); re-export it or train again", one line, never a
traceback and never a guess about the base model. `problem(path)` gives that reason without raising,
for the report. safetensors checks on opening that the header parses and covers the whole file, so
`read_metadata` / `check` cost a header read, not the tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdlora.errors import RunError

DAMAGED = "damaged or incomplete file"
ADVICE = "re-export it or train again"


def _open_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (SafetensorError, OSError, ValueError, RuntimeError)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.removeprefix("Error while deserializing header: ")[:200]


def damaged(path: Path | str, reason: str) -> RunError:
    """The one error for a file that exists but cannot be read as safetensors."""
    return RunError(f"{path}: {DAMAGED} ({reason}); {ADVICE}")


def _missing(path: Path, what: str) -> RunError:
    return RunError(f"{path}: no such {what}")


def load_file(path: Path | str, what: str = "file") -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, header metadata) of a .safetensors file, on the CPU; RunError if missing or damaged.

    `what` names the file in the missing-file message ("LoRA file", "token embedding").
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise _missing(path, what)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except _open_errors() as exc:
        raise damaged(path, _reason(exc)) from None


def read_metadata(path: Path | str, what: str = "file") -> dict[str, str]:
    """The header metadata of a .safetensors file (the file is checked whole; tensors are not read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise _missing(path, what)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except _open_errors() as exc:
        raise damaged(path, _reason(exc)) from None


def check(path: Path | str, what: str = "file") -> dict[str, str]:
    """Raise RunError now if `path` is missing or damaged (before a library gives a misleading error); its metadata."""
    return read_metadata(path, what)


def problem(path: Path | str) -> str | None:
    """Why `path` is not a readable .safetensors file, or None when it is (for listings that must not raise)."""
    try:
        read_metadata(path)
    except RunError as exc:
        return str(exc)
    return None
