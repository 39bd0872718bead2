"""What "best" means in a sweep: one number per scored point, and the CLIP-T floor.

`dino` (default): the point's DINO (identity of the object vs the held-out val photos), among points
whose CLIP-T is at least the base model's CLIP-T minus `margin` (0.02): a LoRA that copies the
photos and ignores the prompt scores a high DINO and a low CLIP-T, and must not win.
`clip-i`: CLIP-I, with the same floor. `clip-t`: CLIP-T (no floor). `weighted`: a weighted sum of
the three (`--weights dino=1,clip-i=0,clip-t=1`), with the floor.

The base model is scored once per sweep (its images: the same prompts and seeds without the LoRA).
Without a base score (it failed), no floor applies, and tune.json says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdlora.errors import ConfigError

OBJECTIVES = ("dino", "clip-i", "clip-t", "weighted")
METRICS = {"dino": "dino", "clip-i": "clip_i", "clip-t": "clip_t"}  # objective / weight name -> point key
DEFAULT_WEIGHTS = {"dino": 1.0, "clip-i": 0.0, "clip-t": 1.0}
DEFAULT_MARGIN = 0.02


def parse_weights(text: str | dict[str, Any] | None) -> dict[str, float]:
    """`dino=1,clip-t=0.5` (or a mapping) as weights; missing names weigh 0 (all missing: the default)."""
    if text is None or text == "":
        return dict(DEFAULT_WEIGHTS)
    items = text.items() if isinstance(text, dict) else (part.partition("=")[::2] for part in str(text).split(","))
    weights = {name: 0.0 for name in METRICS}
    for name, value in items:
        name = str(name).strip().replace("_", "-")
        if name not in METRICS:
            raise ConfigError(f"--weights: unknown score {name!r} (give dino, clip-i, clip-t, e.g. dino=1,clip-t=1)")
        try:
            weights[name] = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--weights {name}={value!r}: not a number") from None
    return weights


@dataclass
class Objective:
    kind: str = "dino"
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    margin: float = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        if self.kind not in OBJECTIVES:
            raise ConfigError(f"--objective {self.kind!r}: choose one of {', '.join(OBJECTIVES)}")

    @property
    def uses_floor(self) -> bool:
        return self.kind != "clip-t"

    def floor(self, base: dict[str, Any] | None) -> float | None:
        """The lowest CLIP-T a point may have: the base model's minus the margin (None: no floor)."""
        if not self.uses_floor or not base or base.get("clip_t") is None:
            return None
        return float(base["clip_t"]) - self.margin

    def value(self, point: dict[str, Any]) -> float | None:
        """The point's objective (None when a score it needs is missing)."""
        if self.kind == "weighted":
            parts = [(w, point.get(METRICS[name])) for name, w in self.weights.items() if w]
            if any(v is None for _, v in parts):
                return None
            return float(sum(w * float(v) for w, v in parts))  # type: ignore[arg-type]
        score = point.get(METRICS[self.kind])
        return None if score is None else float(score)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "margin": self.margin}
        if self.kind == "weighted":
            out["weights"] = self.weights
        return out


def rank_points(
    trials: list[dict[str, Any]], objective: Objective, base: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Every scored point of every trial with its objective and whether it passes the floor, best first.

    Returns rows {trial, settings, step, dino, clip_i, clip_t, objective, eligible}; points that pass the
    floor come first, each group by objective, highest first.
    """
    floor = objective.floor(base)
    rows = []
    for trial in trials:
        for point in trial.get("points") or []:
            value = objective.value(point)
            clip_t = point.get("clip_t")
            eligible = value is not None and (floor is None or (clip_t is not None and clip_t >= floor))
            rows.append(
                {
                    "trial": trial["name"],
                    "settings": trial.get("settings") or {},
                    "step": point["step"],
                    **{k: point.get(k) for k in ("dino", "clip_i", "clip_t")},
                    "objective": value,
                    "eligible": eligible,
                }
            )
    rows.sort(key=lambda r: (not r["eligible"], -(r["objective"] if r["objective"] is not None else -1e9)))
    return rows


def choose(trials: list[dict[str, Any]], objective: Objective, base: dict[str, Any] | None) -> dict[str, Any] | None:
    """The winning point (a `rank_points` row): the highest objective among points above the floor;
    when no point passes it, the highest overall, with `eligible` False. None without any scored point."""
    rows = [r for r in rank_points(trials, objective, base) if r["objective"] is not None]
    return rows[0] if rows else None
