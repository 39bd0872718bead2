"""The run folder contract (see DESIGN.md): `train` writes it, `sample`, `score`, `report` read it.

runs/<name>/
  config.yaml        the fully resolved training config (sections below)
  metrics.jsonl      one JSON object per logged step or evaluation
  lora/              pytorch_lora_weights.safetensors (diffusers/peft keys) + <name>.safetensors (kohya)
  best/              the same files for the best validation score so far
  checkpoints/step-NNNNNN/   accelerate states to resume from
  samples/           `sdlora sample` output: <prompt-slug>/*.png, grid.png, samples.json
  scores.json        `sdlora score` output
  report.html        the HTML report

config.yaml sections read by the later stages (train may write more keys in each):
  model: {name, revision, variant, vae}
  data:  {dataset, resolution, token, class_word}
  lora:  {rank, alpha, ...}
`runs/latest` is a symlink to the newest run (a text file holding the name where links fail).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdlora.errors import RunError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LORA_DIR = "lora"
BEST_DIR = "best"
DIFFUSERS_LORA = "pytorch_lora_weights.safetensors"
EMBEDDINGS = "embeddings.safetensors"
SAMPLES_DIR = "samples"
SAMPLES_JSON = "samples.json"
SCORES_JSON = "scores.json"
REPORT = "report.html"
DEFAULT_RUNS = Path("runs")


class Metric:
    """Key names in metrics.jsonl: the loop writes them; the report, the scorer and the tests read them."""

    STEP = "step"
    EPOCH = "epoch"
    LOSS = "loss"  # the step's training loss (instance + weighted prior)
    LOSS_MEAN = "loss_mean"  # its running mean
    LOSS_PREFIX = "loss/"  # parts of the loss: loss/instance, loss/prior
    LOSS_INSTANCE = "loss/instance"
    LOSS_PRIOR = "loss/prior"
    LR = "lr"  # the UNet group's learning rate; the other groups' are lr/<group>
    LR_PREFIX = "lr/"
    GRAD_NORM_PREFIX = "grad_norm/"  # grad_norm/<group> and grad_norm/total
    GRAD_NORM_TOTAL = "grad_norm/total"
    EMBEDDING_NORM_PREFIX = "embedding_norm/"  # embedding_norm/<text encoder>: the token's own vector
    VAL_LOSS = "val_loss"
    DINO = "dino"  # DINO of the validation samples vs the val photos (--score-every)
    STEP_TIME = "step_time_s"
    IMAGES_PER_S = "images_per_s"
    RSS_GB = "rss_gb"
    CUDA_PREFIX = "cuda_"
    CUDA_PEAK_GB = "cuda_peak_gb"

    @staticmethod
    def lr(group: str) -> str:
        return Metric.LR if group == "unet" else Metric.LR_PREFIX + group

    @staticmethod
    def grad_norm(group: str) -> str:
        return Metric.GRAD_NORM_PREFIX + group

    @staticmethod
    def embedding_norm(encoder: str) -> str:
        return Metric.EMBEDDING_NORM_PREFIX + encoder


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete records of a metrics.jsonl: a last line still being written (or cut by a crash) and
    lines that are not JSON objects are skipped, so a reader works while training runs."""
    import json

    path = Path(path)
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n") or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def resolve_run_dir(run: str | Path) -> Path:
    """Follow `runs/latest` (a symlink, or a file naming the run) to the real run folder."""
    run = Path(run)
    if run.is_file() and run.name == "latest":
        run = run.parent / run.read_text(encoding="utf-8").strip()
    if not run.exists():
        hint = " (train one with `sdlora train`)" if run.name == "latest" else ""
        raise RunError(f"{run}: no such run folder{hint}")
    if not run.is_dir():
        raise RunError(f"{run}: not a run folder")
    return run.resolve()


def point_latest(run_dir: Path) -> None:
    """Make `<runs>/latest` point at `run_dir` (atomically replaced)."""
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / ".latest.tmp"
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(run_dir.name, target_is_directory=True)
    except OSError:  # no symlinks (some Windows setups): a text file naming the run
        tmp.write_text(run_dir.name + "\n", encoding="utf-8")
    if latest.is_dir() and not latest.is_symlink():
        raise RunError(f"{latest}: is a real folder; rename it so `latest` can point at the newest run")
    tmp.replace(latest)


@dataclass
class RunInfo:
    """What a later stage needs to know about a finished (or running) training run."""

    path: Path
    config: dict[str, Any] = field(repr=False)

    @property
    def model(self) -> str:
        return self.config["model"]["name"]

    @property
    def revision(self) -> str | None:
        return self.config["model"].get("revision")

    @property
    def variant(self) -> str | None:
        return self.config["model"].get("variant")

    @property
    def vae(self) -> str | None:
        return self.config["model"].get("vae")

    @property
    def dataset(self) -> Path:
        return Path(self.config["data"]["dataset"])

    @property
    def token(self) -> str:
        return self.config["data"]["token"]

    @property
    def class_word(self) -> str:
        return self.config["data"]["class_word"]

    @property
    def resolution(self) -> int:
        return int(self.config["data"]["resolution"])

    @property
    def name(self) -> str:
        return self.path.name

    def lora_dir(self, which: str = LORA_DIR) -> Path:
        """The LoRA folder (`lora` or `best`); an error naming the run if it has no LoRA yet."""
        folder = self.path / which
        if not (folder / DIFFUSERS_LORA).is_file():
            raise RunError(f"{self.path}: no LoRA in {which}/ (is training finished? `sdlora train` writes it)")
        return folder


def load_run(run: str | Path) -> RunInfo:
    """Open a run folder (or `runs/latest`) and read its config.yaml."""
    path = resolve_run_dir(run)
    config_path = path / CONFIG
    if not config_path.is_file():
        raise RunError(f"{path}: not a run folder (no {CONFIG})")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RunError(f"{config_path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    for section, key in (("model", "name"), ("data", "dataset"), ("data", "token")):
        if not isinstance(config, dict) or key not in (config.get(section) or {}):
            raise RunError(f"{config_path}: missing {section}.{key}")
    return RunInfo(path=path, config=config)
