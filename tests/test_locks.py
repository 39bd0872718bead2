"""The folder lock: one process at a time, a dead holder's lock taken over, one line naming the pid."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from sdlora.errors import RunError
from sdlora.locks import LOCK_FILE, acquire, folder_lock, release


def test_a_second_holder_fails_naming_the_live_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(
            json.dumps({"pid": holder.pid, "host": socket.gethostname(), "verb": "train"}), encoding="utf-8"
        )
        with pytest.raises(RunError, match=rf"in use by `sdlora train` \(pid {holder.pid}\)") as exc:
            acquire(tmp_path, "train")
        assert "\n" not in str(exc.value)
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale and taken over
    with folder_lock(tmp_path, "train") as path:
        assert json.loads(path.read_text(encoding="utf-8"))["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_released_on_error_and_only_by_its_owner(tmp_path):
    with pytest.raises(ValueError), folder_lock(tmp_path, "prepare"):
        raise ValueError("boom")
    assert not (tmp_path / LOCK_FILE).exists()
    other = {"pid": os.getpid() + 1_000_000, "host": "another-host", "verb": "train"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(other), encoding="utf-8")
    release(tmp_path / LOCK_FILE)  # not ours: kept
    assert (tmp_path / LOCK_FILE).exists()
    with pytest.raises(RunError, match="in use by"):  # another host's lock is never taken over
        acquire(tmp_path, "train")
