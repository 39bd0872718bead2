"""sdlora.devices' CPU thread choice: the cores other processes leave free, and never over the user's choice.

An OpenMP step waits for its slowest thread at every parallel region, so a thread on a core another
process holds stalls the whole step (issue 22: 2 threads under load ran far slower than 1). These check
the decision, not a timing.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sdlora import devices


@pytest.mark.parametrize(
    ("cpus", "others", "threads"),
    [
        (2, 0.0, 2),  # a quiet machine: every core
        (2, 0.3, 2),  # a little background work: still both
        (2, 1.0, 1),  # one core held by a neighbour
        (2, 2.0, 1),  # all held: one thread, never zero
        (2, 7.5, 1),
        (8, 3.0, 5),
        (8, -1.0, 8),  # a reading below zero (rounding) is no reason for more than the cores
    ],
)
def test_threads_are_the_cores_other_processes_leave_free(cpus, others, threads):
    assert devices.cpu_threads(cpus, others) == threads


def test_others_busy_is_the_machine_less_this_process():
    # 2 cores: the machine 100% busy, this process 60% of one core -> others hold 1.4 cores.
    assert devices.others_busy_cores(2, 100.0, 60.0) == pytest.approx(1.4)
    # Alone on the machine: its own 2 busy threads are not someone else's.
    assert devices.others_busy_cores(2, 100.0, 200.0) == 0.0
    assert devices.others_busy_cores(2, 50.0, 100.0) == 0.0


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_fit_sets_torch_threads_on_a_busy_cpu_and_gives_them_back_when_it_is_quiet(monkeypatch, restore_threads):
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    busy = devices.fit_cpu_threads(torch.device("cpu"), 100.0, 40.0, 2, environ={})
    assert busy == 1 and torch.get_num_threads() == 1
    quiet = devices.fit_cpu_threads(torch.device("cpu"), 50.0, 100.0, 2, environ={})
    assert quiet == 2 and torch.get_num_threads() == 2


def test_fit_goes_no_higher_than_the_run_started_with(monkeypatch, restore_threads):
    # 4 logical CPUs, 2 physical (torch's default: 2 threads); one logical CPU busy elsewhere.
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert devices.fit_cpu_threads(torch.device("cpu"), 0.0, 0.0, 2, environ={}) == 2
    assert devices.fit_cpu_threads(torch.device("cpu"), 0.0, 0.0, 1, environ={}) == 1  # the caller chose 1
    assert devices.fit_cpu_threads(torch.device("cpu"), 75.0, 100.0, 2, environ={}) == 1  # 2 of 4 held: 1 of 2


def test_fit_leaves_threads_alone_when_the_user_chose_or_off_the_cpu(restore_threads):
    torch.set_num_threads(1)
    assert devices.fit_cpu_threads(torch.device("cpu"), 0.0, 0.0, 2, environ={"OMP_NUM_THREADS": "1"}) is None
    assert devices.fit_cpu_threads(torch.device("cuda"), 0.0, 0.0, 2, environ={}) is None
    assert torch.get_num_threads() == 1


def test_the_cli_makes_idle_openmp_threads_sleep_before_torch_loads():
    code = (
        "import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); import sdlora.cli; "
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["PASSIVE", "False"]
