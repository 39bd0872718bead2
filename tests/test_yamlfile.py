"""yamlfile: every YAML sdlora reads is bounded (no anchors or aliases, 256 KiB, 32 levels) and UTF-8,
and each problem is one line naming the file: alias bombs under --config, a run's config.yaml on
--resume, a Latin-1 byte in --config, --resume and `sample`'s run."""

from __future__ import annotations

import re
import time
import tracemalloc
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_line_error
from sdlora import yamlfile
from sdlora.cli import app
from sdlora.run import CONFIG

runner = CliRunner()


def bomb(key: str, levels: int = 9) -> str:
    """A config whose lora.`key` is the billion-laughs list: 9 ** levels strings from a few hundred bytes."""
    refs = ['  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    refs += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "laughs:\n" + "\n".join(refs) + f"\nlora:\n  {key}: *l{levels - 1}\n"


@pytest.fixture(scope="module", autouse=True)
def warm(tmp_path_factory):
    """`train` once on a plain config, so the measured calls do not count the CLI's first imports."""
    path = tmp_path_factory.mktemp("warm") / "ok.yaml"
    path.write_text("lora:\n  rank: 4\n")
    assert runner.invoke(app, ["train", "--config", str(path), "--print-config"]).exit_code == 0


def bounded(call):
    """`call()`'s result, asserting it took under 5 s and 50 MB (unchecked, the bomb ran past 120 s and 6 GB)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5
    assert peak < 50 * 2**20, f"{peak / 2**20:.0f} MB"
    return result


@pytest.mark.parametrize("key", ["rank", "target_modules"])
def test_an_alias_bomb_in_the_config_is_refused_fast_in_one_line(tmp_path: Path, key: str):
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb(key))
    result = bounded(lambda: runner.invoke(app, ["train", "--config", str(path), "--print-config"]))
    one_line_error(result, f"--config {path}: line 2: YAML anchors and aliases")
    assert len(result.stderr) < 300


def test_an_alias_bomb_in_a_runs_config_yaml_is_refused_on_resume(tmp_path: Path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / CONFIG).write_text(bomb("rank"))
    result = bounded(lambda: runner.invoke(app, ["train", "--resume", str(run)]))
    one_line_error(result, f"{run / CONFIG}: damaged, not a readable config (line 2: YAML anchors and aliases")


LATIN_1 = "lora:\n  rank: 4\nrun:\n  name: caf\xe9\n".encode("latin-1")  # the é is byte 0xe9 at offset 32


def test_a_latin_1_config_is_one_line_naming_the_file_and_the_byte(tmp_path: Path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(LATIN_1)
    result = runner.invoke(app, ["train", "--config", str(path), "--print-config"])
    one_line_error(result, f"--config {path}: not UTF-8 text (byte 0xe9 at offset 32); save it as UTF-8")


def test_a_latin_1_config_yaml_is_one_line_on_resume_and_in_sample(tmp_path: Path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / CONFIG).write_bytes(LATIN_1)
    byte = "not UTF-8 text (byte 0xe9 at offset 32)"
    one_line_error(runner.invoke(app, ["train", "--resume", str(run)]), str(run / CONFIG), byte)
    one_line_error(runner.invoke(app, ["sample", "sksToy", "--run", str(run)]), str(run / CONFIG), byte)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a: &x 1\nb: *x\n", "line 1: YAML anchors and aliases"),
        ("base: &b {rank: 4}\nlora:\n  <<: *b\n", "line 1: YAML anchors and aliases"),
        ("a: " + "[" * 40 + "]" * 40 + "\n", "line 1: nested more than 32 levels deep"),
        ("a: [1\n", "not valid YAML (did not find expected ',' or ']' at line 2)"),
        ("x: " + "9" * 5000 + "\n", "not valid YAML (Exceeds the limit (4300 digits)"),
        ("x: 1\n" + "#" * yamlfile.MAX_BYTES, "over 256 KiB, too large for a sdlora YAML file"),
    ],
)
def test_what_the_loader_refuses(tmp_path: Path, text: str, problem: str):
    path = tmp_path / "f.yaml"
    path.write_text(text)
    with pytest.raises(yamlfile.YamlError) as caught:
        yamlfile.read(path)
    assert str(caught.value).startswith(f"{path}: {problem}"), caught.value


def test_what_the_loader_reads(tmp_path: Path):
    path = tmp_path / "f.yaml"
    path.write_bytes("\ufefflora: {rank: 4, target_modules: [to_q]}\nname: café\n".encode("utf-8"))
    assert yamlfile.read(path) == {"lora": {"rank": 4, "target_modules": ["to_q"]}, "name": "café"}
    path.write_text("")
    assert yamlfile.read(path) is None


def test_every_yaml_read_goes_through_the_loader():
    src = Path(yamlfile.__file__).parent
    reading = re.compile(r"yaml\.(safe_load|load|full_load|unsafe_load|load_all|safe_load_all|compose|parse)\(")
    readers = [p for p in src.rglob("*.py") if p != Path(yamlfile.__file__) and reading.search(p.read_text())]
    assert readers == [], readers


def test_what_sdlora_writes_it_reads_back_a_shared_value_written_out_twice(tmp_path: Path):
    shared = ["to_q", "to_v"]  # safe_dump would write `&id001` and `*id001`, which `read` refuses
    text = yamlfile.dumps({"lora": {"target_modules": shared}, "other": {"target_modules": shared}})
    assert "&" not in text and "*" not in text
    (tmp_path / "c.yaml").write_text(text, encoding="utf-8")
    assert yamlfile.read(tmp_path / "c.yaml") == {
        "lora": {"target_modules": shared},
        "other": {"target_modules": shared},
    }
