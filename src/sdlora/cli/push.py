"""`sdlora push`: the run on the Hugging Face Hub: its LoRA files, a few samples and its model card."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdlora.cli._common import RunOpt, console, err_console

EPILOG = """\
Examples (the run defaults to ./runs/latest; log in once with `hf auth login`, or set HF_TOKEN):

  sdlora push --repo your-name/sksToy-lora

  sdlora push --run runs/20260101-120000 --repo your-name/sksToy-lora --private

  sdlora push --repo your-name/sksToy-lora --dry-run     # write runs/<name>/hub/ and the card only
"""


def push(
    repo: Annotated[
        str,
        typer.Option(
            "--repo",
            metavar="USER/NAME",
            help="The Hub model repo to push to (created if missing; an organisation works as USER).",
        ),
    ],
    run: RunOpt = Path("runs/latest"),
    private: Annotated[
        bool,
        typer.Option("--private", metavar="", help="Create the repo private (an existing repo keeps its visibility)."),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", metavar="", help="Write runs/<name>/hub/ and the card, upload nothing."),
    ] = False,
) -> None:
    """Upload the run's LoRA (diffusers and ComfyUI files), token embedding, samples and model card to the Hub."""
    from sdlora.models.loading import TINY_WARNING, is_tiny
    from sdlora.publish import push_run
    from sdlora.publish.push import check_repo_id
    from sdlora.run import load_run

    check_repo_id(repo)
    info = load_run(run)
    if is_tiny(info.model):
        err_console.print(f"[yellow]{TINY_WARNING}; the card says so[/]", highlight=False, soft_wrap=True)
    result = push_run(info, repo, private=private, dry_run=dry_run)
    console.print(f"card: {result.card}", highlight=False, soft_wrap=True)
    console.print(f"staged: {result.staged.folder} ({result.staged.summary()})", highlight=False, soft_wrap=True)
    if result.url is None:
        console.print("dry run: nothing uploaded", highlight=False)
        return
    console.print(f"pushed: {result.url} (commit {result.commit})", highlight=False, soft_wrap=True)
    if private:
        err_console.print("--private applies when the repo is created; an existing repo keeps its visibility")
