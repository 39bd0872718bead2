"""What every trainer of the build shares: one thread, seeds per step, checkpoints, the curve, saving.

Every random draw of step `i` comes from generators seeded with (seed, i), never from a stream
carried across steps, so a trainer resumed from its checkpoint at step i continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sdlora.fsutil import atomic_folder, atomic_path

WORK = "work"  # under the build's output folder: the pool and the checkpoints, not shipped


def one_thread() -> None:
    """Build processes run two at a time on two cores: more threads spin at their barriers (10-30x slower)."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process: it can be set only once
        pass


def scaled(steps: int, scale: float) -> int:
    return max(1, round(steps * scale))


def step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def cosine_lr(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@dataclass
class Trainer:
    """The loop every model shares: `step_fn(step) -> dict of floats` after `zero_grad`, then clip + step.

    Prints the curve (the mean of each value over the last `every` steps) with s/step, and checkpoints
    model + optimizer + step + curve to `ckpt` every `ckpt_every` steps and at the end."""

    name: str
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    steps: int
    lr: float
    warmup: int
    ckpt: Path
    every: int = 50
    ckpt_every: int = 250
    clip_grad: float = 1.0
    ema: torch.nn.Module | None = (
        None  # a copy of `model` that follows it: avg += (1 - ema_decay) * (weight - avg) each step
    )
    ema_decay: float = 0.999

    def run(self, step_fn: Callable[[int], torch.Tensor | tuple[torch.Tensor, dict[str, float]]]) -> list[dict]:
        start, curve = self._resume()
        if start:
            print(f"[{self.name}] resumed at step {start}/{self.steps}", flush=True)
        window: dict[str, list[float]] = {}
        t0 = time.process_time()
        for step in range(start, self.steps):
            for group in self.opt.param_groups:
                group["lr"] = cosine_lr(step, self.steps, self.lr, self.warmup)
            self.opt.zero_grad(set_to_none=True)
            out = step_fn(step)
            loss, extra = out if isinstance(out, tuple) else (out, {})
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            self.opt.step()
            if self.ema is not None:
                with torch.no_grad():
                    for avg, p in zip(self.ema.parameters(), self.model.parameters()):
                        avg.lerp_(p, 1 - self.ema_decay)
            for key, value in {"loss": loss.item(), **extra}.items():
                window.setdefault(key, []).append(value)
            done = step + 1
            if done % self.every == 0 or done == self.steps:
                point = {"step": done, **{k: float(np.mean(v)) for k, v in window.items()}}
                point["cpu_s_per_step"] = (time.process_time() - t0) / len(window["loss"])
                curve.append(point)
                values = " ".join(f"{k} {v:.4f}" for k, v in point.items() if k != "step")
                print(f"[{self.name}] step {done}/{self.steps} {values}", flush=True)
                window, t0 = {}, time.process_time()
            if done % self.ckpt_every == 0 or done == self.steps:
                self._save(done, curve)
        return curve

    def _resume(self) -> tuple[int, list[dict]]:
        if not self.ckpt.is_file():
            return 0, []
        state = torch.load(self.ckpt, map_location="cpu", weights_only=True)
        if state.get("steps") != self.steps:
            from sdlora.errors import ConfigError

            raise ConfigError(
                f"{self.ckpt}: a checkpoint of a {state.get('steps')}-step training, this one has {self.steps} "
                "steps; build with the --steps-scale that made it, or delete it to start over"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        return int(state["step"]), list(state["curve"])

    def _save(self, step: int, curve: list[dict]) -> None:
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": step, "curve": curve}
        state["steps"] = self.steps
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        with atomic_path(self.ckpt) as tmp:
            torch.save(state, tmp)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def publish(final: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` fills a temp folder beside `final`, which then replaces `final` whole."""
    with atomic_folder(final) as tmp:
        write(tmp)


def build_once(name: str, final: Path, train: Callable[[], Any]) -> None:
    """Train a model (or a pipeline of models) and publish it in fp16 at `final`, unless a finished one is
    there already."""
    if final.is_dir():
        print(f"[{name}] already built in {final}", flush=True)
        return
    model = train()

    def write(tmp: Path) -> None:
        model.to(torch.float16).save_pretrained(tmp)
        forget_build_paths(tmp)

    publish(final, write)
    print(f"[{name}] saved {final}", flush=True)


def forget_build_paths(folder: Path) -> None:
    """Drop the `_name_or_path` diffusers writes into a config of a model it loaded (the world VAE's: a path on
    the machine that built it), so a shipped folder names no one's disk."""
    import json

    from sdlora.fsutil import write_text

    for path in folder.rglob("config.json"):
        config = json.loads(path.read_text(encoding="utf-8"))
        if config.pop("_name_or_path", None) is not None:
            write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def pipeline_main(
    name: str, folder: str, train: Callable[[Path, float], tuple], pipeline: Callable[..., Any]
) -> Callable[[list[str] | None], None]:
    """The entry point of a trainer that publishes a pipeline: `main(argv)` runs `train(out, steps_scale)` and
    saves `pipeline(*what train returned)` at <out>/<folder>, once (`build_once`)."""

    def build(args: Any) -> None:
        build_once(name, args.out / folder, lambda: pipeline(*train(args.out, args.steps_scale)))

    return lambda argv=None: main(name, build, argv)


def main(name: str, body: Callable[[Any], None], argv: list[str] | None) -> None:
    """A trainer module's entry point: parse its options, run `body(args)`, and turn an sdlora error
    into one line on stderr and exit status 1."""
    import sys

    from sdlora.errors import SdloraError

    args = parse_args(name, argv)
    try:
        body(args)
    except SdloraError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def parse_args(name: str, argv: list[str] | None):
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m sdlora.world.trainers.{name.removeprefix('world-')}")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps-scale", type=float, default=1.0)
    return parser.parse_args(argv)
