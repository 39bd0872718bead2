"""The run folder contract: what `train` writes and `sample`, `score` and `report` read, and the one
reader and writer of each shared file (change a name here and every stage sees it).

runs/<name>/
  config.yaml        the fully resolved training config (sections below); `load_run` reads it
  metrics.jsonl      one JSON object per logged step or evaluation, keys in `Metric`; `read_metrics`
  lora/              pytorch_lora_weights.safetensors (diffusers/peft keys) + <name>.safetensors (kohya),
                     embeddings.safetensors with a trained token embedding
  best/              the same files for the best validation score so far
  checkpoints/step-NNNNNN/   what a run resumes from: safetensors + JSON, no pickle (train/checkpoint.py)
  samples/           `sdlora sample` output: <prompt-slug>/{lora,base}-NN.png, grid.png, samples.json;
                     step-N/ the validation samples of training step N
  scores.json        `sdlora score` output
  report.html        the HTML report (`sdlora.report.write_report`)

config.yaml sections read by the later stages (train may write more keys in each):
  model: {name, revision, variant, vae}
  data:  {dataset, resolution, token, class_word}
  lora:  {rank, alpha, ...}
  validation: {prompts, ...}

samples/samples.json (`write_samples` / `read_samples`): the settings of the last sampling (model, run,
lora_dir, lora_scale, steps, guidance, scheduler, height, width, negative_prompt, sdlora_version) and
  images[]: {file (relative to samples/), prompt (as generated), prompt_as_written, seed, index,
             variant ("lora" or "baseline": the base model alone, same seed), and the sampling settings}

scores.json (`write_scores` / `read_scores`), cosines in -1..1:
  schema_version (SCORES_SCHEMA_VERSION), created, run, samples, lora_dir, token, class_word,
  prompt_set, scale (how to read the numbers), scorers.{dino,clip} (model, revision, preprocessing),
  real: {dataset, split, count, files}, embedded / cached: {dino, clip} image counts,
  overall.{lora,baseline}: {SCORE_METRICS..., images, real_images, prompts} or null (no images),
  prompts[]: {prompt, prompt_as_written, prompt_without_token, lora: {...} or null, baseline: {...} or null}

`runs/latest` is a symlink to the newest run with a checkpoint or a LoRA (a text file holding the name
where links fail); a run that failed before either does not move it.
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
CHECKPOINTS = "checkpoints"
SAMPLES_JSON = "samples.json"
SCORES_JSON = "scores.json"
REPORT = "report.html"
DEFAULT_RUNS = Path("runs")
VARIANTS = ("lora", "baseline")  # an image made with the LoRA, or by the base model alone (same seed)
SCORE_METRICS = ("dino", "clip_i", "clip_t", "clip_t_with_token")  # per variant in scores.json
SCORES_SCHEMA_VERSION = 1


class Metric:
    """Key names in metrics.jsonl: the loop writes them; the report, the scorer and the tests read them."""

    STEP = "step"
    EPOCH = "epoch"
    LOSS = "loss"  # the step's training loss (instance + weighted prior)
    LOSS_MEAN = "loss_mean"  # its running mean
    LOSS_PREFIX = "loss/"  # parts of the loss: loss/instance, loss/prior, loss/preservation
    LOSS_INSTANCE = "loss/instance"
    LOSS_PRIOR = "loss/prior"
    LOSS_PRESERVATION = "loss/preservation"  # --preservation dop: LoRA-on vs base output for the class captions
    MASK_COVERAGE = "mask_coverage"  # --masked-loss: the batch's mean subject-mask share of the latent grid
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
    CPU_PERCENT = "cpu_percent"  # this process (can exceed 100 on several cores)
    SYSTEM_CPU_PERCENT = "system_cpu_percent"
    CUDA_PREFIX = "cuda_"  # cuda_allocated_gb, cuda_peak_gb, ...: memory keys end in _gb
    CUDA_PEAK_GB = "cuda_peak_gb"
    CUDA_UTILIZATION = "cuda_utilization_percent"

    @staticmethod
    def lr(group: str) -> str:
        return Metric.LR if group == "unet" else Metric.LR_PREFIX + group

    LR_EFFECTIVE_PREFIX = "lr_effective/"  # an adaptive optimizer's own step size (Prodigy's d x lr)

    @staticmethod
    def lr_effective(group: str) -> str:
        return Metric.LR_EFFECTIVE_PREFIX + group

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


# ---- samples.json and scores.json ------------------------------------------------------------------


def _load_json(path: Path, what: str) -> Any:
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: missing (`{what}` writes it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: not a {Path(path).name} written by `{what}` ({exc})") from exc


class _Checker:
    """Field checks that name the file and the field: `images[3].variant: 'x' is not 'lora' or 'baseline'`."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what

    def fail(self, field: str, problem: str) -> RunError:
        return RunError(f"{self.path}: {field} {problem} (not as `{self.what}` writes it; run it again)")

    def get(
        self,
        obj: dict[str, Any],
        key: str,
        types: tuple[type, ...],
        where: str = "",
        optional: bool = False,
        nullable: bool = False,
    ) -> Any:
        """obj[key] checked against `types`; `optional`: may be missing or null; `nullable`: may be null."""
        field = f"{where}{key}"
        if key not in obj:
            if optional:
                return None
            raise self.fail(field, "is missing")
        value = obj[key]
        if value is None and (optional or nullable):
            return None
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join("a list" if t is list else "an object" if t is dict else t.__name__ for t in types)
            raise self.fail(field, f"is {value!r:.60}, expected {names}")
        return value


def _check_samples(data: Any, check: _Checker) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise check.fail("the top level", "is not a JSON object")
    for i, entry in enumerate(check.get(data, "images", (list,))):
        where = f"images[{i}]."
        if not isinstance(entry, dict):
            raise check.fail(where.rstrip("."), "is not a JSON object")
        file = check.get(entry, "file", (str,), where)
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise check.fail(where + "file", f"{file!r} is not a path inside samples/")
        check.get(entry, "prompt", (str,), where)
        check.get(entry, "prompt_as_written", (str,), where, optional=True)
        if check.get(entry, "variant", (str,), where) not in VARIANTS:
            raise check.fail(where + "variant", f"is {entry['variant']!r}, expected 'lora' or 'baseline'")
        check.get(entry, "seed", (int,), where)
        check.get(entry, "index", (int,), where)
    return data


def read_samples(path: Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """samples.json, schema-checked (RunError naming the file and the field); `missing_ok`: no file
    reads as no images."""
    path = Path(path)
    if missing_ok and not path.exists():
        return {"images": []}
    return _check_samples(_load_json(path, "sdlora sample"), _Checker(path, "sdlora sample"))


def write_samples(path: Path, data: dict[str, Any]) -> Path:
    """Write samples.json atomically, after the same check `read_samples` makes."""
    from sdlora.fsutil import write_json

    _check_samples(data, _Checker(path, "sdlora sample"))
    write_json(path, data)
    return Path(path)


def _check_variant_scores(scores: Any, check: _Checker, where: str) -> None:
    if scores is None:
        return
    if not isinstance(scores, dict):
        raise check.fail(where.rstrip("."), "is not a JSON object or null")
    check.get(scores, "images", (int,), where)
    for metric in SCORE_METRICS:
        check.get(scores, metric, (int, float), where, nullable=True)


def _check_scores(data: Any, check: _Checker) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise check.fail("the top level", "is not a JSON object")
    version = check.get(data, "schema_version", (int,))
    if version != SCORES_SCHEMA_VERSION:
        raise check.fail("schema_version", f"is {version}, this sdlora reads {SCORES_SCHEMA_VERSION}")
    overall = check.get(data, "overall", (dict,))
    for variant in VARIANTS:
        _check_variant_scores(
            check.get(overall, variant, (dict,), "overall.", optional=True), check, f"overall.{variant}."
        )
    for i, entry in enumerate(check.get(data, "prompts", (list,))):
        where = f"prompts[{i}]."
        if not isinstance(entry, dict):
            raise check.fail(where.rstrip("."), "is not a JSON object")
        check.get(entry, "prompt", (str,), where)
        for variant in VARIANTS:
            _check_variant_scores(check.get(entry, variant, (dict,), where, optional=True), check, f"{where}{variant}.")
    check.get(data, "scorers", (dict,))
    check.get(check.get(data, "real", (dict,)), "count", (int,), "real.")
    return data


def read_scores(path: Path) -> dict[str, Any]:
    """scores.json, schema-checked (RunError naming the file and the field)."""
    return _check_scores(_load_json(path, "sdlora score"), _Checker(path, "sdlora score"))


def write_scores(path: Path, data: dict[str, Any]) -> Path:
    """Write scores.json atomically, after the same check `read_scores` makes."""
    from sdlora.fsutil import write_json

    _check_scores(data, _Checker(path, "sdlora score"))
    write_json(path, data)
    return Path(path)


# ---- run folders ---------------------------------------------------------------------------------


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
