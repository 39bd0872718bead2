"""`sdlora caption [DATASET]`: write, import, auto-generate or check captions.txt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from sdlora.cli._common import at_least_1, console, err_console, progress_bar
from sdlora.config.schema import ModelArgs
from sdlora.data.captioning import CaptionResult, caption_dataset
from sdlora.data.captions import DEFAULT_TEMPLATE, CheckResult, check_captions
from sdlora.errors import ConfigError
from sdlora.locks import folder_lock

DEFAULT_MODEL: str = ModelArgs.__dataclass_fields__["name"].default  # train's --model default
SHOWN = 20  # rows of a table of problems; the rest are counted (a 700k-line import is not a table)

EPILOG = """\
Examples (DATASET defaults to ./dataset):

  sdlora caption --from my_captions.txt

  sdlora caption --auto Salesforce/blip-image-captioning-base --overwrite

  sdlora caption --check
"""


def caption(
    dataset: Annotated[
        Path, typer.Argument(metavar="DATASET", hidden=True, show_default=False)  # in the verb's help text
    ] = Path("dataset"),
    source: Annotated[
        Optional[Path],
        typer.Option(
            "--from",
            metavar="PATH",
            help="Import captions: a file of 'name|caption' or 'name.png: caption' lines, or a folder of "
            "one .txt per image. Names match the original photos' stems (IMG_4651.HEIC -> IMG_4651).",
        ),
    ] = None,
    auto: Annotated[
        Optional[str],
        typer.Option(
            "--auto",
            metavar="MODEL",
            help="Caption with a transformers image-to-text model (hub id or local folder), "
            "e.g. Salesforce/blip-image-captioning-base.",
        ),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", metavar="", help="Only validate captions.txt; exit 1 on problems.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", metavar="", help="Replace captions you wrote too (default: keep them)."),
    ] = False,
    class_word: Annotated[
        Optional[str],
        typer.Option("--class-word", metavar="TEXT", help="Class of the object (default: the manifest's, e.g. 'toy')."),
    ] = None,
    template: Annotated[
        Optional[str],
        typer.Option(
            "--template",
            metavar="TEXT",
            help=f"Caption for images with none; fields {{token}} and {{class}}. Default: '{DEFAULT_TEMPLATE}'.",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", help="Images per --auto model call.")] = 8,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            metavar="NAME",
            help="With --check: the base model you will train (hub id, local folder or tiny-sd), whose "
            "tokenizer measures each caption against the window the model reads (SD's CLIP: 77 tokens; FLUX.1's "
            f"T5: 512; Qwen3: 512 less the chat template). (default: {DEFAULT_MODEL})",
            show_default=False,
        ),
    ] = DEFAULT_MODEL,
) -> None:
    """Give every image a caption that carries the token, or check captions.txt (--check).

    DATASET: the prepared dataset folder (default: ./dataset).
    """
    at_least_1(batch_size=batch_size)
    if check:
        used = [
            flag
            for flag, value in (
                ("--from", source),
                ("--auto", auto),
                ("--overwrite", overwrite),
                ("--class-word", class_word),
                ("--template", template),
            )
            if value
        ]
        if used:
            raise ConfigError(f"--check only validates; run it without {', '.join(used)}")
        tokenizer, window = load_tokenizer(model) or (None, None)
        with folder_lock(dataset, "caption --check", shared=True):  # a reader: `prepare` waits for it
            checked = check_captions(dataset, tokenizer, window)
        _render_check(checked)
        return
    if source is not None and auto is not None:
        raise ConfigError("--from and --auto: choose one (import your captions, or let a model write them)")
    captioner = None
    if auto is not None:
        from sdlora.data.autocaption import load_captioner

        with console.status(f"loading {auto}"):
            captioner = load_captioner(auto, batch_size=batch_size)
    with progress_bar(transient=True) as on_progress:
        result = caption_dataset(
            dataset,
            class_word=class_word,
            template=template,
            source=source,
            captioner=captioner,
            overwrite=overwrite,
            on_progress=on_progress,
        )
    _render_result(result)


class _Tokenizers:
    """A model's tokenizers by pipeline attribute, each loaded (no weights) when its family first asks for it,
    with the class its model_index.json names."""

    def __init__(self, source: str, index: dict):
        self._source, self._index = source, index

    def __getattr__(self, name: str):
        import transformers

        entry = self._index.get(name) if not name.startswith("_") else None
        if not entry or entry[1] is None:
            raise AttributeError(name)
        tokenizer = getattr(transformers, entry[1]).from_pretrained(self._source, subfolder=name)
        setattr(self, name, tokenizer)
        return tokenizer


def load_tokenizer(model: str):
    """(tokenizer, window) the base model reads captions through, as its family says (`Family.prompt_windows`:
    SD's CLIP, 77; FLUX.1's T5, 512), loaded without weights; or None with a one-line warning that caption
    lengths were not checked (no network, not cached, not a model)."""
    from sdlora.errors import ModelError
    from sdlora.models import is_tiny
    from sdlora.models.families import detect_family
    from sdlora.models.hub import hub_offline
    from sdlora.models.loading import _read_model_index, local_source
    from sdlora.models.single_file import is_single_file

    try:
        if is_single_file(model):  # a checkpoint file's is the real CLIP tokenizer, built offline
            from sdlora.models.tiny import clip_tokenizer

            return clip_tokenizer(), None
        if is_tiny(model):  # built in memory, tokenizers and all (seconds)
            from sdlora.models import load_pipeline

            pipe, family = load_pipeline(model)
            return family.prompt_windows(pipe)[0][1:]
        source = local_source(model)  # world-sd: the shipped folder
        if not Path(source).is_dir():
            hub_offline()
        try:
            index = _read_model_index(source, None)
            family = detect_family(index)
        except ModelError:  # no readable model_index.json (or no family in it): CLIP's tokenizer, as SD has
            from transformers import CLIPTokenizer

            return CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"), None
        return family.prompt_windows(_Tokenizers(source, index))[0][1:]
    except Exception as exc:  # noqa: BLE001 - any failure to load means "not checked", never a crash
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        err_console.print(
            f"[yellow]warning:[/] caption lengths not checked: cannot load the tokenizer of {model} ({reason}); "
            "pass --model with the base model you will train (a cached hub id or a local folder)",
            highlight=False,
            soft_wrap=True,
        )
        return None


def _render_result(result: CaptionResult) -> None:
    table = Table(title=escape(str(result.captions_path)), title_justify="left")
    table.add_column("captions")
    table.add_column("images", justify="right")
    counts: dict[str, int] = {}
    for how in result.written.values():
        counts[how] = counts.get(how, 0) + 1
    labels = {
        "imported": "written: imported (--from)",
        "auto": "written: by the model (--auto)",
        "template": "written: template",
        "token added": "token added to your caption",
    }
    for how, label in labels.items():
        if counts.get(how):
            table.add_row(label, str(counts[how]))
    if result.kept:
        table.add_row("kept: yours (--overwrite to replace)", str(len(result.kept)))
    if result.unchanged:
        table.add_row("unchanged", str(len(result.unchanged)))
    console.print(table)
    examples = [name for name, how in result.written.items() if how in ("imported", "auto")][:3]
    for name in examples:
        console.print(f"  {name}|{result.texts[name]}", highlight=False, markup=False, soft_wrap=True)
    if result.class_word_changed_from is not None:
        console.print(f"class word: {result.class_word_changed_from} -> {result.class_word} (manifest.json updated)")
    if result.unmatched:
        skipped = Table(title=f"{len(result.unmatched):,} imported lines not used", title_justify="left")
        skipped.add_column("where", overflow="fold")
        skipped.add_column("why", overflow="fold")
        for where, why in result.unmatched[:SHOWN]:
            skipped.add_row(escape(where), escape(why))  # the user's text: [/] is not markup
        console.print(skipped)
        _more(len(result.unmatched), "imported lines not used")
    if result.stray:
        err_console.print(
            f"[yellow]warning:[/] {len(result.stray):,} caption lines name images not in the dataset "
            f"(e.g. {escape(result.stray[0])}); kept, see `sdlora caption --check`",
            highlight=False,
            soft_wrap=True,
        )
    for name, line_nos in list(result.repeated.items())[:SHOWN]:
        nos = ", ".join(map(str, line_nos[:SHOWN])) + (", ..." if len(line_nos) > SHOWN else "")
        err_console.print(
            f"[yellow]warning:[/] {escape(str(result.captions_path))} lists {escape(name)} {len(line_nos)} times "
            f"(lines {nos}); the last one is used, remove the others",
            highlight=False,
            soft_wrap=True,
        )
    if len(result.repeated) > SHOWN:
        err_console.print(
            f"[yellow]warning:[/] and {len(result.repeated) - SHOWN:,} more files listed more than once "
            "(see `sdlora caption --check`)",
            highlight=False,
            soft_wrap=True,
        )
    total = len(result.written) + len(result.kept) + len(result.unchanged)
    console.print(f"{total} images captioned with {result.token!r}; {len(result.written)} written", highlight=False)


def _more(total: int, what: str, kinds: list[str] | None = None) -> None:
    """The line under a table cut at SHOWN rows: "and 699,412 more imported lines not used"."""
    if total <= SHOWN:
        return
    counts = ""
    if kinds:
        by_kind: dict[str, int] = {}
        for kind in kinds[SHOWN:]:
            by_kind[kind] = by_kind.get(kind, 0) + 1
        counts = ": " + ", ".join(f"{n:,} {kind}" for kind, n in by_kind.items())
    console.print(f"... and {total - SHOWN:,} more {what}{counts} (the first {SHOWN} shown)", highlight=False)


def _render_check(result: CheckResult) -> None:
    for w in result.warnings[:SHOWN]:
        err_console.print(
            f"[yellow]warning:[/] {escape(str(result.captions_path))}:{w.line_no}: {escape(w.file)}: {w.kind}, "
            f"{escape(w.detail)}",
            highlight=False,
            soft_wrap=True,
        )
    if len(result.warnings) > SHOWN:
        err_console.print(
            f"[yellow]warning:[/] and {len(result.warnings) - SHOWN:,} more captions too long", highlight=False
        )
    if result.ok:
        checked = "" if result.lengths_checked else "; lengths not checked"
        console.print(
            f"{result.n_captions} captions OK ({escape(str(result.captions_path))}{checked})", highlight=False
        )
        return
    table = Table(title=f"{escape(str(result.captions_path))}: {len(result.problems):,} problems", title_justify="left")
    table.add_column("problem")
    table.add_column("line", justify="right")
    table.add_column("file", overflow="fold")
    table.add_column("detail", overflow="fold")
    for problem in result.problems[:SHOWN]:
        table.add_row(problem.kind, str(problem.line_no or ""), escape(problem.file), escape(problem.detail))
    console.print(table)
    _more(len(result.problems), "problems", [p.kind for p in result.problems])
    err_console.print(
        f"[bold red]error:[/] {escape(str(result.captions_path))}: {len(result.problems):,} problems "
        f"({result.n_captions:,} caption lines, {result.n_images:,} images)",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(1)
