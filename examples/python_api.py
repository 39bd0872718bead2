"""sdlora from Python: sample a trained run's LoRA beside the base model, score it, write the report.

The same functions the CLI calls (`sdlora sample`, `sdlora score`, `sdlora report`). Run it on a
finished run, e.g. after `sdlora demo` or `sdlora train`:

    python examples/python_api.py                 # runs/latest
    python examples/python_api.py runs/my-run
"""

from __future__ import annotations

import sys

from sdlora.evaluate.score import score_run
from sdlora.generate import generate_samples
from sdlora.models.loading import is_tiny
from sdlora.report import write_report
from sdlora.run import load_run


def main(run_path: str = "runs/latest") -> None:
    run = load_run(run_path)  # reads config.yaml: base model, token, class word, resolution
    tiny = is_tiny(run.model)  # tiny random models: cheap settings and the tiny offline scorers
    print(f"run {run.name}: {run.model}, token {run.token!r} ({run.class_word})")

    # LoRA images and, with the same seeds, the base model alone. The class word is added
    # after the token ("sksToy on a beach" -> "sksToy toy on a beach").
    prompts = [f"{run.token} on a beach", f"a red {run.token} {run.class_word}"]
    samples_json = generate_samples(
        run,
        prompts,
        num_images=2,
        seed=0,
        steps=4 if tiny else 30,
        guidance=7.5,
        baseline=True,
        on_progress=lambda what, done, total: print(f"\r{what}: {done}/{total}", end="", flush=True),
    )
    print(f"\nsamples: {samples_json}")

    # DINO / CLIP-I against the dataset's real val photos, CLIP-T against the prompts.
    scores = score_run(
        run,
        samples_json=samples_json,
        dino_model="tiny-dino" if tiny else "facebook/dino-vits16",
        clip_model="tiny-clip" if tiny else "ViT-B-32",
    )
    for variant in ("lora", "baseline"):
        row = scores["overall"][variant]
        print(f"{variant:>8}: DINO {row['dino']:.3f}  CLIP-I {row['clip_i']:.3f}  CLIP-T {row['clip_t']:.3f}")

    print(f"report: {write_report(run.path)}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
