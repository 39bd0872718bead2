"""How the core reports to the CLI: plain callbacks, so the core never imports Typer or rich."""

from __future__ import annotations

from typing import Any, Callable

ProgressFn = Callable[[str, int, int], None]
"""on_progress(what, done, total): a phase's progress (encoding latents, decoding photos, scoring...)."""

OnEvent = Callable[[dict[str, Any]], None]
"""on_event({"event": kind, ...}): a training run's events (start, step, validation, warning, done...)."""


def no_progress(what: str, done: int, total: int) -> None:
    """The default `on_progress`: report nothing."""


def no_event(event: dict[str, Any]) -> None:
    """The default `on_event`: report nothing."""
