"""The training config: precedence, one error listing every problem, presets, round trip, resume policy."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

from sdlora import config as config_mod
from sdlora.config import Config, build_config, load_config, parse_dotted
from sdlora.errors import ConfigError
from sdlora.train.resolve import resume_config


def test_defaults_live_in_the_dataclasses():
    cfg = Config()
    assert cfg.model.name == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.effective_alpha) == (16, None, 16.0)
    assert cfg.lora.target_modules is None  # the model family's (resolve.resolve_targets), known once it loads
    assert cfg.train.learning_rate == 1e-4
    assert cfg.validation.prompts == ["a photo of {token} {class}"]


def test_precedence_yaml_then_flags_then_dotted(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("lora: {rank: 8, dropout: 0.1}\ntrain: {seed: 5, learning_rate: 2e-4}\n", encoding="utf-8")
    cfg = load_config(path, {"lora.rank": 4, "train.max_steps": 7}, ["lora.rank=2", "data.random_flip=true"])
    assert cfg.lora.rank == 2  # dotted beats flags beats YAML
    assert cfg.lora.dropout == 0.1  # YAML beats defaults
    assert cfg.train.seed == 5 and cfg.train.learning_rate == 2e-4  # "2e-4" in YAML 1.1 is a string: coerced
    assert cfg.train.max_steps == 7
    assert cfg.data.random_flip is True


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            {"lora.rank": 0, "train.max_steps": 0},
            ["lora.rnak=3", "data.resolution=abc", "train.optimizer=sgd", "nosection.x=1"],
        )
    message = str(err.value)
    assert "\n" not in message
    for part in (
        "--rank must be at least 1",
        "--max-steps must be at least 1",
        "unknown key lora.rnak (did you mean rank?)",
        "--resolution (data.resolution): expected a whole number",
        "'sgd' is not one of adamw, adamw8bit",
        "unknown section 'nosection'",
    ):
        assert part in message, part


def test_cross_field_and_value_checks_name_the_flag():
    with pytest.raises(ConfigError, match="--lr-warmup-steps 50 is more than --max-steps 10"):
        load_config(None, {"train.max_steps": 10, "train.lr_warmup_steps": 50, "train.lr_scheduler": "cosine"})
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        load_config(None, {"train.lr_warmup_steps": 5})
    with pytest.raises(ConfigError, match="--resolution 100: must be a positive multiple of 8"):
        load_config(None, {"data.resolution": 100})
    with pytest.raises(ConfigError, match="--name 'latest'"):
        load_config(None, {"run.name": "latest"})


def test_coercion_from_strings():
    nested = parse_dotted(["lora.target_modules=to_q,to_v", "data.cache=no", "train.snr_gamma=none", "lora.alpha=8"])
    cfg = build_config(nested)
    assert cfg.lora.target_modules == ["to_q", "to_v"]
    assert cfg.data.cache is False and cfg.train.snr_gamma is None and cfg.lora.alpha == 8.0
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_dotted(["--rank"])
    with pytest.raises(ConfigError, match="expected a whole number"):
        build_config({"train": {"max_steps": 2.5}})


def test_presets_load_and_document_themselves():
    for preset in config_mod.PRESETS:
        cfg = load_config(preset)
        assert isinstance(cfg, Config)
        text = resources.files("sdlora").joinpath("configs", f"{preset}.yaml").read_text(encoding="utf-8")
        assert text.startswith("#") and "sdlora train --config" in text
    assert load_config("tiny").model.name == "tiny-sd"
    assert load_config("sdxl").train.gradient_checkpointing is True
    with pytest.raises(ConfigError, match="no such file"):
        load_config("nope.yaml")


def test_examples_match_the_presets():
    repo = Path(__file__).resolve().parents[1]
    for name in ("sd15", "sdxl"):
        assert load_config(repo / "examples" / f"{name}.yaml") == load_config(name)


def test_saved_yaml_round_trips(tmp_path: Path):
    cfg = load_config("sdxl", {"lora.rank": 4, "data.dataset": "/abs/dataset"}, ["validation.prompts=[a, b]"])
    path = tmp_path / "config.yaml"
    config_mod.save_config(cfg, path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# sdlora training config")
    data = yaml.safe_load(text)
    # The run contract: the sections later stages read.
    assert set(data["model"]) >= {"name", "revision", "variant", "vae"}
    assert set(data["data"]) >= {"dataset", "resolution", "token", "class_word"}
    assert load_config(path) == cfg
    assert config_mod.config_hash(load_config(path)) == config_mod.config_hash(cfg)


def test_field_help_comes_from_docstrings():
    assert config_mod.field_help("lora.rank").startswith("LoRA rank: higher learns more detail")
    assert "(default: 16)" in config_mod.field_help("lora.rank")
    assert config_mod.flag_for("validation.prompts") == "--validation-prompt"
    assert config_mod.flag_for("model.name") == "--model"


def test_resume_policy_checkpoint_wins_for_what_is_trained():
    saved = load_config(None, {"lora.rank": 8, "train.learning_rate": 1e-4, "train.max_steps": 10}).to_dict()
    cfg, warnings = resume_config(
        saved, [{"lora": {"rank": 4}, "train": {"learning_rate": 5e-5, "max_steps": 20}}], ("command line",)
    )
    assert cfg.lora.rank == 8  # would not load into the checkpoint's LoRA
    assert cfg.train.learning_rate == 5e-5 and cfg.train.max_steps == 20
    text = " | ".join(warnings)
    assert "--rank (lora.rank)" in text and "using the checkpoint's 8" in text
    assert "--learning-rate (train.learning_rate)" in text and "using 5e-05 from the command line" in text
    same, none = resume_config(saved, [{}], ("command line",))
    assert none == [] and same == build_config(saved)


def test_config_module_does_not_import_torch():
    code = "import sys, sdlora.config, sdlora.cli.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_tune_section_beside_the_train_config_is_left_to_sdlora_tune(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("lora:\n  rank: 8\ntune:\n  grid:\n    lr: [1e-4, 2e-4]\n", encoding="utf-8")
    assert load_config(path).lora.rank == 8  # `sdlora train --config sweep.yaml` trains the fixed part


def test_a_huge_value_is_shown_cut_short_in_the_error(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("lora:\n  rank: [" + ", ".join(["12345"] * 20_000) + "]\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith("--rank (lora.rank): expected a whole number, got [12345, 12345,") and len(message) < 200
    assert message.endswith("... (140,000 characters)")
