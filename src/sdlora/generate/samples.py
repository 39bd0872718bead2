"""Sampling a run's LoRA, side by side with the base model alone (same prompts, same seeds).

`generate_samples(run, prompts)` loads the run's base model and LoRA, and for each prompt
writes `samples/<prompt-slug>/lora-<seed>.png` and (with `baseline=True`) `base-<seed>.png` made
with the LoRA disabled, a labelled `grid.png` of this sampling (LoRA row above baseline row) and
merges the images into `samples/samples.json` (format: `sdlora.run`). Image i of every prompt uses
seed `seed + i` through its own CPU generator, so an image does not depend on the batch size, the
device's random stream, or whether the LoRA was on: the baseline differs only by the LoRA.

Files are named by seed (`lora-07.png` is seed 7), so sampling a prompt again with other seeds
adds images beside the earlier ones (samples.json lists both, the scorer scores both); the same
prompt, variant and seed again replaces that image and its entry.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from sdlora import __version__
from sdlora.data.buckets import check_resolution
from sdlora.errors import ConfigError
from sdlora.events import ProgressFn
from sdlora.generate.images import save_png, write_grid
from sdlora.generate.pipeline import ADAPTER, SamplerOptions, base_model_only, prepare_pipeline, resolve_lora
from sdlora.generate.prompts import check_prompts, prompt_dir
from sdlora.prompts import expand_prompt, prompt_fit
from sdlora.run import SAMPLES_DIR, SAMPLES_JSON, VARIANTS, RunInfo, read_samples, write_samples

VARIANT_STEM = {"lora": "lora", "baseline": "base"}


@dataclass
class Settings:
    num_images: int
    seed: int
    steps: int
    guidance: float
    lora_scale: float
    negative_prompt: str | None
    height: int
    width: int
    batch_size: int
    variants: tuple[str, ...]


def prompt_too_long(pipe: Any, arch: Any, prompt: str, token: str) -> str | None:
    """One warning line when `prompt` is longer than the pipeline's tokenizers read (or None)."""
    fits = [(label, prompt_fit(tok, prompt, token, window)) for label, tok, window in arch.prompt_windows(pipe)]
    if not any(fit.over for _, fit in fits):
        return None
    label, fit = max(fits, key=lambda f: f[1].tokens - f[1].limit)
    cut = any(f.token_cut for _, f in fits)
    what = f"the token {token} is cut off, so the LoRA's object is not asked for" if cut else f"{token} is kept"
    return (
        f"prompt {prompt!r} is {fit.tokens} {label} tokens; only the first {fit.limit} are used, "
        f"the rest is cut ({what}); shorten it"
    )


def recorded_family(lora: Path) -> Any:
    """The model family an sdlora LoRA file records (`sdlora.architecture`), read from its header before any
    model loads; None for another trainer's file or one that cannot be read (loading it says why)."""
    from sdlora.errors import SdloraError
    from sdlora.lora_format import META_PREFIX
    from sdlora.models.families import find_family
    from sdlora.safetensors_io import read_metadata

    try:
        return find_family(read_metadata(lora, "LoRA file").get(f"{META_PREFIX}architecture"))
    except SdloraError:
        return None


def image_file(subdir: str, variant: str, seed: int) -> str:
    """An image's path under samples/: `<prompt-slug>/lora-<seed>.png` (base- for the baseline)."""
    return f"{subdir}/{VARIANT_STEM[variant]}-{seed:02d}.png"


def _generate(pipe: Any, arch: Any, prompt: str, s: Settings, tick: Callable[[], None]) -> Iterator[tuple[int, Any]]:
    """(index, image) for one prompt; image i from its own CPU generator seeded `s.seed + i`. Guidance and
    the negative prompt go in as the family's pipeline takes them (`Family.sampling_kwargs`)."""
    for start in range(0, s.num_images, s.batch_size):
        indices = list(range(start, min(start + s.batch_size, s.num_images)))
        negative = None if s.negative_prompt is None else [s.negative_prompt] * len(indices)
        out = pipe(
            prompt=[prompt] * len(indices),
            num_inference_steps=s.steps,
            **arch.sampling_kwargs(s.guidance, negative),
            **arch.prompt_kwargs(pipe),
            height=s.height,
            width=s.width,
            generator=[torch.Generator("cpu").manual_seed(s.seed + i) for i in indices],
        )
        for i, image in zip(indices, out.images):
            tick()
            yield i, image


def generate_samples(
    run: RunInfo,
    prompts: Sequence[str],
    *,
    out_dir: Path | None = None,
    num_images: int = 4,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    baseline: bool = True,
    lora_scale: float = 1.0,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    scheduler: str | None = None,
    device: str | None = None,
    lora_dir: Path | str | None = None,
    embedding: bool = True,
    dtype: str = "auto",
    attention_slicing: bool = False,
    vae_tiling: bool = False,
    cpu_offload: bool = False,
    on_progress: ProgressFn | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> Path:
    """Generate `num_images` per prompt with the run's LoRA (and the base model alone); returns samples.json.

    `lora_dir`: `lora` (default), `best`, a LoRA folder, or a LoRA .safetensors file (that file, whoever
    wrote it; samples.json records it as `lora_file`). `embedding` False: without the token's trained
    embedding beside the LoRA file (the PNGs' `lora` metadata lists the files loaded). Image i of each prompt
    gets seed `seed + i`. `on_warning` gets one line per prompt longer than the text encoder's window (default:
    `warnings.warn`). `steps` and `guidance` None: the loaded model's (`Family.sample_steps`,
    `Family.guidance_for`); samples.json records the values used.
    """
    prompts = check_prompts(prompts)
    for name, value in (("--num-images", num_images), ("--steps", steps), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} {value}: must be at least 1")
    for name, value in (("--height", height), ("--width", width)):
        if value is not None:
            check_resolution(value, name)
    lora = resolve_lora(run, lora_dir)  # the file named, or the folder's diffusers file; absolute
    out_dir = Path(out_dir) if out_dir is not None else run.path / SAMPLES_DIR
    samples_path = out_dir / SAMPLES_JSON
    existing = read_samples(samples_path, missing_ok=True)  # fail on a broken file before minutes of sampling

    options = SamplerOptions(
        device=device, dtype=dtype, attention_slicing=attention_slicing, vae_tiling=vae_tiling, cpu_offload=cpu_offload
    )
    recorded = recorded_family(lora)  # an sdlora LoRA's family: its refusals come before minutes of loading
    if recorded is not None:  # guidance None: the loaded model's (`Family.guidance_for`), not known yet
        recorded.sampling_kwargs(guidance, negative_prompt)
    pipe, arch, _, loaded = prepare_pipeline(run, lora, options, scheduler, embedding=embedding)
    guidance = arch.guidance_for(pipe) if guidance is None else guidance  # the loaded model's pipeline default
    steps = arch.sample_steps(pipe) if steps is None else steps  # the loaded model's (a distilled one's 4, ...)
    arch.sampling_kwargs(guidance, negative_prompt)  # a setting the family refuses fails before any image
    pipe.set_adapters([ADAPTER], adapter_weights=[lora_scale])
    s = Settings(
        num_images=num_images,
        seed=seed,
        steps=steps,
        guidance=guidance,
        lora_scale=lora_scale,
        negative_prompt=negative_prompt,
        height=height or run.resolution,
        width=width or run.resolution,
        batch_size=batch_size,
        variants=VARIANTS if baseline else VARIANTS[:1],
    )
    scheduler_name = type(pipe.scheduler).__name__

    taken = {
        Path(e["file"]).parent.as_posix(): e["prompt"] for e in existing["images"] if "file" in e and "prompt" in e
    }
    expanded: dict[str, str] = {}  # as written -> as generated; two spellings of one prompt are sampled once
    for written in prompts:
        prompt = expand_prompt(written, run.token, run.class_word)
        if prompt not in expanded.values():
            expanded[written] = prompt
    subdirs = {written: prompt_dir(prompt, taken) for written, prompt in expanded.items()}
    for prompt in expanded.values():
        problem = prompt_too_long(pipe, arch, prompt, run.token)
        if problem:
            (on_warning or warnings.warn)(problem)
    total = len(expanded) * num_images * len(s.variants)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_progress:
            on_progress("sampling images", done, total)

    if on_progress:
        on_progress("sampling images", 0, total)
    new_entries: list[dict[str, Any]] = []
    # All LoRA images first, then all baselines: the LoRA is switched off once, not per prompt.
    for variant in s.variants:
        with base_model_only(pipe, loaded) if variant == "baseline" else contextlib.nullcontext():
            for written, prompt in expanded.items():
                for i, image in _generate(pipe, arch, prompt, s, tick):
                    rel = image_file(subdirs[written], variant, seed + i)
                    entry = {
                        "file": rel,
                        "prompt": prompt,
                        "prompt_as_written": written,
                        "seed": seed + i,
                        "variant": variant,
                        "index": i,
                        "steps": steps,
                        "guidance": guidance,
                        "lora_scale": lora_scale if variant == "lora" else 0.0,
                        "lora_file": str(lora) if variant == "lora" else None,
                        "scheduler": scheduler_name,
                        "height": s.height,
                        "width": s.width,
                        "negative_prompt": negative_prompt,
                    }
                    save_png(
                        image,
                        out_dir / rel,
                        {
                            "prompt": prompt,
                            "negative_prompt": negative_prompt,
                            "seed": seed + i,
                            "model": run.model,
                            "lora": ", ".join(loaded.files)
                            if variant == "lora"
                            else "none (baseline: base model alone)",
                            "lora_scale": entry["lora_scale"],
                            "steps": steps,
                            "guidance": guidance,
                            "scheduler": scheduler_name,
                            "variant": variant,
                            "size": f"{s.width}x{s.height}",
                            "sdlora_version": __version__,
                            "Software": f"sdlora {__version__}",
                        },
                    )
                    new_entries.append(entry)

    written_files = {e["file"] for e in new_entries}
    for written, prompt in expanded.items():
        write_grid(
            out_dir,
            subdirs[written],
            prompt,
            [e for e in new_entries if e["prompt"] == prompt],
            {"model": run.model, "lora": loaded.files[0]},
        )

    # An entry is replaced by one of the same prompt, variant and seed, or when its file was overwritten
    # (names of older sdlora versions counted images from 00 whatever the seed).
    regenerated = {(e["prompt"], e["variant"], e["seed"]) for e in new_entries}
    kept = [
        e
        for e in existing["images"]
        if (e.get("prompt"), e.get("variant"), e.get("seed")) not in regenerated and e.get("file") not in written_files
    ]
    data = {
        **{k: v for k, v in existing.items() if k != "images"},
        "model": run.model,
        "run": str(run.path),
        "lora_dir": str(lora.parent),
        "lora_file": str(lora),  # the file sampled with, absolute
        "lora_scale": lora_scale,
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler_name,
        "height": s.height,
        "width": s.width,
        "negative_prompt": negative_prompt,
        "sdlora_version": __version__,
        "images": kept + new_entries,
    }
    return write_samples(samples_path, data)
