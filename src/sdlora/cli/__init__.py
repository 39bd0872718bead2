"""The `sdlora` command: registers one verb per module and owns the error boundary.

Each verb lives in `sdlora/cli/<verb>.py` as a plain function that parses options, calls one
core function and renders the result. This file only wires them up.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from typing import Annotated, Optional

import typer
from rich.markup import escape

from sdlora import __version__
from sdlora.cli._common import err_console
from sdlora.cli.quiet import quiet_libraries
from sdlora.errors import SdloraError
from sdlora.fsutil import write_problem

# verb name -> (module, function), in pipeline order: `sdlora --help` lists them so (Typer keeps
# the order commands are registered in). Add a line here when a verb's module lands.
VERBS: dict[str, tuple[str, str]] = {
    "prepare": ("sdlora.cli.prepare", "prepare"),
    "caption": ("sdlora.cli.caption", "caption"),
    "train": ("sdlora.cli.train", "train"),
    "sample": ("sdlora.cli.sample", "sample"),
    "score": ("sdlora.cli.score", "score"),
    "tune": ("sdlora.cli.tune", "tune"),
    "report": ("sdlora.cli.report", "report"),
    "push": ("sdlora.cli.push", "push"),
    "demo": ("sdlora.cli.demo", "demo"),
}

app = typer.Typer(
    name="sdlora",
    help="Turn photos of one object into a Stable Diffusion LoRA, and prove it with numbers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _show_help(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        typer.echo(ctx.get_help(), color=ctx.color)
        raise typer.Exit()


# Typer's own --help shows a `<bool>` type beside it; this one (on the root and every verb) shows none.
HelpOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--help",
        is_eager=True,
        expose_value=False,
        callback=_show_help,
        metavar="",
        show_default=False,
        help="Show this message and exit.",
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdlora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            metavar="",
            show_default=False,
            help="Print the version and exit.",
        ),
    ] = None,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            metavar="",
            show_default=False,
            help="Show full tracebacks, and the libraries' own logs and warnings (or set SDLORA_DEBUG=1).",
        ),
    ] = False,
    help_: HelpOpt = None,
) -> None:
    if debug:
        os.environ["SDLORA_DEBUG"] = "1"
    quiet_libraries()  # every verb: no third-party logs, bars or warnings unless --debug


# The option that chooses where a verb writes, named in the hint of a write failure.
_WHERE_FLAG = {"prepare": "--out", "demo": "--out", "train": "--runs-dir"}


def _one_line_errors(fn):
    """Print an SdloraError, or an OSError of a write the user can fix (full disk, read-only or
    unwritable place: `fsutil.write_problem`), as one red line on stderr and exit 1 (traceback
    with --debug). Every verb goes through here, so none needs its own handler."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (SdloraError, OSError) as exc:
            line = str(exc) if isinstance(exc, SdloraError) else write_problem(exc, _WHERE_FLAG.get(fn.__name__))
            if line is None or os.environ.get("SDLORA_DEBUG"):
                raise
            err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _with_help_option(fn):
    """`fn` with the --help option above added to its signature (Typer reads the signature)."""

    @functools.wraps(fn)
    def verb(*args, help_=None, **kwargs):
        return fn(*args, **kwargs)

    signature = inspect.signature(fn, eval_str=True)
    help_param = inspect.Parameter("help_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=HelpOpt)
    verb.__signature__ = signature.replace(parameters=[*signature.parameters.values(), help_param])
    return verb


def _register() -> None:
    for name, (module, func) in VERBS.items():
        mod = importlib.import_module(module)
        fn = getattr(mod, func)
        verb = _with_help_option(_one_line_errors(fn))
        app.command(name=name, epilog=getattr(mod, "EPILOG", None), help=fn.__doc__)(verb)


_register()


def main() -> None:
    """Console entry point (`sdlora` and `python -m sdlora`)."""
    app()
