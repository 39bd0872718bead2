"""The multi-process launcher: 2 CPU processes form one gloo group and all-reduce."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest

from sdlora.errors import ConfigError
from sdlora.train.launch import in_launched_process, launch_command, launch_processes

WORKER = """
import json, os, sys
from pathlib import Path

import torch
from accelerate import Accelerator

accelerator = Accelerator()
value = torch.tensor([accelerator.process_index + 1.0], device=accelerator.device)
total = accelerator.reduce(value, reduction="sum")
record = {
    "index": accelerator.process_index,
    "world": accelerator.num_processes,
    "sum": total.item(),
    "device": str(accelerator.device),
    "backend": accelerator.state.backend,
    "launched": os.environ.get("SDLORA_LAUNCHED"),
    "argv": sys.argv[1:],
}
out = Path(sys.argv[1]) / f"rank{accelerator.process_index}.json"
out.write_text(json.dumps(record))
accelerator.end_training()
"""


def _module(tmp_path, name: str, source: str) -> dict[str, str]:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}


def test_two_cpu_processes_all_reduce(tmp_path):
    env = _module(tmp_path, "sdlora_launch_worker", WORKER)
    out = tmp_path / "out"
    out.mkdir()
    start = time.monotonic()
    code = launch_processes([str(out), "--flag"], 2, cpu=True, module="sdlora_launch_worker", env=env)
    assert code == 0
    records = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["index"])
    assert [r["index"] for r in records] == [0, 1]
    for r in records:
        assert r["world"] == 2
        assert r["sum"] == 3.0  # 1 + 2 over both ranks
        assert r["device"].startswith("cpu") and r["backend"] == "gloo"
        assert r["launched"] == "1" and r["argv"] == [str(out), "--flag"]
    assert time.monotonic() - start < 60


def test_failing_worker_gives_its_exit_code_and_one_line(tmp_path, capfd):
    env = _module(tmp_path, "sdlora_launch_fail", "import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    assert launch_processes([], 2, cpu=True, module="sdlora_launch_fail", env=env) == 3
    err = capfd.readouterr().err
    assert "sdlora: process 1 of 2 failed (exit code 3)" in err
    assert "Traceback" not in err  # one line, not the launcher's traceback


def test_failing_single_process_exit_code(tmp_path, capfd):
    env = _module(tmp_path, "sdlora_launch_fail1", "import sys\nsys.exit(4)\n")
    assert launch_processes([], 1, cpu=True, module="sdlora_launch_fail1", env=env) == 4
    assert "Traceback" not in capfd.readouterr().err


def test_single_process_on_cpu_runs_the_module_once(tmp_path):
    env = _module(tmp_path, "sdlora_launch_one", WORKER)
    out = tmp_path / "out"
    out.mkdir()
    assert launch_processes([str(out)], 1, cpu=True, module="sdlora_launch_one", env=env) == 0
    (record,) = [json.loads(p.read_text()) for p in out.glob("rank*.json")]
    assert record["world"] == 1 and record["sum"] == 1.0


def test_launch_command_runs_sdlora_under_accelerate():
    cmd = launch_command(["train", "--steps", "5"], 2, cpu=True)
    assert cmd[:2] == [sys.executable, "-c"] and "accelerate_launch_main" in cmd[2]
    assert cmd[-5:] == ["-m", "sdlora", "train", "--steps", "5"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    assert "--cpu" not in cmd  # accelerate's --cpu would start a single process


def test_launch_command_with_config_file(tmp_path):
    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\n", encoding="utf-8")
    cmd = launch_command(["train"], 4, config_file=config)
    assert cmd[cmd.index("--config_file") + 1] == str(config)
    assert "--multi_gpu" not in cmd  # the config file chooses the backend
    with pytest.raises(ConfigError, match="missing.yaml"):
        launch_command(["train"], 2, config_file=tmp_path / "missing.yaml")


def test_launch_command_rejects_zero_processes():
    with pytest.raises(ConfigError, match="--num-processes"):
        launch_command(["train"], 0)


def test_in_launched_process(monkeypatch):
    monkeypatch.delenv("SDLORA_LAUNCHED", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not in_launched_process()
    monkeypatch.setenv("SDLORA_LAUNCHED", "1")
    assert in_launched_process()
