"""The search space of `sdlora tune`: which config fields vary, over which values, and the scored steps.

A space is a grid (every combination of the listed values) or, with `random: N`, N points drawn from
it, where a value may also be a range: `log:2e-5..5e-4` (log-uniform), `2e-5..5e-4` (uniform) or
`int:4..32` (whole numbers). Keys are dotted config keys (`train.learning_rate`) or the flags of
`sdlora train` without the dashes (`lr`, `learning-rate`, `rank`). From the command line:

    sdlora tune --grid lr=5e-5,1e-4,2e-4 --grid rank=8,16 --steps 250,500,1000,1500
    sdlora tune --random 8 --grid lr=log:2e-5..5e-4 --grid rank=8,16

The file form is a `tune:` section (beside the train config's sections, or alone in a --space file):

    tune:
      grid:
        train.learning_rate: [5.0e-5, 1.0e-4, 2.0e-4]
        lora.rank: [8, 16]
      steps: [250, 500, 1000, 1500]
      random: 0            # N > 0: N random points instead of the whole grid
      objective: dino

Scored steps are points inside one trial (a trial trains to the first, is scored, continues to the
next), not separate trials. Every problem is a one-line ConfigError, raised before any training.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

from sdlora import config as config_mod
from sdlora.errors import ConfigError

# Published single-subject recipes: 1e-4 at rank 16 is diffusers' DreamBooth LoRA default; 5e-5..2e-4
# and rank 8..16 cover the usual advice; 250..1500 steps the usual "too little .. too much" range.
DEFAULT_GRID: dict[str, list[Any]] = {"train.learning_rate": [5e-5, 1e-4, 2e-4], "lora.rank": [8, 16]}
DEFAULT_STEPS: tuple[int, ...] = (250, 500, 1000, 1500)
SPACE_KEYS = ("grid", "steps", "random", "objective", "weights", "seed")
# Keys the sweep sets itself, per trial: never a dimension of the space.
FIXED = {
    "train.max_steps": "the scored steps are --steps, not a dimension of the space",
    "run.name": "tune names the trials itself",
    "run.runs_dir": "all trials live in the tune folder",
}
_RANGE = re.compile(r"^(?:(log|int):)?\s*([^.\s][^\s]*?)\s*\.\.\s*([^\s]+)$")


def key_for(name: str, where: str = "--grid") -> str:
    """The dotted config key for `name`: a dotted key, or a train flag without its dashes (`lr`, `rank`)."""
    name = name.strip()
    keys = config_mod.all_keys()
    if name in keys:
        key = name
    else:
        by_flag = {flag.lstrip("-"): o.key for o in config_mod.options() for flag in o.flags if flag.startswith("--")}
        if name.lstrip("-") not in by_flag:
            import difflib

            close = difflib.get_close_matches(name, [*by_flag, *keys], n=1)
            hint = (
                f" (did you mean {close[0]}?)"
                if close
                else " (a config key such as lora.rank, or a flag name such as lr)"
            )
            raise ConfigError(f"{where}: unknown key {name!r}{hint}")
        key = by_flag[name.lstrip("-")]
    if key in FIXED:
        raise ConfigError(f"{where}: {key} cannot vary ({FIXED[key]})")
    return key


@dataclass(frozen=True)
class Range:
    """A continuous dimension for random search: uniform, log-uniform or whole numbers in [low, high]."""

    low: float
    high: float
    scale: str = "linear"  # linear, log, int

    def draw(self, rng: random.Random) -> float | int:
        if self.scale == "int":
            return rng.randint(int(self.low), int(self.high))
        if self.scale == "log":
            return float(f"{math.exp(rng.uniform(math.log(self.low), math.log(self.high))):.3g}")
        return float(f"{rng.uniform(self.low, self.high):.3g}")

    def describe(self) -> str:
        prefix = "" if self.scale == "linear" else f"{self.scale}:"
        return f"{prefix}{self.low:g}..{self.high:g}"


def parse_range(text: str, where: str) -> Range | None:
    """`log:2e-5..5e-4` as a Range; None when `text` is not a range."""
    match = _RANGE.match(text.strip())
    if not match:
        return None
    scale, lo, hi = match.group(1) or "linear", match.group(2), match.group(3)
    try:
        low, high = float(lo), float(hi)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a range such as log:2e-5..5e-4") from None
    if low > high:
        raise ConfigError(f"{where}: range {text!r} runs backwards (give low..high)")
    if scale == "log" and low <= 0:
        raise ConfigError(f"{where}: a log range needs positive bounds, got {text!r}")
    if scale == "int" and not (low.is_integer() and high.is_integer()):
        raise ConfigError(f"{where}: an int range needs whole bounds, got {text!r}")
    return Range(low, high, scale)


def _scalar(text: str) -> Any:
    """A command-line value as YAML would read it, with 1e-4 a number (YAML 1.1 reads it as text)."""
    from sdlora import yamlfile

    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yamlfile.loads(text, "--grid")
    except yamlfile.YamlError:
        return text


@dataclass
class Space:
    """The dimensions (key -> values or a Range), the scored steps, and random-search settings."""

    grid: dict[str, list[Any] | Range] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)
    random: int = 0  # 0: the whole grid; N: N random points
    seed: int = 0  # of the random points

    def points(self) -> list[dict[str, Any]]:
        """The trials' settings ({key: value}), in a fixed order (the same on every resume)."""
        keys = list(self.grid)
        if not self.random:
            lists = [self.grid[k] for k in keys]
            return [dict(zip(keys, combo)) for combo in itertools.product(*lists)]  # type: ignore[arg-type]
        rng = random.Random(self.seed)
        points = []
        for _ in range(self.random):
            point = {}
            for key in keys:
                values = self.grid[key]
                point[key] = values.draw(rng) if isinstance(values, Range) else rng.choice(values)
            points.append(point)
        return points

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid": {k: (v.describe() if isinstance(v, Range) else list(v)) for k, v in self.grid.items()},
            "steps": list(self.steps),
            "random": self.random,
            "seed": self.seed,
        }


def parse_values(key: str, raw: Any, where: str) -> list[Any] | Range:
    """A dimension's values from the command line (`5e-5,1e-4`, `log:2e-5..5e-4`) or YAML (a list)."""
    if isinstance(raw, str):
        found = parse_range(raw, f"{where} {key}")
        if found is not None:
            return found
        raw = [_scalar(v.strip()) for v in raw.split(",") if v.strip()]
    elif not isinstance(raw, (list, tuple)):
        raw = [raw]
    if not raw:
        raise ConfigError(f"{where} {key}: empty value list; give at least one value, e.g. {key}=1e-4,2e-4")
    for value in raw:
        if isinstance(value, (list, tuple, dict, set)):
            kind = "a mapping" if isinstance(value, dict) else "a list"
            shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:50]}..."
            raise ConfigError(
                f"{where} {key}: the value {shown} is {kind}; each value of a dimension is one setting, "
                f"e.g. {key}: [8, 16]"
            )
    return list(dict.fromkeys(raw))


def parse_grid_options(items: list[str]) -> dict[str, list[Any] | Range]:
    """`--grid KEY=V1,V2` options as dimensions."""
    grid: dict[str, list[Any] | Range] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2 (e.g. lr=1e-4,2e-4 or rank=8,16)")
        key = key_for(name)
        if key in grid:
            raise ConfigError(f"--grid: {key} given twice; list all its values in one --grid {name}=...")
        grid[key] = parse_values(key, raw, "--grid")
    return grid


def parse_steps(raw: Any, where: str = "--steps") -> list[int]:
    """Scored steps, `250,500` or a list: whole numbers >= 1, sorted, without repeats."""
    items = (
        [v.strip() for v in raw.split(",")]
        if isinstance(raw, str)
        else list(raw if isinstance(raw, (list, tuple)) else [raw])
    )
    items = [v for v in items if v != ""]
    if not items:
        raise ConfigError(f"{where}: empty list; give scored steps such as 250,500,1000")
    steps = []
    for value in items:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number.is_integer() and number >= 1):
            raise ConfigError(f"{where}: {value!r} is not a step number (whole numbers >= 1, e.g. 250,500)")
        steps.append(int(number))
    return sorted(set(steps))


def _whole(value: Any, where: str) -> int:
    """A whole number >= 0 (tune.random, tune.seed)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and number.is_integer() and number >= 0):
        raise ConfigError(f"{where} must be a whole number >= 0, got {str(value)[:60]!r}")
    return int(number)


def parse_section(section: Any, where: str) -> dict[str, Any]:
    """A `tune:` YAML section, checked: {grid: {key: values}, steps, random, objective, weights, seed}.

    An empty one (an empty --space file, `tune:` alone) is an error, not the default space: whoever
    wrote the file meant a space.
    """
    if not section:
        raise ConfigError(
            f"{where}: no search space in it; give a tune: section, e.g. tune: {{grid: {{lora.rank: [8, 16]}}, "
            "steps: [250, 500]} (without a space file, sdlora tune searches its default space)"
        )
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: the tune section must be a mapping with grid:, steps:, ...")
    unknown = [k for k in section if k not in SPACE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key tune.{unknown[0]} (the tune section takes {', '.join(SPACE_KEYS)})")
    out: dict[str, Any] = {k: v for k, v in section.items() if k != "grid"}
    grid = section.get("grid", {})
    if "grid" in section and not grid:
        raise ConfigError(
            f"{where}: tune.grid is empty; list the keys to vary (lora.rank: [8, 16]), or leave grid: out "
            "for the default grid"
        )
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: tune.grid must map keys to value lists (lora.rank: [8, 16])")
    out["grid"] = {}
    for name, values in grid.items():
        key = key_for(str(name), f"{where}: tune.grid")
        out["grid"][key] = parse_values(key, values, f"{where}: tune.grid")
    if "steps" in out:
        out["steps"] = parse_steps(out["steps"], f"{where}: tune.steps")
    for name in ("random", "seed"):
        if out.get(name) is not None:
            out[name] = _whole(out[name], f"{where}: tune.{name}")
    if not isinstance(out.get("objective") or "", str):
        raise ConfigError(f"{where}: tune.objective must be one name, e.g. objective: dino")
    if not isinstance(out.get("weights") or "", (str, dict)):
        raise ConfigError(f"{where}: tune.weights must map scores to weights, e.g. weights: {{dino: 1, clip-t: 1}}")
    return out


def build_space(
    grid: dict[str, list[Any] | Range],
    steps: list[int] | None,
    random_points: int = 0,
    seed: int = 0,
    max_steps: int | None = None,
) -> Space:
    """The space, checked; defaults: DEFAULT_GRID and DEFAULT_STEPS (those up to an explicit --max-steps).

    `max_steps` is --max-steps when the user gave it: a scored step above it is an error.
    """
    if random_points < 0:
        raise ConfigError(f"--random {random_points}: give a number of random points >= 1 (or leave it out)")
    grid = dict(grid) if grid else dict(DEFAULT_GRID)
    ranges = [k for k, v in grid.items() if isinstance(v, Range)]
    if ranges and not random_points:
        raise ConfigError(f"--grid {ranges[0]}: a range needs --random N (the number of points to draw)")
    if steps is None:
        steps = list(DEFAULT_STEPS)
        if max_steps is not None:
            steps = [s for s in steps if s < max_steps] + [max_steps]
    elif max_steps is not None and steps[-1] > max_steps:
        raise ConfigError(
            f"--steps: scored step {steps[-1]} is above --max-steps {max_steps}; "
            f"give steps up to {max_steps}, or leave --max-steps out (it is then the last scored step)"
        )
    return Space(grid=grid, steps=list(steps), random=random_points, seed=seed)
