"""Atomic writes: a failure never leaves half a file or destroys the old one."""

from __future__ import annotations

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
