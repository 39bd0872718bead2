"""A dataset folder survives what users' machines do to it: a full disk, a read-only --out, a
kill between two writes, leftover temp files, a second `prepare`/`caption` at the same time.
Each failure is one line, and the same command then finishes the job."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sdlora.cli import app
from sdlora.data import ingest
from sdlora.data.captions import check_captions
from sdlora.data.manifest import Manifest, load_manifest
from sdlora.errors import DataError
from sdlora.locks import LOCK_FILE
from test_locks import hold

runner = CliRunner()
INCOMPLETE = ".sdlora-incomplete"  # the marker of a dataset prepare began and has not finished


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def photos(folder: Path, n: int, first_seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first_seed, first_seed + n):
        blocks = np.random.default_rng(i).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((90, 90), Image.Resampling.NEAREST).save(folder / f"IMG_{i:04d}.png")
    return folder


def prepare(src: Path, out: Path, *extra: str):
    return runner.invoke(app, ["prepare", str(src), "--out", str(out), "--resolution", "64", "--workers", "1", *extra])


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_full_disk_mid_prepare_is_one_line_and_the_same_command_finishes(tmp_path, monkeypatch):
    src, out = photos(tmp_path / "photos", 4), tmp_path / "ds"
    real_write = ingest.write_bytes
    calls = []

    def full_disk(path, data):
        calls.append(path)
        if len(calls) == 2:  # the second image: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(ingest, "write_bytes", full_disk)
    line = one_line_error(prepare(src, out), "No space left on device", str(calls[1]), "free some space")
    assert "--out" in line
    assert (out / INCOMPLETE).is_file()  # sdlora knows it began this folder
    with pytest.raises(DataError, match="has not finished"):
        load_manifest(out)  # readers refuse a half-written dataset

    monkeypatch.setattr(ingest, "write_bytes", real_write)
    result = prepare(src, out)  # the same command, no --force
    assert result.exit_code == 0, result.output
    assert "finished" in result.stdout
    assert not (out / INCOMPLETE).exists() and not (out / LOCK_FILE).exists()
    assert len(load_manifest(out).images) == 4 and check_captions(out).ok


def test_kill_before_the_first_write_leaves_nothing_and_rerun_works(tmp_path, monkeypatch):
    src, out = photos(tmp_path / "photos", 3), tmp_path / "ds"

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest, "split_train_val", ctrl_c)  # after decoding, before writing
    with pytest.raises(KeyboardInterrupt):
        ingest.prepare_dataset(str(src), out, resolution=64, workers=1)
    assert not out.exists()  # the folder it created is gone again, lock and all
    monkeypatch.undo()
    ingest.prepare_dataset(str(src), out, resolution=64, workers=1)
    assert len(load_manifest(out).images) == 3


def test_unwritable_out_fails_before_decoding(tmp_path, monkeypatch):
    src, out = photos(tmp_path / "photos", 2), tmp_path / "ro"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(out)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    listed = []
    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(ingest, "list_source", lambda *a, **k: listed.append(1) or ([], []))
    one_line_error(prepare(src, out), f"{out}: Read-only file system", "write to a writable place (--out)")
    assert not listed  # refused before reading a single photo


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_as_out(tmp_path):
    src, out = photos(tmp_path / "photos", 2), tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        one_line_error(prepare(src, out), str(out), "Permission denied")
    finally:
        out.chmod(0o755)


def test_kill_between_captions_and_manifest_is_never_read_as_a_mix(tmp_path, monkeypatch):
    src, out = photos(tmp_path / "photos", 3), tmp_path / "ds"
    ingest.prepare_dataset(str(src), out, resolution=64, workers=1)
    photos(src, 2, first_seed=10)  # the user adds photos and prepares again

    def killed(self, dataset_dir):
        raise KeyboardInterrupt  # captions.txt is written, manifest.json not yet

    monkeypatch.setattr(Manifest, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest.prepare_dataset(str(src), out, resolution=64, workers=1)
    monkeypatch.undo()
    assert len((out / "captions.txt").read_text().splitlines()) == 1 + 5  # new captions, old manifest
    with pytest.raises(DataError, match=rf"run the same `sdlora prepare {src} --out {out}` \(with its options\) again"):
        load_manifest(out)
    result = runner.invoke(app, ["caption", str(out), "--check", "--model", "tiny-sd"])
    one_line_error(result, "has not finished")
    ingest.prepare_dataset(str(src), out, resolution=64, workers=1)  # the same command finishes it
    assert len(load_manifest(out).images) == 5 and check_captions(out).ok


def test_stale_temp_files_are_removed_by_the_next_prepare_and_caption(tmp_path):
    src, out = photos(tmp_path / "photos", 2), tmp_path / "ds"
    ingest.prepare_dataset(str(src), out, resolution=64, workers=1)
    stale = [out / ".manifest.json.k1ll3d.tmp", out / "images" / ".0123456789abcdef.png.x9y8.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    ingest.prepare_dataset(str(src), out, resolution=64, workers=1)
    assert not any(p.exists() for p in stale)
    stale[0].write_bytes(b"half")
    assert runner.invoke(app, ["caption", str(out)]).exit_code == 0
    assert not stale[0].exists()


@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def hold_lock(folder: Path, pid: int, verb: str) -> None:
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "verb": verb}))


def test_second_prepare_or_caption_on_a_dataset_in_use_fails_naming_the_pid(tmp_path, other_process):
    src, out = photos(tmp_path / "photos", 2), tmp_path / "ds"
    ingest.prepare_dataset(str(src), out, resolution=64, workers=1)
    before = (out / "captions.txt").read_text()
    hold_lock(out, other_process, "prepare")
    one_line_error(prepare(src, out), f"pid {other_process}", "sdlora prepare")
    one_line_error(runner.invoke(app, ["caption", str(out), "--overwrite"]), f"pid {other_process}")
    assert (out / "captions.txt").read_text() == before
    (out / LOCK_FILE).unlink()
    assert prepare(src, out).exit_code == 0
    assert not (out / LOCK_FILE).exists()


def test_prepare_refuses_a_dataset_that_train_reads_naming_it_and_the_pid(tmp_path):
    src, out = photos(tmp_path / "photos", 3), tmp_path / "ds"
    ingest.prepare_dataset(str(src), out, resolution=64, workers=1)
    before = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    reader = hold(out, "train", shared=True)
    try:
        result = runner.invoke(app, ["prepare", str(src), "--out", str(out), "--resolution", "32", "--workers", "2"])
        one_line_error(result, str(out), f"`sdlora train` (pid {reader.pid})", "reads it")
        after = {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        assert {k: v for k, v in after.items() if not k.startswith(LOCK_FILE)} == before  # nothing replaced
    finally:
        reader.kill()
        reader.wait()
    assert prepare(src, out, "--resolution", "32").exit_code == 0  # the reader is gone: its record is stale
    assert load_manifest(out).resolution == 32 and not any(p.name.startswith(LOCK_FILE) for p in out.iterdir())


def test_train_refuses_a_dataset_that_prepare_writes_before_loading_a_model(tmp_path):
    src, out = photos(tmp_path / "photos", 3), tmp_path / "ds"
    ingest.prepare_dataset(str(src), out, resolution=64, workers=1)
    writer = hold(out, "prepare", shared=False)
    try:
        runs = tmp_path / "runs"
        args = ["train", "--model", "tiny-sd", "--dataset", str(out), "--runs-dir", str(runs), "--max-steps", "1"]
        one_line_error(runner.invoke(app, args), str(out), f"`sdlora prepare` (pid {writer.pid})")
        assert not runs.exists()
        result = runner.invoke(app, ["caption", str(out), "--check", "--model", "tiny-sd"])
        one_line_error(result, f"`sdlora prepare` (pid {writer.pid})")
    finally:
        writer.kill()
        writer.wait()
    assert [p.name for p in out.iterdir() if p.name.startswith(LOCK_FILE)] == [LOCK_FILE]  # only the dead writer's
