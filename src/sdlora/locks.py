"""One process at a time in a run folder or a dataset folder, and readers beside each other: pid lock files.

    with folder_lock(run_dir, "train"):                     # exclusive: one writer, no readers
        ...
    with folder_lock(dataset, "train", shared=True):        # shared: readers together, no writer
        ...

The exclusive lock is `<folder>/.sdlora.lock`, created with O_EXCL (atomic on every local file system)
and holding the owner's pid, host and verb. A shared lock is one record per reader,
`<folder>/.sdlora.lock.read-<unique>` (written whole, then renamed into place), holding the same.
Each side first writes its own file, then looks for the other's: a reader that finds a live writer, or
a writer that finds a live reader, removes its file and fails at once in one line naming that pid and
verb (of two that start together, at least one sees the other). A file left by a process that died
(kill -9, a crash) is recognised by its pid no longer running on this host, and taken over or removed.
Files are removed on exit. Plain files and pids, not fcntl/flock: the same on POSIX and Windows, and
the holder can be named. A reader that cannot write in the folder (read-only media, another user's
dataset) reads it unlocked: a writer could not write there either.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Iterator

from sdlora.errors import RunError

LOCK_FILE = ".sdlora.lock"
READ_PREFIX = f"{LOCK_FILE}.read-"  # + a unique suffix: one file per reader


def is_lock_file(name: str) -> bool:
    """The exclusive lock, a reader's record or one being written (they do not make a folder hold something)."""
    return name == LOCK_FILE or name.startswith(f"{LOCK_FILE}.")


def _alive(pid: int) -> bool:
    if os.name == "nt":
        return _alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _alive_windows(pid: int) -> bool:
    """On Windows os.kill(pid, 0) would terminate the process: ask for its exit code instead."""
    import ctypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: someone else's live process
    try:
        code = ctypes.c_ulong()
        return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


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


def _record(verb: str) -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "verb": verb})


def _in_use(folder: Path, holder: dict | None, path: Path, reading: bool = False) -> RunError:
    who = f"`sdlora {holder.get('verb', '?')}` (pid {holder.get('pid', '?')})" if holder else "another sdlora"
    how = ", which reads it" if reading else ""
    return RunError(
        f"{folder}: in use by {who}{how}; wait for it to finish, or stop it "
        f"(a lock left by a dead process is taken over by itself: {path})"
    )


def _live_reader(folder: Path) -> tuple[Path, dict | None] | None:
    """A reader record of a live process (stale ones are removed on the way), else None."""
    for path in sorted(folder.glob(f"{READ_PREFIX}*")):
        holder = _holder(path)
        if holder is None and not path.exists():
            continue  # released while we looked
        if _stale(holder):
            path.unlink(missing_ok=True)
            continue
        return path, holder
    return None


def acquire(folder: Path, verb: str, *, shared: bool = False) -> Path | None:
    """Take `folder`'s lock for `verb` (exclusive, or `shared` with other readers); RunError naming the
    holder if a live process holds it the other way. Returns the file to `release` (None: a reader in a
    folder that is missing or cannot be written, which reads unlocked)."""
    if shared:
        return _acquire_shared(Path(folder), verb)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if _stale(holder):
                path.unlink(missing_ok=True)  # its process is gone: take the lock over
                continue
            raise _in_use(folder, holder, path) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_record(verb))
        reader = _live_reader(folder)  # after our own file: a reader starting now sees it
        if reader is not None:
            path.unlink(missing_ok=True)
            raise _in_use(folder, reader[1], reader[0], reading=True)
        return path
    raise RunError(f"{folder}: could not take its lock {path}; remove the file if no sdlora runs there")


def _acquire_shared(folder: Path, verb: str) -> Path | None:
    if not folder.is_dir():
        return None  # nothing to read: the reader's own check names what is missing
    unique = uuid.uuid4().hex[:12]
    path, new = folder / f"{READ_PREFIX}{unique}", folder / f"{LOCK_FILE}.new-{unique}"
    try:
        new.write_text(_record(verb), encoding="utf-8")
        os.replace(new, path)  # whole, so a writer never reads half a record
    except OSError:
        with contextlib.suppress(OSError):
            new.unlink(missing_ok=True)
        return None  # a folder we cannot write: no sdlora can change it under us either
    writer = folder / LOCK_FILE
    holder = _holder(writer)
    if writer.exists() and not _stale(holder):  # after our own record: a writer starting now sees it
        path.unlink(missing_ok=True)
        raise _in_use(folder, holder, writer)
    return path


def release(path: Path | None) -> None:
    """Remove the lock (or reader record) if it is still ours."""
    if path is None:
        return
    holder = _holder(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def folder_lock(folder: Path, verb: str, *, shared: bool = False) -> Iterator[Path | None]:
    """Hold `folder`'s lock for the block, exclusive or `shared` (see the module docstring)."""
    path = acquire(folder, verb, shared=shared)
    try:
        yield path
    finally:
        release(path)
