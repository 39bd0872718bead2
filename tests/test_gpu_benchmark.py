"""benchmarks/gpu.py --tiny: the one-call GPU benchmark runs on the CPU at tiny size, so it cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
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


@pytest.mark.slow  # 30-35 s since its FLUX.1 rows; the plan and budget tests stay in the default suite
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


# ----------------------------------------------------------------------------- the plan and its budget (no run)
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu  # noqa: E402  (benchmarks/ is a folder of scripts)


def gpu_bench(tmp_path: Path, budget_s: float, fp8: bool = True) -> "gpu.Bench":
    args = gpu.parse_args(["--work", str(tmp_path), "--budget-s", str(budget_s), "--peak-tflops", "989"])
    plan = gpu.specs(False, set(gpu.DIFFUSERS_SCRIPTS), fp8=True)
    return gpu.Bench(args, "cuda", gpu.Runner(in_process=False, deadline=time.monotonic() + budget_s), plan, fp8)


def test_the_gpu_plan_has_each_flux_configuration_beside_diffusers_and_fits_its_call():
    plan = {spec.id: spec for spec in gpu.specs(False, set(gpu.DIFFUSERS_SCRIPTS), fp8=True)}
    for res in (512, 1024):
        for tail in ("bf16", "bf16-gc", "fp8-gc"):
            assert f"sdlora-flux1-{res}-b1-{tail}" in plan
        assert f"transformer-flux1-{res}-b1-bf16" in plan
    assert {"diffusers-flux1-1024-b1-bf16-gc", "diffusers-flux1-512-b1-bf16"} <= set(plan)
    # FLUX.1's headline rows come first, and by the estimates the default call ends inside 8 minutes.
    ids = list(plan)
    assert ids[:5] == [
        "transformer-flux1-1024-b1-bf16",
        "transformer-flux1-512-b1-bf16",
        "sdlora-flux1-1024-b1-bf16-gc",
        "diffusers-flux1-1024-b1-bf16-gc",
        "sdlora-flux1-1024-b1-fp8-gc",
    ]
    total, built, ran = gpu.INSTALL_S, set(), []
    for spec in plan.values():
        cost = spec.est_s + (gpu.MODELS[spec.model].build_s if spec.model not in built else 0)
        if total + cost <= 420 + gpu.GRACE_S:  # what Bench.cannot_start lets start under the default budget
            total += cost
            built.add(spec.model)
            ran.append(spec.id)
    assert total <= 480 and {"sdlora-sd15-512-b4-bf16", "diffusers-sd15-512-b4-bf16"} <= set(ran), ran


def test_a_row_starts_only_if_its_estimate_fits_the_budget_and_fp8_only_with_the_option(tmp_path: Path):
    bench = gpu_bench(tmp_path, budget_s=100, fp8=False)
    specs = {spec.id: spec for spec in bench.pending}
    # FLUX.1's first row pays its model's build: 60 + 20 s fits 100 + 60 s; SDXL's gc row (80 s) would not.
    assert bench.estimate(specs["transformer-flux1-1024-b1-bf16"]) == 80
    assert bench.cannot_start(specs["transformer-flux1-1024-b1-bf16"]) is None
    bench.runner.deadline = time.monotonic() - 1.0  # the budget is spent
    assert "spent" in bench.cannot_start(specs["unet-sd15-512-b1-bf16"])
    bench.runner.deadline = time.monotonic() + 10  # 70 s left with the grace: a 75 s row is skipped
    assert "estimated" in bench.cannot_start(specs["sdlora-sdxl-1024-b1-bf16"])
    assert "--base-precision" in bench.cannot_start(specs["sdlora-flux1-1024-b1-fp8-gc"])


def test_room_is_made_by_removing_models_no_later_row_wants(tmp_path: Path, monkeypatch):
    bench = gpu_bench(tmp_path, budget_s=420)
    for key in ("sd15", "sdxl"):
        (tmp_path / key).mkdir()
        bench.models[key] = str(tmp_path / key)
    bench.pending = [s for s in bench.pending if s.model != "sdxl"]  # SD 1.5 is still wanted, SDXL is not
    free = {"gb": 25.0}
    monkeypatch.setattr(gpu.shutil, "disk_usage", lambda path: type("Usage", (), {"free": free["gb"] * 1e9})())
    real_rmtree = gpu.shutil.rmtree

    def rmtree(path, ignore_errors=False):
        free["gb"] += 14.0
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(gpu.shutil, "rmtree", rmtree)
    bench.make_room("flux1")  # 33.7 + 2 GB: SDXL's 14 go, SD 1.5 stays
    assert not (tmp_path / "sdxl").exists() and (tmp_path / "sd15").exists() and set(bench.models) == {"sd15"}
    free["gb"] = 1.0
    with pytest.raises(gpu.RowError, match="GB free"):  # still short: fail at once, before writing 30 GB
        bench.make_room("flux1")


def test_the_examples_in_loop_steps_come_from_the_wrapper_clock():
    output = "Steps: 10/10\nBENCH_CUDA_PEAK_GB=41.200\nBENCH_STEP_ENDS=10.0,10.5,11.25,11.75\n"
    assert gpu.step_times(output) == [0.5, 0.75, 0.5]
    assert gpu.step_times("crashed before any step") == []
