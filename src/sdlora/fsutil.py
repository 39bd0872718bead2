"""Atomic file writing: a reader never sees half a file, a crash never leaves one.

Everything sdlora writes goes through a temp file in the same folder (`.<name>.<random>.tmp`),
then `os.replace`. A process killed mid-write (kill -9, power loss) can leave such a temp file;
`remove_stale_tmp` clears them when the next command starts in that folder. A set of files that
belong together (a LoRA and its token embedding) is written as a folder: `atomic_folder` fills
`.<name>.new.tmp`, then swaps it in for the old folder (`swap_folder`); a kill between the swap's
two renames is finished by `recover_folder`. `writing` names the file in a failed write (full disk:
an OSError from `write()` names none, safetensors raises its own `SafetensorError`), and
`write_problem` turns that into the one line the CLI prints.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
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
        # mkstemp makes the file private (0600); the result gets the mode a plain open() would give it
        # (or the replaced file's), so images, reports and configs stay readable as the user's umask says.
        os.chmod(tmp_path, _file_mode(path))
        with writing(path, tmp=tmp_path):
            yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0)  # the only way to read the umask is to set it: set it straight back
        os.umask(mask)
        return 0o666 & ~mask


def _old(final: Path) -> Path:
    return final.with_name(f".{final.name}.old.tmp")


def _new(final: Path) -> Path:
    return final.with_name(f".{final.name}.new.tmp")


def leftovers(final: str | os.PathLike[str]) -> list[Path]:
    """The temp folders an unfinished `atomic_folder` write of `final` left beside it."""
    final = Path(final)
    return [p for p in (_new(final), _old(final)) if p.exists()]


def swap_folder(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` to `final`; an existing `final` is renamed aside first
    (`.<name>.old.tmp`, removed after). A kill between the two renames leaves no `final`, its old copy
    and the finished `tmp`: `recover_folder` (or `atomic_folder` when `tmp` is its `.new.tmp`) ends it."""
    old = _old(final)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(final: str | os.PathLike[str]) -> None:
    """Finish or undo an `atomic_folder` write of `final` that a kill cut short. The old folder is renamed
    aside only once the new one is complete, so with no `final`, a new one beside an old one is complete
    (it goes in) and an old one alone comes back; a new one beside `final`, or alone, may be half-written
    (it goes). Call it where no live writer can be mid-swap (holding the folder's lock)."""
    final = Path(final)
    new, old = _new(final), _old(final)
    if not final.exists():
        if new.is_dir() and old.is_dir():
            os.replace(new, final)
        elif old.is_dir():
            os.replace(old, final)
    for path in (new, old):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temp folder beside `final` (`.<name>.new.tmp`); once the block ends, it replaces
    `final` whole. On any failure or interrupt `final` stays as it was (or, cut between the swap's
    renames, becomes the new folder): never a mix of old and new files. A write error names the file
    under `final`, not its temp copy."""
    final = Path(final)
    new = _new(final)
    recover_folder(final)
    try:
        with writing(final, tmp=new):
            new.mkdir(parents=True)
            yield new
        swap_folder(new, final)
    except BaseException:
        recover_folder(final)
        raise


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


_OS_ERROR = re.compile(r"os error (\d+)|Os \{ code: (\d+)")  # in SafetensorError's text (0.4: Os { code: 28, ...)


def _errno(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the OS error a safetensors writer wraps."""
    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError":
        match = _OS_ERROR.search(str(exc))
        return int(match.group(1) or match.group(2)) if match else None
    return None


def write_error(exc: BaseException, path: str | os.PathLike[str], tmp: Path | None = None) -> OSError | None:
    """`exc` as an OSError naming the file, when it is a write failure a user can fix (WRITE_ERRNOS; a
    SafetensorError too), else None. The file is `exc`'s own (one under `tmp`, a temp copy of `path`, is
    named under `path`), else `path`."""
    code = _errno(exc)
    if code not in WRITE_ERRNOS:
        return None
    where: str | os.PathLike[str] = path
    name = getattr(exc, "filename", None)
    if name is not None:
        inside = Path(os.fsdecode(name))
        if tmp is not None and (inside == tmp or tmp in inside.parents):
            where = Path(path) / inside.relative_to(tmp)
        elif isinstance(exc, OSError):
            return exc
        else:
            where = name
    return OSError(code, os.strerror(code), os.fspath(where))


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], tmp: Path | None = None) -> Iterator[None]:
    """Re-raise a write failure of the block (see `write_error`) as an OSError naming `path` (or the file
    it names), so the CLI's one line says where the disk is full."""
    try:
        yield
    except Exception as exc:
        error = write_error(exc, path, tmp)
        if error is None or error is exc:
            raise
        raise error from exc


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
