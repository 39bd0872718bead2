"""Atomic file writing: a reader never sees half a file, a crash never leaves one.

Everything sdlora writes goes through a temp file in the same folder (`.<name>.<random>.tmp`),
then `os.replace`. A process killed mid-write (kill -9, power loss) can leave such a temp file;
`remove_stale_tmp` clears them when the next command starts in that folder. `write_problem`
turns an OSError from a failed write (full disk, read-only or unwritable folder) into the one
line the CLI prints.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """sdlora's own cache folder (tiny models' tokenizer, Yandex downloads, benchmarks): $SDLORA_CACHE,
    else ~/.cache/sdlora. Model weights stay in the Hugging Face cache."""
    return Path(os.environ.get("SDLORA_CACHE") or Path.home() / ".cache" / "sdlora")


_TMP_NAME = re.compile(r"^\..+\.[^.]+\.tmp$")  # how atomic_path names its temp files


def remove_stale_tmp(folder: str | os.PathLike[str], *, recursive: bool = True) -> int:
    """Delete temp files that killed writes left in `folder` (and, by default, its sub-folders);
    the number removed. Call it while holding the folder's lock (sdlora.locks), so no live
    writer's temp file is taken."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    paths = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    for path in paths:
        if _TMP_NAME.match(path.name) and path.is_file() and not path.is_symlink():
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass  # someone else's file, or already gone: leave it
    return removed


# errno values that mean "this place cannot be written" (the user's to fix), not a bug: what to do.
WRITE_ERRNOS = {
    errno.ENOSPC: "free some space, or write elsewhere{flag}",
    errno.EDQUOT: "free some space (disk quota), or write elsewhere{flag}",
    errno.EROFS: "write to a writable place{flag}",
    errno.EACCES: "write to a folder you may write to{flag}, or fix its permissions",
    errno.EPERM: "write to a folder you may write to{flag}, or fix its permissions",
    errno.ENOTDIR: "a file stands where a folder should be; remove it, or write elsewhere{flag}",
    errno.EISDIR: "a folder stands where a file should be; remove it, or write elsewhere{flag}",
    errno.ENAMETOOLONG: "choose a shorter path{flag}",
    errno.EFBIG: "the file system refuses files this large; write elsewhere{flag}",
    errno.EMLINK: "the folder holds too many entries; write elsewhere{flag}",
}


def write_problem(exc: BaseException, flag: str | None = None) -> str | None:
    """One line for an OSError a user can fix (full disk, read-only or unwritable place), else None.

    It names the path (`exc.filename`), the cause (`os.strerror`) and what to do; `flag` is the
    option that chooses where the verb writes (e.g. --out), named in the hint."""
    if not isinstance(exc, OSError) or exc.errno not in WRITE_ERRNOS:
        return None
    where = exc.filename if exc.filename is not None else "writing"
    hint = WRITE_ERRNOS[exc.errno].format(flag=f" ({flag})" if flag else "")
    return f"{os.fsdecode(where)}: {os.strerror(exc.errno)}; {hint}"


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Raise OSError naming `folder` (worded by `write_problem`) unless a file can be created in
    it (it is created if missing); cheap, so call it before a long step that writes at the end."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sdlora-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, os.strerror(exc.errno), str(folder)) from None
