"""The CLI shell: version, help for every verb, one-line errors."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from sdlora import __version__
from sdlora.cli import VERBS, _one_line_errors, app
from sdlora.errors import DataError

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"sdlora {__version__}"


def test_python_dash_m_runs_the_same_app():
    out = subprocess.run([sys.executable, "-m", "sdlora", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"sdlora {__version__}"


@pytest.mark.parametrize("argv", [["--help"]] + [[verb, "--help"] for verb in VERBS])
def test_every_help_exits_zero_with_empty_stderr(argv):
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "Usage" in result.stdout


def test_every_registered_verb_is_listed_in_root_help():
    result = runner.invoke(app, ["--help"])
    for verb in VERBS:
        assert verb in result.stdout


def test_sdlora_error_becomes_one_line_and_exit_code_1(capsys):
    @_one_line_errors
    def verb():
        raise DataError("photos/x.heic: not an image")

    with pytest.raises(typer.Exit) as exc:
        verb()
    assert exc.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: photos/x.heic: not an image"


def test_error_text_in_square_brackets_is_printed_as_is(capsys):
    @_one_line_errors
    def verb():
        raise DataError("install it: pip install 'sdlora[tensorboard]'")

    with pytest.raises(typer.Exit):
        verb()
    assert "sdlora[tensorboard]" in capsys.readouterr().err


def test_debug_keeps_the_traceback(monkeypatch):
    monkeypatch.setenv("SDLORA_DEBUG", "1")

    @_one_line_errors
    def verb():
        raise DataError("boom")

    with pytest.raises(DataError):
        verb()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR])
def test_write_failure_of_any_verb_is_one_line_naming_path_and_cause(capsys, code):
    @_one_line_errors
    def train():  # named like the verb: the hint names the option that chooses where it writes
        raise OSError(code, os.strerror(code), "/data/runs/x/lora.safetensors")

    with pytest.raises(typer.Exit) as exc:
        train()
    assert exc.value.exit_code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: /data/runs/x/lora.safetensors: {os.strerror(code)}; "), err
    assert "(--runs-dir)" in err


def test_other_os_errors_keep_their_traceback():
    @_one_line_errors
    def verb():
        raise OSError(errno.EIO, os.strerror(errno.EIO), "x")  # not a place the user can change

    with pytest.raises(OSError):
        verb()


_TYPE_NOISE = ("<bool>", "<str>", "<path>", "<int", "<float>", "<list")


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_help_reads_cleanly_at_80_columns(verb):
    result = CliRunner().invoke(app, [verb, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    text = result.stdout
    assert [line for line in text.splitlines() if len(line) > 80] == []
    assert [noise for noise in _TYPE_NOISE if noise in text] == [], text
    assert "…" not in text, text  # a flag, metavar or default cut off
    assert "Examples" in text
    commands = [
        line.strip() for line in text.split("Examples", 1)[1].splitlines() if line.strip().startswith("sdlora ")
    ]
    assert 2 <= len(commands) <= 3, commands


@pytest.mark.parametrize(
    "argv, line",
    [
        (["sample", "x", "--num-images", "0"], "--num-images must be at least 1, got 0"),
        (["sample", "x", "--steps", "0"], "--steps must be at least 1, got 0"),
        (["sample", "x", "--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
        (["score", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["score", "--num-images", "0"], "--num-images must be at least 1, got 0"),
        (["score", "--steps", "0"], "--steps must be at least 1, got 0"),
        (["caption", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["tune", "--seeds", "0"], "--seeds must be at least 1, got 0"),
    ],
)
def test_a_count_below_1_is_one_line_and_exit_1(tmp_path, argv, line):
    result = runner.invoke(app, [*argv], env={"COLUMNS": "200"})  # checked before any run or dataset is read
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == f"error: {line}"


@pytest.mark.parametrize(
    "argv",
    [["sample", "x", "--baseline"], ["sample", "x", "--no-baseline"], ["score", "--sample"], ["score", "--no-sample"]],
)
def test_on_off_flags_still_parse_both_ways(tmp_path, argv):
    result = runner.invoke(app, [*argv, "--run", str(tmp_path / "none")])
    assert result.exit_code == 1, result.output  # parsed: the missing run is the error, not the flag (exit 2)
    assert "--run" in result.stderr or "none" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("verb", "flag", "shown"),
    [
        ("sample", "--guidance", "FLUX.1 [dev]'s distilled"),
        ("sample", "--steps", "[schnell] 4, FLUX.2 [klein] 50"),
        ("train", "--validation-guidance", "FLUX.1 [dev]'s distilled"),  # generated from the config field
    ],
)
def test_square_brackets_in_help_are_text_not_markup(verb, flag, shown):
    """The help is rich markup: an unescaped "[dev]" is taken for a style tag and vanishes from the screen."""
    result = CliRunner().invoke(app, [verb, "--help"], env={"COLUMNS": "300"}, terminal_width=300)
    line = next(line for line in result.stdout.splitlines() if f" {flag} " in line)
    assert shown in line, line
