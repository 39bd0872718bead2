"""Atomic writes: a failure never leaves half a file or destroys the old one."""

from __future__ import annotations

import os

import pytest

from sdlora.fsutil import atomic_path, sha256_file, write_json, write_text


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "captions.txt"
    write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["captions.txt"]


def test_write_json_and_checksum(tmp_path):
    write_json(tmp_path / "a" / "m.json", {"x": "ü"})
    assert (tmp_path / "a" / "m.json").read_text(encoding="utf-8") == '{\n  "x": "ü"\n}\n'
    assert len(sha256_file(tmp_path / "a" / "m.json")) == 64


def test_remove_stale_tmp_takes_only_temp_files_of_killed_writes(tmp_path):
    from sdlora.fsutil import remove_stale_tmp

    (tmp_path / "images").mkdir()
    stale = [tmp_path / ".manifest.json.ab12cd.tmp", tmp_path / "images" / ".0123.png.x_y.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "captions.txt"]
    for path in stale + kept:
        path.write_text("x")
    assert remove_stale_tmp(tmp_path) == 2
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_check_writable_names_the_folder(tmp_path, monkeypatch):
    import errno
    import os

    from sdlora.fsutil import check_writable, write_problem

    check_writable(tmp_path / "new")  # created, and nothing left in it
    assert list((tmp_path / "new").iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as exc:
        check_writable(tmp_path / "file" / "sub")
    assert write_problem(exc.value).startswith(f"{tmp_path / 'file' / 'sub'}: ")
    monkeypatch.setattr(os, "open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "x", "t")))
    with pytest.raises(OSError) as exc:
        check_writable(tmp_path / "new")
    assert (
        write_problem(exc.value) == f"{tmp_path / 'new'}: No space left on device; free some space, or write elsewhere"
    )


# ----------------------------------------------------------------------------- folders written as one set


def _files(folder):
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_atomic_folder_replaces_the_whole_set_or_nothing(tmp_path):
    from sdlora.fsutil import atomic_folder

    final = tmp_path / "lora"
    with atomic_folder(final) as tmp:
        (tmp / "a.safetensors").write_text("1")
        (tmp / "old-name.safetensors").write_text("1")
    assert _files(final) == {"a.safetensors": "1", "old-name.safetensors": "1"}

    for interrupt in (RuntimeError("disk full"), KeyboardInterrupt()):  # a failure, a second Ctrl-C
        with pytest.raises(type(interrupt)):
            with atomic_folder(final) as tmp:
                (tmp / "a.safetensors").write_text("2")
                raise interrupt
        assert _files(final) == {"a.safetensors": "1", "old-name.safetensors": "1"}  # untouched
        assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no temp folder left

    with atomic_folder(final) as tmp:
        (tmp / "a.safetensors").write_text("3")
        (tmp / "new-name.safetensors").write_text("3")
    assert _files(final) == {"a.safetensors": "3", "new-name.safetensors": "3"}  # only the current files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_an_interrupt_between_the_swaps_renames_ends_with_the_new_set(tmp_path, monkeypatch):
    import os

    from sdlora import fsutil

    final = tmp_path / "lora"
    fsutil.write_text(final / "a", "old")
    real_replace, calls = os.replace, []

    def replace_then_stop(src, dst):
        calls.append(dst)
        real_replace(src, dst)
        if len(calls) == 1:  # lora/ renamed aside, the new folder not yet in: a Ctrl-C lands here
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_stop)
    with pytest.raises(KeyboardInterrupt):
        with fsutil.atomic_folder(final) as tmp:
            (tmp / "a").write_text("new")
    assert _files(final) == {"a": "new"} and sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


@pytest.mark.parametrize(
    "left, expected",
    [
        ({"new": "n", "old": "o"}, "n"),  # killed between the renames: the new set was complete
        ({"old": "o"}, "o"),  # only the old set: it comes back
        ({"lora": "l", "new": "n"}, "l"),  # killed while writing the new set: it goes
        ({"lora": "l", "old": "o"}, "l"),  # killed before removing the old set
        ({"new": "n"}, None),  # the first export, killed while writing: maybe half, so it goes
    ],
)
def test_recover_folder_finishes_or_undoes_a_killed_swap(tmp_path, left, expected):
    from sdlora.fsutil import leftovers, recover_folder

    names = {"lora": "lora", "new": ".lora.new.tmp", "old": ".lora.old.tmp"}
    for key, text in left.items():
        (tmp_path / names[key]).mkdir()
        (tmp_path / names[key] / "a").write_text(text)
    assert len(leftovers(tmp_path / "lora")) == len(left) - ("lora" in left)
    recover_folder(tmp_path / "lora")
    assert leftovers(tmp_path / "lora") == []
    if expected is None:
        assert not (tmp_path / "lora").exists()
    else:
        assert _files(tmp_path / "lora") == {"a": expected}


# ----------------------------------------------------------------------------- a full disk names the file


def _no_space(kind):
    import errno
    import os

    from safetensors import SafetensorError

    if kind == "safetensors":  # what safetensors.torch.save_file raises on a full disk
        return SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # write() names no file


@pytest.mark.parametrize("kind", ["safetensors", "os"])
def test_a_full_disk_in_any_write_names_the_file(tmp_path, kind):
    from sdlora.fsutil import atomic_folder, write_problem, writing

    where = tmp_path / "best" / "pytorch_lora_weights.safetensors"
    with pytest.raises(OSError) as exc:
        with atomic_path(where):
            raise _no_space(kind)
    assert write_problem(exc.value) == f"{where}: No space left on device; free some space, or write elsewhere"
    with pytest.raises(OSError) as exc:
        with atomic_folder(tmp_path / "best") as tmp:  # named under best/, not its temp folder
            with atomic_path(tmp / "pytorch_lora_weights.safetensors"):
                raise _no_space(kind)
    assert exc.value.filename == str(where)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and not any((tmp_path / "best").iterdir())
    with pytest.raises(OSError) as exc:
        with writing(tmp_path / "x.json"):
            raise _no_space(kind)
    assert exc.value.filename == str(tmp_path / "x.json")


def test_other_errors_pass_through_writing_unchanged(tmp_path):
    import errno

    from safetensors import SafetensorError

    from sdlora.fsutil import writing

    for exc in (
        SafetensorError("Error while serializing: I/O error: No such file or directory (os error 2)"),
        SafetensorError("header too large"),
        OSError(errno.ENOSPC, "No space left on device", "/the/file"),  # names its file already
        ValueError("x"),
    ):
        with pytest.raises(type(exc)) as raised:
            with writing(tmp_path / "y"):
                raise exc
        assert raised.value is exc


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_atomic_path_gives_the_mode_a_plain_write_would(tmp_path):
    """mkstemp's private 0600 must not leak into samples, reports and configs others read."""
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "new.png") as tmp:
            tmp.write_bytes(b"x")
        assert (tmp_path / "new.png").stat().st_mode & 0o777 == 0o644
        (tmp_path / "kept.txt").write_text("x")
        os.chmod(tmp_path / "kept.txt", 0o640)
        with atomic_path(tmp_path / "kept.txt") as tmp:
            tmp.write_text("y")
        assert (tmp_path / "kept.txt").stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode
    finally:
        os.umask(old)
