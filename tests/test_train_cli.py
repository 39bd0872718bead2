"""`sdlora train` as a person types and reads it: one option per config field, every name an error
message uses is an option, the help fits 80 columns in panels, and the report is refreshed after training."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from importlib import resources
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from sdlora import config as config_mod
from sdlora.cli import VERBS, app
from sdlora.errors import ConfigError

runner = CliRunner()
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
PIPELINE = (
    "prepare",
    "caption",
    "train",
    "sample",
    "score",
    "tune",
    "report",
    "push",
    "demo",
)  # tune: train + sample + score, many times; push shares what report shows


def print_config(*args: str) -> dict:
    result = runner.invoke(app, ["train", *args, "--print-config"])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


def value_at(printed: dict, key: str):
    section, name = key.split(".")
    return printed[section][name]


def train_option_names() -> set[str]:
    command = typer.main.get_command(app).commands["train"]
    names = {name for param in command.params for name in (*param.opts, *param.secondary_opts)}
    return {name for name in names if name.startswith("-")}


# A value for each field that differs from its default and is valid on its own (the CLI checks the config).
NEEDS = {
    "train.lr_warmup_steps": ["--lr-scheduler", "cosine"],
    "validation.score_every": ["--validate-every", "1"],
    "validation.best_by": ["--score-every", "100"],
}


def cli_value(option: config_mod.FieldOption):
    """(argv, expected config value) for an option."""
    flag, default = option.flags[0], option.default
    if option.kind == "flag":
        return ([f"--no-{flag[2:]}"], False) if default is True else ([flag], True)
    if option.kind == "repeat":
        return [flag, "first {token}", flag, "second, with a comma"], ["first {token}", "second, with a comma"]
    if option.kind == "list":
        return [flag, "to_q,to_v"], ["to_q", "to_v"]
    hint = typing.get_type_hints(config_mod.GROUPS[option.key.split(".")[0]])[option.key.split(".")[1]]
    choices = [a for a in typing.get_args(hint) if isinstance(a, str)]
    if choices:
        value = choices[-1] if choices[-1] != default else choices[0]
    elif option.type is int:
        value = 64 if default is None else default + 1
    elif option.type is float:
        value = 1.0 if default is None else default + 0.5
    else:
        value = "x"
    return [flag, str(value)], value


@pytest.mark.parametrize("option", config_mod.options(), ids=lambda o: o.key)
def test_every_config_field_has_a_flag_that_sets_it(option):
    argv, expected = cli_value(option)
    printed = print_config(*NEEDS.get(option.key, []), *argv)
    assert value_at(printed, option.key) == expected
    for alias in option.flags[1:]:  # -m, --lr: the same field
        assert value_at(print_config(*NEEDS.get(option.key, []), alias, *argv[1:]), option.key) == expected


def bad_values(option: config_mod.FieldOption) -> list:
    common = {int: [0, -1, 3, 2.5, "abc"], float: [0.0, -1.0, 1.0, 2.0, "abc"], str: ["", " ", "latest", "a/b", "zzz"]}
    return {"flag": ["maybe"], "list": [[], 3], "repeat": [[], 3]}.get(option.kind) or common[option.type]


def error_flags() -> dict[str, str]:
    """Every --flag that a config error names, with the key whose bad value made it."""
    named = {}
    for option in config_mod.options():
        section, name = option.key.split(".")
        for value in bad_values(option):
            for extra in ({}, {"score_every": 3}, {"lr_scheduler": "cosine"}):
                if extra and name in extra:
                    continue
                values = {name: value, **(extra if section in ("validation", "train") else {})}
                values = {k: v for k, v in values.items() if k in config_mod.GROUPS[section].__dataclass_fields__}
                try:
                    config_mod.build_config({section: values})
                except ConfigError as exc:
                    named.update({flag: option.key for flag in FLAG.findall(str(exc))})
    return named


def test_every_flag_an_error_names_is_an_option_of_train():
    named = error_flags()
    assert {"--val-loss-timesteps", "--validation-seed", "--rank", "--embedding-lr", "--score-every"} <= set(named)
    source = "".join(
        p.read_text(encoding="utf-8") for p in Path(config_mod.__file__).parent.glob("*.py")
    )  # literal names in messages and docstrings too
    literal = {flag for flag in FLAG.findall(source)}
    options = train_option_names()
    missing = sorted(flag for flag in set(named) | literal if flag not in options)
    assert missing == [], f"config messages name flags `sdlora train` does not have: {missing}"
    # ... and each is accepted on the command line, setting the field that the message is about.
    by_flag = {flag: o for o in config_mod.options() for flag in o.flags}
    for flag, key in named.items():
        if flag in by_flag and by_flag[flag].key == key:
            argv, expected = cli_value(by_flag[flag])
            assert value_at(print_config(*NEEDS.get(key, []), *argv), key) == expected


def test_error_for_a_field_without_a_typed_default_flag_names_it():
    result = runner.invoke(app, ["train", "validation.loss_timesteps=0", "--print-config"])
    assert result.exit_code == 1
    assert "--val-loss-timesteps must be at least 1" in result.output
    again = runner.invoke(app, ["train", "--val-loss-timesteps", "0", "--print-config"])
    assert again.exit_code == 1 and "--val-loss-timesteps must be at least 1" in again.output


def test_flags_left_out_keep_the_yaml_and_bool_pairs_override_it(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {random_flip: true, cache: false}\nvalidation: {prompts: [a, b]}\n", encoding="utf-8")
    printed = print_config("--config", str(path))
    assert printed["data"]["random_flip"] is True and printed["data"]["cache"] is False
    assert printed["validation"]["prompts"] == ["a", "b"]
    printed = print_config("--config", str(path), "--no-random-flip", "--cache", "--validation-prompt", "c")
    assert printed["data"]["random_flip"] is False and printed["data"]["cache"] is True
    assert printed["validation"]["prompts"] == ["c"]
    assert print_config("--config", "sd15")["embedding"]["train"] is None
    assert print_config("--no-train-token-embedding")["embedding"]["train"] is False
    both = runner.invoke(app, ["train", "--cache", "--no-cache", "--print-config"])
    assert both.exit_code == 1 and "--cache and --no-cache" in both.output and "Traceback" not in both.output


def test_dotted_overrides_beat_flags_which_beat_the_preset():
    printed = print_config("--config", "tiny", "--rank", "2", "lora.rank=3", "--lr", "0.5")
    assert printed["lora"]["rank"] == 3 and printed["train"]["learning_rate"] == 0.5
    assert printed["model"]["name"] == "tiny-sd"


def test_verb_options_are_checked():
    result = runner.invoke(app, ["train", "--num-processes", "0", "--print-config"])
    assert result.exit_code == 1 and "--num-processes must be at least 1, got 0" in result.output


# ----------------------------------------------------------------------------- the help a person reads


def help_text(*argv: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "dumb", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sdlora", *argv, "--help"], capture_output=True, text=True, env=env, check=True
    )


def test_train_help_fits_80_columns_in_panels_with_every_flag_whole():
    out = help_text("train")
    assert out.stderr == ""
    text = out.stdout
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert too_long == []
    titles = [*config_mod.PANELS, "Distributed"]
    positions = [text.find(f"─ {title} ─") for title in titles]
    assert -1 not in positions and positions == sorted(positions), dict(zip(titles, positions))
    words = set(re.findall(r"(?<![\w-])-{1,2}[a-z][a-z0-9-]*", text))
    for name in train_option_names() - {"--help"}:
        if not name.startswith("--no-"):  # the --no- forms are named in their flag's help text
            assert name in words, f"{name} missing or cut in the 80-column help"
    for option in config_mod.options():
        if option.kind == "flag":
            assert f"--no-{option.flags[0][2:]}" in words
    assert "…" not in text


@pytest.mark.parametrize("argv", [[], ["train"], ["demo"]])
def test_help_has_no_type_noise(argv):
    text = help_text(*argv, columns=100).stdout
    noise = re.findall(r"<(?:bool|str|int|float|path|list)[^>]*>|int range|float range", text)
    assert noise == []


def test_literal_fields_name_their_choices_in_the_help():
    for option in config_mod.options():
        section, name = option.key.split(".")
        hint = typing.get_type_hints(config_mod.GROUPS[section])[name]
        for choice in (a for a in typing.get_args(hint) if isinstance(a, str)):
            assert choice in option.help, (option.key, choice)


def test_root_help_lists_the_verbs_in_pipeline_order():
    assert tuple(VERBS) == PIPELINE
    text = help_text(columns=100).stdout
    commands = text[text.index("Commands") :]
    positions = [re.search(rf"│ {verb} ", commands).start() for verb in PIPELINE]
    assert positions == sorted(positions)


@pytest.mark.parametrize("verb", ["train", "demo"])
def test_help_ends_with_two_or_three_examples(verb):
    import importlib

    epilog = importlib.import_module(VERBS[verb][0]).EPILOG
    examples = [line.strip() for line in epilog.splitlines() if line.strip().startswith(f"sdlora {verb}")]
    assert 2 <= len(examples) <= 3
    assert all(len(line) <= 76 for line in epilog.splitlines())  # the help indents it; 80 columns still
    text = help_text(verb).stdout
    assert text.rstrip().endswith(examples[-1])


def test_panel_of_every_field_is_a_known_panel():
    for section, cls in config_mod.GROUPS.items():
        for f in dataclasses.fields(cls):
            assert cls.panel(f.name) in config_mod.PANELS, f"{section}.{f.name}"


def test_presets_only_use_existing_keys():
    for preset in config_mod.PRESETS:
        text = resources.files("sdlora").joinpath("configs", f"{preset}.yaml").read_text(encoding="utf-8")
        for flag in FLAG.findall(text):
            assert flag in train_option_names() or flag in ("--print-config", "--config", "--resume"), flag


# ----------------------------------------------------------------------------- after training


@pytest.mark.parametrize("stop_signal, code", [(0, 0), (2, 130), (15, 143)])  # done, Ctrl-C, SIGTERM
def test_the_report_is_refreshed_after_training_also_when_stopped(tmp_path: Path, monkeypatch, stop_signal, code):
    from sdlora.cli import train as train_cli
    from sdlora.train import loop

    run_dir = tmp_path / "runs" / "r"
    calls = []
    monkeypatch.setattr(
        loop,
        "run_training",
        lambda cfg, resume=None, on_event=None: loop.TrainResult(
            run_dir=run_dir,
            steps=2,
            best_val_loss=None,
            lora_dir=None,
            interrupted=bool(stop_signal),
            stop_signal=stop_signal,
        ),
    )
    monkeypatch.setattr(train_cli, "refresh_report", lambda path, **kw: calls.append(path))
    monkeypatch.delenv("RANK", raising=False)
    result = runner.invoke(app, ["train", "--model", "tiny-sd", "--dataset", str(tmp_path)])
    assert result.exit_code == code, result.output
    assert calls == [run_dir]
