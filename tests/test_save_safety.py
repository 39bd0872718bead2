"""Nothing half-written, nothing lost: lora/ and best/ are one set (a LoRA and its token embedding from
one step, only the current run name's kohya file), a full disk in any writer is one line naming the file,
and a signal during the final save saves it whole and still exits 128 + N. Real CLI paths on tiny-sd."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest
from safetensors import SafetensorError, safe_open
from typer.testing import CliRunner

from sdlora.cli import app
from test_dataset_safety import one_line_error
from test_resume_safety import train_args

runner = CliRunner()
NO_SPACE = os.strerror(errno.ENOSPC)
FULL_DISK = SafetensorError(  # what safetensors.torch.save_file raises when the disk fills
    f'Error while serializing: I/O error: {NO_SPACE} (os error {errno.ENOSPC}) at path "/x/.tmpA1b2C3"'
)


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def steps_in(folder: Path) -> dict[str, str]:
    """Each file of an exported folder -> the step in its metadata."""
    out = {}
    for path in sorted(folder.iterdir()):
        with safe_open(str(path), "pt") as f:
            out[path.name] = (f.metadata() or {}).get("sdlora.steps")
    return out


def no_temp_folders(run: Path) -> None:
    left = [p.name for p in [*run.iterdir(), *(run / "checkpoints").glob(".*")] if p.name.endswith(".tmp")]
    assert left == [], left


def train(*args: str):
    return runner.invoke(app, [*map(str, args)])


# ----------------------------------------------------------------------------- lora/ is one set


@pytest.mark.slow  # three trainings: ~25-45 s
def test_an_export_cut_by_a_second_signal_leaves_lora_whole_and_a_renamed_run_keeps_only_its_files(
    tmp_path: Path, tiny_dataset: Path, monkeypatch
):
    from sdlora.train import embeddings

    runs = tmp_path / "runs"
    args = train_args(tiny_dataset, runs, "--max-steps", "2", "--checkpoint-every", "2")
    result = train(*args, "--embedding-steps-fraction", "1")
    assert result.exit_code == 0, result.output
    run = runs / "renamed"
    (runs / "r").rename(run)  # the user renames the run folder, then resumes it
    assert steps_in(run / "lora") == {
        "embeddings.safetensors": "2",
        "pytorch_lora_weights.safetensors": "2",
        "r.safetensors": "2",
    }

    real_save = embeddings.save_embeddings

    def two_sigterms(path, *args, **kwargs):  # lora/'s LoRA files are written; its embedding's write is cut
        if "lora" not in Path(path).parent.name:  # best/ (at the last validation) is saved as usual
            return real_save(path, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the first: stop after the step, save
        os.kill(os.getpid(), signal.SIGTERM)  # the second (12 ms later in the issue): stop now (StopNow)
        raise AssertionError("the second signal stops the save")

    monkeypatch.setattr(embeddings, "save_embeddings", two_sigterms)
    result = train("train", "--resume", run, "--max-steps", "4")
    assert result.exit_code == 143, result.output
    assert "stopped without saving: the last checkpoint is step-000004" in result.stderr, result.stderr
    # lora/ is still the whole step-2 set: no step-4 LoRA beside the step-2 embedding
    assert steps_in(run / "lora") == {
        "embeddings.safetensors": "2",
        "pytorch_lora_weights.safetensors": "2",
        "r.safetensors": "2",
    }
    assert set(steps_in(run / "best").values()) == {"4"}  # written whole before the signals
    no_temp_folders(run)

    monkeypatch.setattr(embeddings, "save_embeddings", real_save)
    result = train("train", "--resume", run, "--max-steps", "4")  # exports lora/ from the step-4 checkpoint
    assert result.exit_code == 0, result.output
    # only the current files: the old run name's kohya file is gone with the old folder
    assert steps_in(run / "lora") == {
        "embeddings.safetensors": "4",
        "pytorch_lora_weights.safetensors": "4",
        "renamed.safetensors": "4",
    }
    no_temp_folders(run)


def with_step(path: Path, step: int) -> None:
    """Rewrite an exported file's `sdlora.steps`."""
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = {**(f.metadata() or {}), "sdlora.steps": str(step)}
    save_file(load_file(str(path)), str(path), metadata=metadata)


def test_sample_refuses_a_lora_and_an_embedding_of_different_steps(tmp_path: Path):
    """The pair an older sdlora's cut export left: one line, before any model loads."""
    from run_helpers import make_run, save_embedding

    run = make_run(tmp_path)
    save_embedding(run / "lora")
    with_step(run / "lora" / "pytorch_lora_weights.safetensors", 4)
    with_step(run / "lora" / "embeddings.safetensors", 2)
    args = ["sample", "sksToy on a beach", "--run", str(run), "-n", "1", "--steps", "1", "--no-baseline"]
    result = runner.invoke(app, args)
    one_line_error(result, f"{run / 'lora'}: pytorch_lora_weights.safetensors is from step 4", "from step 2")
    assert not (run / "samples").exists()
    with_step(run / "lora" / "embeddings.safetensors", 4)  # one export's pair samples
    assert runner.invoke(app, args).exit_code == 0


def test_sample_finishes_an_export_a_kill_cut_between_its_renames(tmp_path: Path):
    from run_helpers import make_run
    from sdlora.generate import resolve_lora_dir
    from sdlora.run import load_run

    run = make_run(tmp_path)
    (run / "lora").rename(run / ".lora.new.tmp")  # the complete new set, not yet renamed in ...
    (run / ".lora.old.tmp").mkdir()  # ... the old one renamed aside
    assert resolve_lora_dir(load_run(run), "lora") == run / "lora"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".lora")) == []


def test_the_next_train_finishes_an_export_a_kill_cut_between_its_renames(tmp_path: Path):
    from types import SimpleNamespace

    from sdlora.locks import release
    from sdlora.train.runtime import lock_run

    run = tmp_path / "runs" / "r"
    for name, step in ((".lora.new.tmp", "4"), (".lora.old.tmp", "2"), (".best.new.tmp", "4")):
        (run / name).mkdir(parents=True)
        (run / name / "pytorch_lora_weights.safetensors").write_text(step)
    (run / "best").mkdir()  # best/ whole; its unfinished new copy (a kill while writing it) goes
    lock = lock_run(run, SimpleNamespace(is_main_process=True, num_processes=1))
    release(lock)
    assert (run / "lora" / "pytorch_lora_weights.safetensors").read_text() == "4"
    assert sorted(p.name for p in run.iterdir()) == ["best", "lora"]


# ----------------------------------------------------------------------------- a signal during the final save


def test_one_signal_during_the_final_export_saves_it_whole_and_exits_143(
    tmp_path: Path, tiny_dataset: Path, monkeypatch
):
    from sdlora.train import export

    real_save = export.save_lora

    def signalled(out_dir, *args, **kwargs):
        if "lora" in Path(out_dir).name:  # lora/ (best/ was written at the last validation)
            os.kill(os.getpid(), signal.SIGTERM)  # lands while the final LoRA is being written
        return real_save(out_dir, *args, **kwargs)

    monkeypatch.setattr(export, "save_lora", signalled)
    runs = tmp_path / "runs"
    result = train(*train_args(tiny_dataset, runs, "--max-steps", "2", "--checkpoint-every", "0"))
    assert result.exit_code == 143, result.output
    assert "stopped by SIGTERM after the last step: all 2 steps trained; the LoRA was saved whole in" in result.stdout
    assert "done:" not in result.stdout
    assert set(steps_in(runs / "r" / "lora").values()) == {"2"}  # LoRA, kohya file, token embedding


# ----------------------------------------------------------------------------- a full disk is one line


def test_a_full_disk_writing_best_at_the_final_validation_is_one_line(tmp_path: Path, tiny_dataset: Path, monkeypatch):
    from sdlora.train import export

    def full_disk(tensors, path, metadata=None):
        raise FULL_DISK

    monkeypatch.setattr(export, "save_file", full_disk)
    runs = tmp_path / "runs"
    args = train_args(tiny_dataset, runs, "--max-steps", "2", "--checkpoint-every", "0")
    result = train(*args, "--validate-every", "2")
    path = runs.resolve() / "r" / "best" / "pytorch_lora_weights.safetensors"
    one_line_error(result, f"{path}: {NO_SPACE}; free some space, or write elsewhere (--runs-dir)")
    assert not (runs / "r" / "best").exists()
    no_temp_folders(runs / "r")


def test_a_full_disk_at_the_first_checkpoint_is_one_line_and_leaves_no_temp_folder(
    tmp_path: Path, tiny_dataset: Path, monkeypatch
):
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        if "checkpoints" in str(filename):
            raise FULL_DISK
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    runs = tmp_path / "runs"
    result = train(*train_args(tiny_dataset, runs, "--max-steps", "4", "--checkpoint-every", "2"))
    folder = runs.resolve() / "r" / "checkpoints" / "step-000002"
    one_line_error(result, f"{folder / 'rng_0.safetensors'}: {NO_SPACE}; free some space")
    assert list((runs / "r" / "checkpoints").iterdir()) == []  # no .step-000002.tmp left on the full disk


def test_a_full_disk_in_scores_embedding_cache_is_one_line(tmp_path: Path, monkeypatch):
    import safetensors.torch

    from score_helpers import add_samples, write_run

    run = write_run(tmp_path)
    add_samples(run / "samples", ["sksToy on a beach"], per_variant=1)

    def full_disk(tensors, filename, metadata=None):
        raise FULL_DISK

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(
        app, ["score", "--run", str(run), "--dino-model", "tiny-dino", "--clip-model", "tiny-clip", "--device", "cpu"]
    )
    one_line_error(result, f"{run}/", ".safetensors: No space left on device; free some space")
    assert not (run / "scores.json").exists()


def _nameless_full_disk(monkeypatch, part: str) -> None:
    """Writes of temp files under a folder named `part` fail as a full disk does: write() names no file."""
    real_write = Path.write_bytes

    def write_bytes(self, data):
        if part in self.parts and self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, NO_SPACE)
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_a_full_disk_in_prepare_names_the_file(tmp_path: Path, monkeypatch):
    from test_dataset_safety import photos, prepare

    src, out = photos(tmp_path / "photos", 3), tmp_path / "ds"
    _nameless_full_disk(monkeypatch, "images")
    result = prepare(src, out)
    one_line_error(result, f"{out / 'images'}/", f".png: {NO_SPACE}; free some space, or write elsewhere (--out)")


def test_a_full_disk_in_sample_names_the_file(tmp_path: Path, monkeypatch):
    from PIL import Image

    from run_helpers import make_run

    run = make_run(tmp_path)
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if str(fp).endswith(".tmp"):
            raise OSError(errno.ENOSPC, NO_SPACE)  # PIL's write names no file
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    result = runner.invoke(
        app, ["sample", "sksToy on a beach", "--run", str(run), "-n", "1", "--steps", "1", "--no-baseline"]
    )
    one_line_error(result, f"{run / 'samples'}/", f".png: {NO_SPACE}; free some space")


def test_a_full_disk_under_metrics_jsonl_names_it(tmp_path: Path):
    from sdlora.fsutil import write_problem
    from sdlora.train.monitor import MetricsWriter

    class FullDisk:
        closed = False

        def write(self, text=""):
            raise OSError(errno.ENOSPC, NO_SPACE)  # a buffered write names no file

        flush = write

        def fileno(self):
            return 0

        def close(self):
            self.closed = True

    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer._file.close()
    writer._file = FullDisk()
    for act in (lambda: writer.write({"step": 1}), writer.close):
        with pytest.raises(OSError) as exc:
            act()
        assert write_problem(exc.value).startswith(f"{tmp_path / 'metrics.jsonl'}: {NO_SPACE}; free some space")
    assert writer._file.closed
