"""The `sdlora` command: registers one verb per module and owns the error boundary.

Each verb lives in `sdlora/cli/<verb>.py` as a plain function that parses options, calls one
core function and renders the result. This file only wires them up.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Annotated, Optional

import typer
from rich.markup import escape

# Library chatter (dtype-casting notes, deprecations) is not for users; --debug brings it back.
if not os.environ.get("SDLORA_DEBUG"):
    for _name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(_name, "error")

from sdlora import __version__
from sdlora.cli._common import err_console
from sdlora.errors import SdloraError

# verb name -> (module, function). Add a line here when a verb's module lands.
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("sdlora.cli.demo", "demo"),
    "caption": ("sdlora.cli.caption", "caption"),
    "prepare": ("sdlora.cli.prepare", "prepare"),
    "train": ("sdlora.cli.train", "train"),
    "score": ("sdlora.cli.score", "score"),
    "sample": ("sdlora.cli.sample", "sample"),
    "report": ("sdlora.cli.report", "report"),
}

app = typer.Typer(
    name="sdlora",
    help="Turn photos of one object into a Stable Diffusion LoRA, and prove it with numbers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdlora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks for errors (or set SDLORA_DEBUG=1).")
    ] = False,
) -> None:
    if debug:
        os.environ["SDLORA_DEBUG"] = "1"
        for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
            os.environ[name] = "warning"


def _one_line_errors(fn):
    """Print an SdloraError as one red line on stderr and exit 1 (traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SdloraError as exc:
            if os.environ.get("SDLORA_DEBUG"):
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _register() -> None:
    for name, (module, func) in VERBS.items():
        mod = importlib.import_module(module)
        fn = getattr(mod, func)
        app.command(name=name, epilog=getattr(mod, "EPILOG", None), help=fn.__doc__)(_one_line_errors(fn))


_register()


def main() -> None:
    """Console entry point (`sdlora` and `python -m sdlora`)."""
    app()
