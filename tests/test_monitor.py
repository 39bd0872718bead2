"""metrics.jsonl writing and reading, gradient norms, machine load, running means."""

from __future__ import annotations

import json
import math
import time

import psutil
import pytest
import torch

from sdlora.run import read_metrics
from sdlora.train import monitor
from sdlora.train.monitor import MetricsWriter, RunningMean, grad_norm, group_grad_norms, machine_load


def test_metrics_lines_are_readable_before_close(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write({"step": 1, "loss": 0.5})
    # Another reader (report.py, tail -f) sees the complete line while the writer is still open.
    assert path.read_text(encoding="utf-8") == '{"step": 1, "loss": 0.5}\n'
    writer.write({"step": 2, "loss": torch.tensor(0.25), "lr": [torch.tensor(1e-4)], "dir": tmp_path})
    assert read_metrics(path) == [
        {"step": 1, "loss": 0.5},
        {"step": 2, "loss": 0.25, "lr": [pytest.approx(1e-4)], "dir": str(tmp_path)},
    ]
    writer.close()
    writer.close()  # idempotent


def test_metrics_non_finite_values_become_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        writer.write({"step": 3, "loss": float("nan"), "grad_norm": torch.tensor(float("inf")), "ok": True})
    line = path.read_text(encoding="utf-8")
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"step": 3, "loss": None, "grad_norm": None, "ok": True}


def test_metrics_resume_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        writer.write({"step": 1})
    with MetricsWriter(path) as writer:
        writer.write({"step": 2})
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_read_metrics_skips_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo', encoding="utf-8")
    assert read_metrics(path) == [{"step": 1}]
    assert read_metrics(tmp_path / "missing.jsonl") == []
    assert not hasattr(monitor, "read_metrics")  # one reader: sdlora.run's


def test_metrics_rejects_unserialisable_values(tmp_path):
    with MetricsWriter(tmp_path / "metrics.jsonl") as writer:
        with pytest.raises(TypeError, match="object"):
            writer.write({"x": object()})


def test_grad_norm_by_hand():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
    frozen = torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([4.0], dtype=torch.bfloat16)
    assert grad_norm([a, b, frozen]) == pytest.approx(5.0)
    assert grad_norm([frozen]) == 0.0
    assert grad_norm([]) == 0.0
    norms = group_grad_norms({"unet": [a], "embeddings": [b, frozen]})
    assert norms == {"grad_norm/unet": 3.0, "grad_norm/embeddings": 4.0, "grad_norm/total": pytest.approx(5.0)}


def test_grad_norm_equals_clip_grad_norm_total():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 1))
    model(torch.randn(5, 8)).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf"))
    assert grad_norm(model.parameters()) == pytest.approx(expected.item(), rel=1e-6)


def test_machine_load_on_cpu():
    machine_load(torch.device("cpu"))  # primes the CPU counters
    end = time.process_time() + 0.3
    while time.process_time() < end:  # keep one core busy
        pass
    load = machine_load(torch.device("cpu"))
    assert set(load) == {"cpu_percent", "system_cpu_percent", "rss_gb"}
    assert load["cpu_percent"] > 10
    assert 0 <= load["system_cpu_percent"] <= 100
    rss = psutil.Process().memory_info().rss / 2**30
    assert load["rss_gb"] == pytest.approx(rss, rel=0.2)
    assert all(isinstance(v, float) for v in load.values())


def test_machine_load_cuda_fields_without_and_with_nvml(monkeypatch):
    # No GPU here: stand in for torch.cuda to check which keys a CUDA run logs, in GiB.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "utilization", lambda device=None: 87)
    monkeypatch.setattr(monitor.importlib.util, "find_spec", lambda name: None)
    load = machine_load(torch.device("cuda", 0))
    assert load["cuda_allocated_gb"] == 3.0 and load["cuda_peak_gb"] == 5.0
    assert "cuda_utilization_percent" not in load  # nvidia-ml-py absent: silently left out
    monkeypatch.setattr(monitor.importlib.util, "find_spec", lambda name: object())
    assert machine_load(torch.device("cuda", 0))["cuda_utilization_percent"] == 87.0

    def nvml_fails(device=None):
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setattr(torch.cuda, "utilization", nvml_fails)
    assert "cuda_utilization_percent" not in machine_load(torch.device("cuda", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_machine_load_on_a_real_gpu():
    device = torch.device("cuda")
    x = torch.ones(256, 1024, 1024, device=device)  # 1 GiB
    load = machine_load(device)
    assert load["cuda_allocated_gb"] >= 1.0 and load["cuda_peak_gb"] >= load["cuda_allocated_gb"]
    del x
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return
    assert 0 <= load["cuda_utilization_percent"] <= 100


def test_running_mean_window():
    mean = RunningMean(window=3)
    assert math.isnan(mean.value)
    assert [mean.update(x) for x in [1.0, 2.0, 3.0, 10.0]] == [1.0, 1.5, 2.0, 5.0]
    assert mean.count == 4


def test_running_mean_exponential_is_bias_corrected():
    mean = RunningMean(beta=0.9)
    assert mean.update(torch.tensor(4.0)) == pytest.approx(4.0)  # not 0.4
    # (0.9 * 0.4 + 0.1 * 2) / (1 - 0.81) = 0.56 / 0.19
    assert mean.update(2.0) == pytest.approx(0.56 / 0.19)


def test_running_mean_state_round_trip():
    a = RunningMean(window=2)
    for x in [1.0, 5.0, 7.0]:
        a.update(x)
    b = RunningMean(window=2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.update(9.0) == a.update(9.0) == 8.0


def test_running_mean_rejects_bad_settings():
    with pytest.raises(ValueError):
        RunningMean(window=0)
    with pytest.raises(ValueError):
        RunningMean(beta=1.0)


def test_read_metrics_skips_and_reports_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\xff\xfe garbage\n{"step": "x"}\n\n{"step": 2}\n[3]\n{"step": 3, "lo')
    seen = []
    assert read_metrics(path, on_warning=seen.append) == [{"step": 1}, {"step": 2}]
    assert seen == [f"{path}: skipped 3 unreadable lines (not a JSON record with a step; first: line 2)"]
    with pytest.warns(UserWarning, match="skipped 3 unreadable lines"):
        read_metrics(path)
