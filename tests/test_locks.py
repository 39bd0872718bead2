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


def hold(folder, verb: str, shared: bool) -> subprocess.Popen:
    """Another process holding `folder`'s lock (shared or exclusive) until killed."""
    code = (
        "import sys, time; from sdlora.locks import acquire;"
        f" acquire(sys.argv[1], {verb!r}, shared={shared}); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_readers_share_the_lock_and_a_writer_is_refused_naming_a_reader(tmp_path):
    reader = hold(tmp_path, "train", shared=True)
    try:
        with folder_lock(tmp_path, "score", shared=True) as mine:  # readers together
            assert mine is not None and mine.is_file()
        with pytest.raises(RunError, match=rf"in use by `sdlora train` \(pid {reader.pid}\), which reads it") as exc:
            acquire(tmp_path, "prepare")
        assert "\n" not in str(exc.value) and str(tmp_path) in str(exc.value)
        assert not (tmp_path / LOCK_FILE).exists()  # the refused writer left nothing behind
    finally:
        reader.kill()
        reader.wait()
    # the reader is dead: its record is stale, removed by the next writer
    with folder_lock(tmp_path, "prepare"):
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]
    assert not any(tmp_path.iterdir())


def test_a_reader_is_refused_while_a_writer_holds_the_lock(tmp_path):
    writer = hold(tmp_path, "prepare", shared=False)
    try:
        with pytest.raises(RunError, match=rf"in use by `sdlora prepare` \(pid {writer.pid}\)"):
            acquire(tmp_path, "train", shared=True)
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]  # no reader record left behind
    finally:
        writer.kill()
        writer.wait()
    with folder_lock(tmp_path, "train", shared=True) as record:  # the writer's stale lock does not hold a reader
        assert record is not None


def test_a_reader_of_a_missing_or_unwritable_folder_reads_unlocked(tmp_path):
    assert acquire(tmp_path / "missing", "train", shared=True) is None
    assert not (tmp_path / "missing").exists()  # a reader creates nothing
    if os.name != "posix" or os.geteuid() == 0:
        return  # root writes anywhere
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with folder_lock(folder, "train", shared=True) as record:
            assert record is None
    finally:
        folder.chmod(0o755)
