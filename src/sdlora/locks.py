"""One process at a time in a run folder or a dataset folder: an exclusive lock file holding the pid.

    with folder_lock(run_dir, "train"):
        ...

The lock is `<folder>/.sdlora.lock`, created with O_EXCL (atomic on every local file system) and
holding the owner's pid, host and verb. A second process fails at once with one line naming
that pid. A lock left by a process that died (kill -9, a crash) is recognised by its pid no
longer running on this host, and taken over. The file is removed on exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from sdlora.errors import RunError

LOCK_FILE = ".sdlora.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock file's owner, or None when the file is gone or unreadable (a lock being written)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stale(holder: dict | None) -> bool:
    if holder is None:
        return False
    if holder.get("host") != socket.gethostname():
        return False  # another machine's process: we cannot tell, so it holds
    pid = holder.get("pid")
    return not isinstance(pid, int) or pid == os.getpid() or not _alive(pid)


def acquire(folder: Path, verb: str) -> Path:
    """Take `folder`'s lock for `verb`; RunError naming the holder if a live process has it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "verb": verb})
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if _stale(holder):
                path.unlink(missing_ok=True)  # its process is gone: take the lock over
                continue
            who = f"`sdlora {holder.get('verb', '?')}` (pid {holder.get('pid', '?')})" if holder else "another sdlora"
            raise RunError(
                f"{folder}: in use by {who}; wait for it to finish, or stop it "
                f"(a lock left by a dead process is taken over by itself: {path})"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(record)
        return path
    raise RunError(f"{folder}: could not take its lock {path}; remove the file if no sdlora runs there")


def release(path: Path) -> None:
    """Remove the lock if it is still ours."""
    holder = _holder(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(folder: Path, verb: str) -> Iterator[Path]:
    """Hold `folder`'s lock for the block (see the module docstring)."""
    path = acquire(folder, verb)
    try:
        yield path
    finally:
        release(path)
