"""The run folder contract: latest pointer, config reading, clear errors."""

from __future__ import annotations

import pytest
import yaml

from sdlora.errors import RunError
from sdlora.run import load_run, point_latest, resolve_run_dir


def _run(tmp_path, name="r1", config=None):
    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    config = config or {
        "model": {"name": "tiny-sd", "revision": None},
        "data": {"dataset": str(tmp_path / "dataset"), "resolution": 64, "token": "sksToy", "class_word": "toy"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_latest_points_at_newest_run(tmp_path):
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b")
    point_latest(a)
    point_latest(b)
    assert resolve_run_dir(tmp_path / "runs" / "latest") == b.resolve()
    info = load_run(tmp_path / "runs" / "latest")
    assert (info.model, info.token, info.class_word, info.resolution) == ("tiny-sd", "sksToy", "toy", 64)


def test_missing_run_says_how_to_make_one(tmp_path):
    with pytest.raises(RunError, match="sdlora train"):
        load_run(tmp_path / "runs" / "latest")


def test_run_without_lora(tmp_path):
    info = load_run(_run(tmp_path))
    with pytest.raises(RunError, match="no LoRA"):
        info.lora_dir()


def test_config_missing_keys(tmp_path):
    with pytest.raises(RunError, match="missing model.name"):
        load_run(_run(tmp_path, config={"data": {}}))


def test_bad_yaml(tmp_path):
    run = _run(tmp_path)
    (run / "config.yaml").write_text("model: [unclosed")
    with pytest.raises(RunError, match="not valid YAML"):
        load_run(run)


def test_a_dangling_latest_link_names_where_it_points(tmp_path):
    run = _run(tmp_path, "gone")
    point_latest(run)
    run.rename(tmp_path / "runs" / "moved")
    latest = tmp_path / "runs" / "latest"
    with pytest.raises(RunError) as info:
        load_run(latest)
    assert str(info.value).startswith(f"{latest}: a link to {tmp_path / 'runs' / 'gone'}, which does not exist")
    latest.unlink()
    latest.write_text("gone\n")  # where links fail: a text file naming the run
    with pytest.raises(RunError, match="names the run 'gone', which does not exist"):
        load_run(latest)
