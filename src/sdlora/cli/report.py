"""`sdlora report`: (re)write a run's report.html and print where it is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlora.cli._common import RunOpt, console, refresh_report

EPILOG = """\
Examples (the run defaults to ./runs/latest):

  sdlora report

  sdlora report --open

  sdlora report --run runs/20260101-120000
"""


def report(
    run: RunOpt = Path("runs/latest"),
    open_: Annotated[
        bool, typer.Option("--open", metavar="", help="Open the report in the default web browser.")
    ] = False,
) -> None:
    """Write the run's HTML report (config, curves, samples, scores) and print its path."""
    from sdlora.errors import RunError
    from sdlora.run import CONFIG, REPORT, resolve_run_dir

    folder = resolve_run_dir(run)
    if not (folder / CONFIG).is_file():
        raise RunError(f"{folder}: not a run folder (no {CONFIG}); give --run runs/<name>")
    refresh_report(folder, strict=True)  # strict: a report that cannot be written is the error
    path = folder / REPORT
    console.print(str(path), highlight=False, soft_wrap=True)
    if open_:
        import webbrowser

        if not webbrowser.open(path.as_uri()):
            console.print("no web browser found: open the file above yourself", style="yellow", highlight=False)
