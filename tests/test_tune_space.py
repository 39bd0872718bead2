"""`sdlora tune` without training: the space, the objective and its CLIP-T floor, bad input in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import one_line_error, write_tiny_dataset
from sdlora.cli import app
from sdlora.errors import ConfigError
from sdlora.tune import objective as obj
from sdlora.tune import space as sp

TINY = ["--model", "tiny-sd", "--dino-model", "tiny-dino", "--clip-model", "tiny-clip"]


def test_grid_keys_values_and_default_space():
    grid = sp.parse_grid_options(["lr=1e-4,2e-4", "rank=8,16"])
    assert grid == {"train.learning_rate": [1e-4, 2e-4], "lora.rank": [8, 16]}
    space = sp.build_space(grid, sp.parse_steps("2,1,2"))
    assert space.steps == [1, 2] and len(space.points()) == 4
    default = sp.build_space({}, None)
    assert default.grid == sp.DEFAULT_GRID and default.steps == [250, 500, 1000, 1500]
    assert len(default.points()) == 6
    # an explicit --max-steps cuts the default steps there
    assert sp.build_space({}, None, max_steps=800).steps == [250, 500, 800]


def test_random_points_are_reproducible_and_inside_the_range():
    grid = sp.parse_grid_options(["lr=log:2e-5..5e-4", "rank=8,16"])
    space = sp.build_space(grid, [10], random_points=5)
    points = space.points()
    assert points == space.points() and len(points) == 5
    assert all(2e-5 <= p["train.learning_rate"] <= 5e-4 and p["lora.rank"] in (8, 16) for p in points)


def test_yaml_section():
    section = sp.parse_section({"grid": {"lora.rank": [4, 8], "lr": [1e-4]}, "steps": [5, 10]}, "x.yaml")
    assert section["grid"] == {"lora.rank": [4, 8], "train.learning_rate": [1e-4]} and section["steps"] == [5, 10]
    with pytest.raises(ConfigError, match="unknown key tune.stepz"):
        sp.parse_section({"stepz": [1]}, "x.yaml")


def _point(step, dino, clip_t, clip_i=0.5):
    return {"step": step, "dino": dino, "clip_i": clip_i, "clip_t": clip_t}


def test_clip_t_floor_excludes_a_copying_lora():
    base = {"clip_t": 0.30}
    trials = [
        {"name": "a", "settings": {}, "points": [_point(1, 0.70, 0.29), _point(2, 0.90, 0.20)]},  # copies at step 2
        {"name": "b", "settings": {}, "points": [_point(1, 0.75, 0.285)]},
    ]
    winner = obj.choose(trials, obj.Objective("dino"), base)
    assert (winner["trial"], winner["step"], winner["eligible"]) == ("b", 1, True)
    # without the floor the copying point would have won
    assert obj.choose(trials, obj.Objective("dino"), None)["step"] == 2
    assert obj.choose(trials, obj.Objective("clip-t"), base)["trial"] == "a"
    weighted = obj.Objective("weighted", obj.parse_weights("dino=1,clip-t=2"))
    assert weighted.value(_point(1, 0.5, 0.25)) == pytest.approx(1.0)
    rows = obj.rank_points(trials, obj.Objective("dino"), base)
    assert [r["eligible"] for r in rows] == [True, True, False]


def test_no_point_above_the_floor_still_names_the_best_and_says_so():
    trials = [{"name": "a", "settings": {}, "points": [_point(1, 0.7, 0.1), _point(2, 0.8, 0.1)]}]
    winner = obj.choose(trials, obj.Objective("dino"), {"clip_t": 0.3})
    assert winner["step"] == 2 and winner["eligible"] is False


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tune_inputs")
    good = write_tiny_dataset(root / "dataset")
    novals = write_tiny_dataset(root / "novals")
    import json

    manifest = json.loads((novals / "manifest.json").read_text())
    manifest["train"] += manifest["val"]
    manifest["val"] = []
    (novals / "manifest.json").write_text(json.dumps(manifest))
    return good, novals


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--grid", "rnk=8,16"], ["--grid: unknown key 'rnk'", "rank"]),
        (["--grid", "rank="], ["--grid lora.rank: empty value list"]),
        (["--grid", "max-steps=1,2"], ["train.max_steps cannot vary"]),
        (["--steps", "1,5", "--max-steps", "3"], ["scored step 5 is above --max-steps 3"]),
        (["--grid", "lr=log:1e-5..1e-4"], ["a range needs --random N"]),
        (["--objective", "lpips"], ["--objective 'lpips'"]),
        (["--grid", "rank=0,4"], ["trial-00 (lora.rank=0)", "--rank must be at least 1"]),
        (["--early-stop"], ["--early-stop needs --executor ray"]),
    ],
)
def test_bad_input_fails_in_one_line_before_training(tmp_path, datasets, args, fragments, monkeypatch):
    from sdlora.train import loop

    monkeypatch.setattr(loop, "run_training", lambda *a, **k: pytest.fail("trained"))
    good, _ = datasets
    result = CliRunner().invoke(app, ["tune", *TINY, "--dataset", str(good), "--runs-dir", str(tmp_path), *args])
    one_line_error(result, *fragments)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("tune:\n  grid:\n    lora.rank: [[2, 4], 8]\n", "tune.grid lora.rank: the value [2, 4] is a list"),
        ("grid:\n  rank: [{a: 1}]\n", "tune.grid lora.rank: the value {'a': 1} is a mapping"),
        ("grid:\n  rank: {a: 1}\n", "tune.grid lora.rank: the value {'a': 1} is a mapping"),
        ("", "no search space in it"),
        ("# nothing yet\n", "no search space in it"),
        ("tune:\n", "no search space in it"),
        ("tune:\n  grid: {}\n", "tune.grid is empty"),
        ("tune:\n  grid:\n  steps: [2]\n", "tune.grid is empty"),
        ("grid:\n  rank: [4]\nrandom: [2]\n", "tune.random must be a whole number >= 0, got '[2]'"),
        ("grid:\n  rank: [4]\nseed: {a: 1}\n", "tune.seed must be a whole number >= 0"),
        ("grid:\n  rank: [4]\nobjective: [dino]\n", "tune.objective must be one name"),
    ],
)
def test_a_space_file_that_nests_or_is_empty_fails_in_one_line(tmp_path, datasets, monkeypatch, text, fragment):
    from sdlora.train import loop

    monkeypatch.setattr(loop, "run_training", lambda *a, **k: pytest.fail("trained"))
    good, _ = datasets
    space = tmp_path / "space.yaml"
    space.write_text(text)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(
        app, ["tune", *TINY, "--dataset", str(good), "--runs-dir", str(runs), "--space", str(space)]
    )
    one_line_error(result, f"--space {space}: {fragment}")
    assert not runs.exists()


def test_dataset_without_val_photos_fails_before_training(tmp_path, datasets):
    _, novals = datasets
    result = CliRunner().invoke(app, ["tune", *TINY, "--dataset", str(novals), "--runs-dir", str(tmp_path)])
    one_line_error(result, "no val images to compare against")


def test_ray_executor_without_ray_names_the_extra(tmp_path, datasets, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    good, _ = datasets
    result = CliRunner().invoke(
        app, ["tune", *TINY, "--dataset", str(good), "--runs-dir", str(tmp_path), "--executor", "ray"]
    )
    one_line_error(result, "pip install 'sdlora[ray]'")


def test_help_exits_zero():
    result = CliRunner().invoke(app, ["tune", "--help"])
    assert result.exit_code == 0 and "--grid" in result.output and "--learning-rate" in result.output


def test_tune_section_beside_the_train_config_is_the_space(tmp_path, datasets, monkeypatch):
    from sdlora.train import loop

    monkeypatch.setattr(loop, "run_training", lambda *a, **k: pytest.fail("trained"))
    good, _ = datasets
    config = tmp_path / "sweep.yaml"
    config.write_text("lora:\n  dropout: 0.1\ntune:\n  grid:\n    lora.rank: []\n  steps: [2, 4]\n")
    result = CliRunner().invoke(app, ["tune", *TINY, "--dataset", str(good), "--config", str(config)])
    one_line_error(result, f"--config {config}: tune.grid lora.rank: empty value list")


def test_resume_plans_only_unfinished_trials_and_one_base_scoring(tmp_path, datasets):
    from sdlora.fsutil import write_json
    from sdlora.tune import sweep as sw
    from sdlora.tune.trial import Scoring, record_path

    good, _ = datasets
    layers = [{"model": {"name": "tiny-sd"}, "data": {"dataset": str(good)}}]
    space = sp.build_space(sp.parse_grid_options(["rank=2,4,8"]), [1, 2])
    plan = sw.plan_sweep(layers, ("test",), space, obj.Objective(), Scoring(prompts=["x"]), tmp_path / "s")
    plan.tune_dir.mkdir(parents=True)
    sw.write_summary(plan)
    assert [j.baseline for j in plan.jobs] == [True, False, False]
    write_json(record_path(plan.tune_dir, "trial-00"), {"name": "trial-00", "status": "failed", "error": "OOM"})
    write_json(record_path(plan.tune_dir, "trial-01"), {"name": "trial-01", "status": "done", "points": []})
    resumed = sw.load_sweep(plan.tune_dir)  # tune.json as written before any trial ran
    todo = sw.pending(resumed)
    assert [j.name for j in todo] == ["trial-00", "trial-02"] and [j.baseline for j in todo] == [True, False]
    write_json(record_path(plan.tune_dir, "trial-01"), {"name": "trial-01", "status": "done", "base": {"clip_t": 0.3}})
    assert [j.baseline for j in sw.pending(resumed)] == [False, False]  # the base model is scored once per sweep
    assert resumed.jobs[1].config == plan.jobs[1].config and resumed.space.steps == [1, 2]
