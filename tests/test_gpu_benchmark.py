"""benchmarks/gpu.py --tiny: the one-call GPU benchmark runs on the CPU at tiny size, so it cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One row per tiny configuration: the UNet floors, sdlora train on SD (batch 4) and on SDXL (with
# gradient checkpointing), one sample and one score, FLUX.1's transformer floor and sdlora train (with
# gradient checkpointing; with its base in fp8 too where `sdlora train` has --base-precision); the compile
# row (last) runs in the slow test.
TINY_ROWS = [
    "unet-tiny-sd-64-b1-fp32",
    "unet-tiny-sd-64-b4-fp32",
    "sdlora-tiny-sd-64-b4-fp32",
    "sample-tiny-sd-64",
    "score-tiny-sd-64",
    "unet-tiny-sdxl-64-b1-fp32",
    "sdlora-tiny-sdxl-64-b1-fp32-gc",
    "transformer-tiny-flux-64-b1-fp32",
    "sdlora-tiny-flux-64-b1-fp32-gc",
]
FP8_ROW = "sdlora-tiny-flux-64-b1-fp8"
COMPILE_ROW = "sdlora-tiny-sd-64-b4-fp32-compile"


def train_has_base_precision() -> bool:
    """Whether this sdlora's `train` takes --base-precision (the fp8 base, newer than the benchmark's rows)."""
    from typer.testing import CliRunner

    from sdlora.cli import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return "--base-precision" in result.output


def run_tiny(tmp_path: Path, *options: str) -> tuple[dict, str]:
    """Run the benchmark script as a user would; its JSON table and its Markdown table."""
    out = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--tiny", "--no-diffusers", *options]
        + ["--out", str(out), "--work", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        timeout=540,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    table = json.loads((out / "gpu-bench.json").read_text(encoding="utf-8"))
    return table, (out / "gpu-bench.md").read_text(encoding="utf-8")


def test_tiny_benchmark_writes_one_row_per_configuration(tmp_path: Path):
    table, markdown = run_tiny(tmp_path, "--skip", COMPILE_ROW)
    rows = {row["id"]: row for row in table["rows"]}
    expected = TINY_ROWS + [FP8_ROW] * train_has_base_precision()
    assert list(rows) == expected
    # fp8 on a CPU may be refused, in one line naming the option; it must not crash.
    fp8_error = rows.pop(FP8_ROW, {}).get("error")
    assert not fp8_error or ("\n" not in fp8_error and "base-precision" in fp8_error), fp8_error
    # On the CPU at tiny size nothing else may fail: an error here means the script has rotted.
    assert not [(sid, row["error"]) for sid, row in rows.items() if row["error"]]
    for row in rows.values():
        timed = row["id"].split("-")[0] in ("unet", "transformer", "sdlora")
        number = row["s_per_step"] if timed else row["images_per_s"]
        assert isinstance(number, float) and math.isfinite(number), row
    # The floors count the denoiser's FLOPs, and each training row carries its floor's count.
    flops = {sid: row["denoiser_tflop_per_step"] for sid, row in rows.items()}
    assert flops["unet-tiny-sd-64-b4-fp32"] > flops["unet-tiny-sd-64-b1-fp32"]
    for sid in ("sdlora-tiny-sd-64-b4-fp32", "sdlora-tiny-sdxl-64-b1-fp32-gc", "sdlora-tiny-flux-64-b1-fp32-gc"):
        assert flops[sid] > 0, sid
    assert flops["sdlora-tiny-flux-64-b1-fp32-gc"] == flops["transformer-tiny-flux-64-b1-fp32"]
    # FLUX.1 trains in one process: its s/step is the in-loop median, its start-up the rest of the process.
    flux = rows["sdlora-tiny-flux-64-b1-fp32-gc"]
    assert flux["s_per_step"] == flux["in_loop_s_per_step"] and flux["startup_s"] > 0, flux
    assert table["device"].startswith("CPU")

    table_lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table_lines) == 1 + len(expected)  # the header, then one line per row
    for sid in expected:
        assert any(line.startswith(f"| {sid} |") for line in table_lines), sid


@pytest.mark.slow  # a second benchmark process, with an inductor compile (~60 s on 2 cores)
def test_a_failing_row_shows_one_line_the_others_still_run_and_compile_runs(tmp_path: Path):
    """Without a training row before them there is nothing to sample or score: both rows say so; the
    floor still runs, and so does the compile row (last)."""
    table, markdown = run_tiny(tmp_path, "--only", f"sample-*,unet-tiny-sd-64-b1-*,score-*,{COMPILE_ROW}")
    rows = {row["id"]: row for row in table["rows"]}
    assert list(rows) == ["unet-tiny-sd-64-b1-fp32", "sample-tiny-sd-64", "score-tiny-sd-64", COMPILE_ROW]
    assert rows["unet-tiny-sd-64-b1-fp32"]["error"] is None and rows["unet-tiny-sd-64-b1-fp32"]["s_per_step"] > 0
    for sid in ("sample-tiny-sd-64", "score-tiny-sd-64"):
        error = rows[sid]["error"]
        assert error and "\n" not in error and ("no SD 1.5 run" in error or "no samples" in error), error
        assert f"error: {error}" in markdown
    compiled = rows[COMPILE_ROW]
    assert compiled["error"] is None and compiled["compile"] == "on", compiled
    assert isinstance(compiled["s_per_step"], float) and math.isfinite(compiled["s_per_step"])
    assert any(line.startswith(f"| {COMPILE_ROW} |") and "| on |" in line for line in markdown.splitlines())
