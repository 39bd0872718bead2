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
