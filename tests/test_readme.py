"""The README's and docs/' commands work as shown.

Every `sdlora VERB --option` they show (in code blocks and inline code) is checked against that verb's
options, every benchmark option against its script, every `section.key` against the config schema, and
every relative link against the files; a renamed option or page fails here. The slow test runs the
README's "A real run, step by step" block itself on tiny models.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.config.schema import GROUPS
from sdlora.world.__main__ import app as world_app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
OPTION = re.compile(r"^--?[a-zA-Z][\w-]*")
# Options of programs other than sdlora and its benchmarks, named in the pages (pytest, pip, ray, accelerate).
OTHER_PROGRAMS = {"-m", "-e", "-v", "--head", "--address", "--debug", "--version", "--help"}


WORLD = ["python", "-m", "sdlora.world"]  # the miniature world's own command line


def verb_options(cli=app) -> dict[str, set[str]]:
    """Each verb's accepted options (hidden `--no-x` switches included), as the CLI parses them."""
    group = typer.main.get_command(cli)
    options = {"": {opt for param in group.params for opt in (*param.opts, *param.secondary_opts)}}
    for name, command in group.commands.items():
        options[name] = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        options[name] |= {"--help"}
    return options


def code_texts(page: Path) -> list[str]:
    """The page's code: each fenced block's lines (comments dropped) and each inline code span."""
    text = page.read_text(encoding="utf-8")
    texts = []
    for block in FENCE.findall(text):
        texts += [line for line in block.splitlines() if line.strip()]
    prose = FENCE.sub("", text)
    prose = re.sub(r"<!--.*?-->", "", prose, flags=re.S)
    texts += [" ".join(span.split()) for span in INLINE.findall(prose)]
    return texts


def commands(text: str) -> list[list[str]]:
    """The commands in one line of code, split at && | ; and with `# comments` dropped."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote: prose in backticks, not a command
        return []
    found, current = [], []
    for word in words:
        if word in {"&&", "||", "|", ";"}:
            found.append(current)
            current = []
        else:
            current.append(word)
    found.append(current)
    return [c for c in found if c]


def shown_commands() -> list[tuple[str, list[str]]]:
    return [(page.name, command) for page in PAGES for text in code_texts(page) for command in commands(text)]


def options_in(words: list[str]) -> list[str]:
    return [m.group(0) for word in words if (m := OPTION.match(word)) and not word[1:2].isdigit()]


def test_the_pages_show_sdlora_commands():
    """The extraction finds the README's commands (an empty list would pass every check below)."""
    shown = [command for _, command in shown_commands() if command[0] == "sdlora"]
    assert ["sdlora", "train", "--rank", "16", "--max-steps", "1000"] in shown
    assert {command[1] for command in shown if len(command) > 1} >= {"prepare", "caption", "train", "sample", "score"}
    assert any(command[:2] == ["python", "benchmarks/train_speed.py"] for _, command in shown_commands())


def test_every_sdlora_command_shown_uses_options_its_verb_has():
    problems = []
    for page, command in shown_commands():
        if command[0] == "accelerate" and "sdlora" in command:  # accelerate launch -m sdlora VERB ...
            command = command[command.index("sdlora") :]
        if command[: len(WORLD)] == WORLD:
            command, options = ["sdlora", *command[len(WORLD) :]], verb_options(world_app)
        elif command[0] != "sdlora":
            continue
        else:
            options = verb_options()
        verb = command[1] if len(command) > 1 and not command[1].startswith("-") else ""
        if verb.startswith("<"):  # `sdlora <verb> --help`
            continue
        if verb not in options:
            problems.append(f"{page}: {' '.join(command)}: no verb {verb!r}")
            continue
        problems += [
            f"{page}: {' '.join(command)}: `sdlora {verb}` has no {option}"
            for option in options_in(command[2:] if verb else command[1:])
            if option not in options[verb]
        ]
    assert not problems, "\n".join(problems)


def test_every_benchmark_command_shown_uses_options_its_script_has():
    problems, checked = [], 0
    for page, command in shown_commands():
        scripts = [w for w in command[:2] if re.fullmatch(r"benchmarks/\w+\.(py|sh)", w)]
        if not scripts:
            continue
        script = ROOT / scripts[0]
        if not script.is_file():
            problems.append(f"{page}: {' '.join(command)}: no {scripts[0]}")
            continue
        source = script.read_text(encoding="utf-8")
        if script.suffix == ".sh":
            continue
        checked += 1
        problems += [
            f"{page}: {' '.join(command)}: {script.name} has no {option}"
            for option in options_in(command[2:])
            if f'"{option}"' not in source
        ]
    assert checked and not problems, "\n".join(problems)


def test_every_option_named_anywhere_exists():
    """Options named in prose too (`--val-fraction`): each belongs to a verb, a benchmark or a known tool."""
    known = set().union(*verb_options().values(), *verb_options(world_app).values(), OTHER_PROGRAMS)
    benchmarks = " ".join(p.read_text(encoding="utf-8") for p in (ROOT / "benchmarks").glob("*.py"))
    problems = []
    for page in PAGES:
        for text in code_texts(page):
            for option in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)):
                if option not in known and f'"{option}"' not in benchmarks:
                    problems.append(f"{page.name}: {option} (in `{text[:80]}`)")
    assert not problems, "\n".join(sorted(problems))


FILE_SUFFIXES = {"py", "yaml", "json", "jsonl", "html", "png", "md"}  # run.py is a file, not a config key


def test_every_config_key_shown_exists():
    """`train.learning_rate=5e-5`, `embedding.train: false`: the section and field exist in the schema."""
    import dataclasses

    fields = {section: {f.name for f in dataclasses.fields(cls)} for section, cls in GROUPS.items()}
    key = re.compile(rf"(?<![\w./-])({'|'.join(GROUPS)})\.([a-z_]+)\b(?!\.\w)")
    problems = [
        f"{page.name}: {section}.{name}"
        for page in PAGES
        for text in code_texts(page)
        for section, name in key.findall(text)
        if name not in fields[section] and name not in FILE_SUFFIXES
    ]
    assert not problems, "\n".join(problems)


def test_every_relative_link_points_at_a_file_and_heading():
    problems = []
    for page in PAGES:
        text = re.sub(r"<!--.*?-->", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                problems.append(f"{page.name}: {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                problems.append(f"{page.name}: {target}: no heading #{anchor} in {linked.name}")
    assert not problems, "\n".join(problems)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def real_run_block() -> list[list[str]]:
    """The README's "A real run, step by step" commands, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## A real run, step by step", 1)[1]
    block = FENCE.search(section).group(1)
    return [command for line in block.splitlines() for command in commands(line)]


# The only changes to the README's block: tiny models and sizes, so it runs offline in seconds.
TINY = {
    "prepare": ["--resolution", "64"],
    "train": ["--model", "tiny-sd", "--validate-every", "1000", "--checkpoint-every", "1000"],
    "sample": ["--steps", "2"],
    "score": ["--dino-model", "tiny-dino", "--clip-model", "tiny-clip", "--clip-pretrained", "none", "--steps", "2"],
}


@pytest.mark.slow
def test_the_readme_real_run_block_runs_on_tiny_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BROWSER", "true")  # `sdlora report --open` opens nothing
    shutil.copytree(ROOT / "examples" / "photos", tmp_path / "photos")
    block = real_run_block()
    assert [c[1] for c in block if c[0] == "sdlora"] == ["prepare", "caption", "train", "sample", "score", "report"]
    for command in block:
        if command[0] != "sdlora":
            continue  # pip install
        args = [*command[1:], *TINY.get(command[1], [])]
        args = ["2" if a == "1000" and args[args.index(a) - 1] == "--max-steps" else a for a in args]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{' '.join(command)}:\n{result.output}"
    run = (tmp_path / "runs" / "latest").resolve()
    assert (run / "scores.json").is_file() and (run / "report.html").is_file()
