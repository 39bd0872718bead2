"""Sampling a run's LoRA, side by side with the base model alone (same prompts, same seeds).

`generate_samples(run, prompts)` loads the run's base model and LoRA, and for each prompt
writes `samples/<prompt-slug>/lora-NN.png` and (with `baseline=True`) `base-NN.png` made with
the LoRA disabled, a labelled `grid.png` (LoRA row above baseline row) and merges the images
into `samples/samples.json` (format in INTERFACES.md). Image i of every prompt uses seed
`seed + i` through its own CPU generator, so an image does not depend on the batch size, the
device's random stream, or whether the LoRA was on: the baseline differs only by the LoRA.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from sdlora import __version__
from sdlora.errors import ConfigError, ModelError, RunError
from sdlora.fsutil import atomic_path, write_json
from sdlora.run import DIFFUSERS_LORA, EMBEDDINGS, SAMPLES_DIR, SAMPLES_JSON, RunInfo

ProgressFn = Callable[[str, int, int], None]
ADAPTER = "sdlora"
VARIANT_STEM = {"lora": "lora", "baseline": "base"}

# --scheduler names -> (diffusers class, extra config). Built with from_config(pipe.scheduler.config),
# so each keeps the model's own noise schedule (betas, prediction type, timestep spacing).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---- prompts --------------------------------------------------------------------------------


def expand_prompt(prompt: str, token: str, class_word: str) -> str:
    """Put the class word after the token where the prompt omits it.

    "sksToy on a beach" -> "sksToy toy on a beach"; "a sksToy toy" and prompts without the
    token are left as they are. Whitespace is tidied.
    """
    prompt = " ".join(prompt.split())
    if not token or not class_word:
        return prompt
    followed = re.compile(rf"(?<![\w]){re.escape(token)}(?![\w])(?!\s+{re.escape(class_word)}(?![\w]))", re.IGNORECASE)
    return followed.sub(lambda m: f"{m.group(0)} {class_word}", prompt)


def read_prompts_file(path: Path) -> list[str]:
    """Prompts from a text file: one per line; blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts-file {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--prompts-file {path}: not UTF-8 text ({exc.reason})") from exc
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts, stripped; ConfigError for none at all or an empty one."""
    if not prompts:
        raise ConfigError("no prompts given: pass a prompt such as 'sksToy on a beach', or --prompts-file FILE")
    cleaned = []
    for i, prompt in enumerate(prompts, 1):
        if not prompt or not prompt.strip():
            raise ConfigError(f"prompt {i} is empty: give a prompt such as 'sksToy on a beach'")
        cleaned.append(prompt.strip())
    return list(dict.fromkeys(cleaned))


def slug(prompt: str, max_len: int = 60) -> str:
    """A folder name for a prompt: lower case ASCII words joined by '-' (a hash when it would be empty or long)."""
    base = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    if not base or len(base) > max_len:
        digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8]
        base = f"{base[: max_len - 9].rstrip('-')}-{digest}".strip("-")
    return base


# ---- pipeline -------------------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    """`--device`, or the best available: CUDA, then Apple's MPS, then the CPU."""
    if device:
        try:
            chosen = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"--device {device}: not a device (use cpu, cuda, cuda:1 or mps)") from exc
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: fp16 on CUDA (half the memory, tensor cores), fp32 elsewhere (CPU fp16 is slow or unsupported)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def scheduler_key(name: str) -> str:
    """The SCHEDULERS key for a --scheduler name (`dpmpp` is accepted for `dpm++`); ConfigError if unknown."""
    key = name.strip().lower().replace("dpmpp", "dpm++").replace("-", "_")
    if key not in SCHEDULERS:
        raise ConfigError(f"--scheduler {name}: unknown scheduler; choose one of {', '.join(SCHEDULERS)}")
    return key


def make_scheduler(name: str, current: Any) -> Any:
    """The scheduler `name` (see SCHEDULERS), configured from the model's scheduler."""
    import diffusers

    cls_name, extra = SCHEDULERS[scheduler_key(name)]
    return getattr(diffusers, cls_name).from_config(current.config, **extra)


def resolve_lora_dir(run: RunInfo, lora: str | Path | None) -> Path:
    """`None` / `lora` / `best` (folders of the run) or a path to a folder or .safetensors file."""
    if lora is None or str(lora) in ("lora", "best"):
        return run.lora_dir(str(lora or "lora"))
    path = Path(lora)
    folder = path.parent if path.suffix == ".safetensors" else path
    if not (folder / DIFFUSERS_LORA).is_file():
        raise RunError(f"--lora {lora}: no {DIFFUSERS_LORA} there (give lora, best, or a LoRA folder)")
    return folder


@dataclass
class LoadedLora:
    """What `load_lora` put into a pipeline, and how to take it out again for the baseline."""

    files: list[str]
    base_tokenizers: dict[str, Any] = field(default_factory=dict)  # tokenizers before the embedding was added


def load_lora(pipe: Any, arch: Any, lora_dir: Path, token: str) -> LoadedLora:
    """Load the diffusers-format LoRA (and a textual-inversion embedding beside it) into `pipe`."""
    try:
        with _quiet_diffusers():  # "No LoRA keys associated to CLIPTextModel": expected for a UNet-only LoRA
            pipe.load_lora_weights(lora_dir, weight_name=DIFFUSERS_LORA, adapter_name=ADAPTER)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise RunError(
            f"{lora_dir / DIFFUSERS_LORA}: cannot be loaded into {arch.name} "
            f"({str(exc).splitlines()[0][:200]}); was it trained on another base model?"
        ) from exc
    loaded = LoadedLora(files=[str(lora_dir / DIFFUSERS_LORA)])
    embeddings = lora_dir / EMBEDDINGS
    if embeddings.is_file():
        # The embedding only adds tokenizer entries and new rows to the embedding matrix, so the
        # untouched tokenizers give exactly the base model's text encoding (the baseline).
        loaded.base_tokenizers = {name: copy.deepcopy(getattr(pipe, name)) for name in arch.tokenizers}
        load_embeddings(pipe, arch, embeddings, token)
        loaded.files.append(str(embeddings))
    return loaded


def load_embeddings(pipe: Any, arch: Any, path: Path, token: str) -> None:
    """A textual-inversion embedding for `token`: SDXL files hold `clip_l` + `clip_g`, SD 1.x one tensor."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    try:
        if arch.is_sdxl and {"clip_l", "clip_g"} <= set(state):
            pipe.load_textual_inversion(
                state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
            )
            pipe.load_textual_inversion(
                state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
            )
        else:
            pipe.load_textual_inversion(str(path), token=token)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise RunError(
            f"{path}: not a textual-inversion embedding for {arch.name} ({str(exc).splitlines()[0][:200]})"
        ) from exc


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


@contextlib.contextmanager
def base_model_only(pipe: Any, loaded: LoadedLora) -> Iterator[None]:
    """The pipeline without the LoRA (and without a learned token embedding), restored afterwards."""
    trained = {name: getattr(pipe, name) for name in loaded.base_tokenizers}
    pipe.disable_lora()
    for name, tokenizer in loaded.base_tokenizers.items():
        setattr(pipe, name, tokenizer)
    try:
        yield
    finally:
        for name, tokenizer in trained.items():
            setattr(pipe, name, tokenizer)
        pipe.enable_lora()


@dataclass
class SamplerOptions:
    """How to run the pipeline: device, precision and the memory savers for small GPUs."""

    device: str | None = None
    dtype: str = "auto"
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False


def prepare_pipeline(
    run: RunInfo, lora_dir: Path, options: SamplerOptions, scheduler: str | None = None
) -> tuple[Any, Any, torch.device, LoadedLora]:
    """The run's base model with its LoRA loaded, on its device: (pipe, arch, device, loaded files).

    Attention runs through PyTorch's scaled_dot_product_attention (diffusers' default processor),
    which picks flash / memory-efficient kernels on GPUs.
    """
    from sdlora.models import load_pipeline

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    if scheduler is not None:
        scheduler_key(scheduler)  # bad options fail before the model loads
    if options.cpu_offload and device.type == "cpu":
        raise ConfigError("--cpu-offload needs a GPU (it moves each model to the GPU only while it runs)")
    pipe, arch = load_pipeline(run.model, revision=run.revision, variant=run.variant, vae=run.vae, dtype=dtype)
    loaded = load_lora(pipe, arch, lora_dir, run.token)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler)
    if options.attention_slicing:
        pipe.enable_attention_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        try:
            pipe.to(device)
        except (RuntimeError, AssertionError) as exc:
            raise ModelError(f"--device {device}: cannot move the model there ({str(exc).splitlines()[0]})") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe, arch, device, loaded


# ---- images ---------------------------------------------------------------------------------


def png_metadata(fields: dict[str, Any]) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in fields.items():
        if value is not None:
            info.add_itxt(key, str(value))
    return info


def save_png(image: Any, path: Path, metadata: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_metadata(metadata))


def make_grid(rows: list[tuple[str, list[Any]]], captions: list[str], title: str, min_cell: int = 128) -> Any:
    """A labelled grid: one row per (label, images), a caption under each column, a title on top."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = rows[0][1][0].size
    scale = max(1.0, min_cell / min(width, height))
    cell_w, cell_h = round(width * scale), round(height * scale)
    font = ImageFont.load_default(size=14)
    label_w, title_h, caption_h, pad = 84, 28, 20, 4
    columns = max(len(images) for _, images in rows)
    grid = Image.new(
        "RGB", (label_w + columns * (cell_w + pad), title_h + len(rows) * (cell_h + pad) + caption_h), "white"
    )
    draw = ImageDraw.Draw(grid)
    draw.text((6, 6), title if len(title) < 110 else title[:107] + "...", fill="black", font=font)
    for r, (label, images) in enumerate(rows):
        y = title_h + r * (cell_h + pad)
        draw.text((6, y + cell_h // 2 - 8), label, fill="black", font=font)
        for c, image in enumerate(images):
            resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
            grid.paste(image.convert("RGB").resize((cell_w, cell_h), resample), (label_w + c * (cell_w + pad), y))
    y = title_h + len(rows) * (cell_h + pad)
    for c, caption in enumerate(captions):
        draw.text((label_w + c * (cell_w + pad) + 2, y + 2), caption, fill="dimgray", font=font)
    return grid


# ---- samples.json ---------------------------------------------------------------------------


def read_samples_json(path: Path) -> dict[str, Any]:
    """An existing samples.json to merge into; an unreadable one is an error (never silently dropped)."""
    if not path.is_file():
        return {"images": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("images", []), list):
            raise ValueError("no 'images' list")
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunError(
            f"{path}: not a samples.json written by `sdlora sample` ({exc}); move it away and sample again"
        ) from exc
    data.setdefault("images", [])
    return data


def _prompt_dir(prompt: str, taken: dict[str, str]) -> str:
    """The prompt's folder, disambiguated when another prompt has the same slug."""
    name = slug(prompt)
    if taken.get(name, prompt) != prompt:
        name = f"{name[:51]}-{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]}"
    taken[name] = prompt
    return name


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


def _generate(pipe: Any, prompt: str, s: Settings, tick: Callable[[], None]) -> Iterator[tuple[int, Any]]:
    """(index, image) for one prompt; image i from its own CPU generator seeded `s.seed + i`."""
    for start in range(0, s.num_images, s.batch_size):
        indices = list(range(start, min(start + s.batch_size, s.num_images)))
        out = pipe(
            prompt=[prompt] * len(indices),
            negative_prompt=None if s.negative_prompt is None else [s.negative_prompt] * len(indices),
            num_inference_steps=s.steps,
            guidance_scale=s.guidance,
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
    steps: int = 30,
    guidance: float = 7.5,
    baseline: bool = True,
    lora_scale: float = 1.0,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    scheduler: str | None = None,
    device: str | None = None,
    lora_dir: Path | str | None = None,
    dtype: str = "auto",
    attention_slicing: bool = False,
    vae_tiling: bool = False,
    cpu_offload: bool = False,
    on_progress: ProgressFn | None = None,
) -> Path:
    """Generate `num_images` per prompt with the run's LoRA (and the base model alone); returns samples.json.

    `lora_dir`: `lora` (default), `best`, or a LoRA folder. Image i of each prompt gets seed `seed + i`.
    """
    prompts = check_prompts(prompts)
    for name, value in (("--num-images", num_images), ("--steps", steps), ("--batch-size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name} {value}: must be at least 1")
    for name, value in (("--height", height), ("--width", width)):
        if value is not None and (value < 8 or value % 8):
            raise ConfigError(f"{name} {value}: must be a positive multiple of 8")
    folder = resolve_lora_dir(run, lora_dir)
    out_dir = Path(out_dir) if out_dir is not None else run.path / SAMPLES_DIR
    samples_path = out_dir / SAMPLES_JSON
    existing = read_samples_json(samples_path)  # fail on a broken file before minutes of sampling

    options = SamplerOptions(
        device=device, dtype=dtype, attention_slicing=attention_slicing, vae_tiling=vae_tiling, cpu_offload=cpu_offload
    )
    pipe, _, _, loaded = prepare_pipeline(run, folder, options, scheduler)
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
        variants=("lora", "baseline") if baseline else ("lora",),
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
    subdirs = {written: _prompt_dir(prompt, taken) for written, prompt in expanded.items()}
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
                for i, image in _generate(pipe, prompt, s, tick):
                    rel = f"{subdirs[written]}/{VARIANT_STEM[variant]}-{i:02d}.png"
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
        _remove_stale(out_dir, existing, prompt, s.variants, written_files)
        write_grid(
            out_dir,
            subdirs[written],
            prompt,
            [e for e in new_entries if e["prompt"] == prompt],
            {"model": run.model, "lora": loaded.files[0]},
        )

    regenerated = {(e["prompt"], e["variant"]) for e in new_entries}
    kept = [e for e in existing["images"] if (e.get("prompt"), e.get("variant")) not in regenerated]
    data = {
        **{k: v for k, v in existing.items() if k != "images"},
        "model": run.model,
        "run": str(run.path),
        "lora_dir": str(folder),
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
    write_json(samples_path, data)
    return samples_path


def write_grid(out_dir: Path, sub: str, prompt: str, entries: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """`<sub>/grid.png`: the LoRA row above the baseline row, a seed under each column."""
    from PIL import Image

    rows = []
    for variant, label in (("lora", "LoRA"), ("baseline", "base")):
        mine = sorted((e for e in entries if e["variant"] == variant), key=lambda e: e["index"])
        if mine:
            images = []
            for e in mine:
                with Image.open(out_dir / e["file"]) as im:
                    images.append(im.convert("RGB"))
            rows.append((label, images))
    seeds = [e["seed"] for e in sorted((e for e in entries if e["variant"] == "lora"), key=lambda e: e["index"])]
    grid = make_grid(rows, [f"seed {seed}" for seed in seeds], prompt)
    path = out_dir / sub / "grid.png"
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG", pnginfo=png_metadata({"prompt": prompt, **meta, "sdlora_version": __version__}))
    return path


def _remove_stale(out_dir: Path, existing: dict[str, Any], prompt: str, variants: Sequence[str], now: set[str]) -> None:
    """Delete images of an earlier, larger sampling of this prompt that the new one did not overwrite."""
    for entry in existing["images"]:
        if entry.get("prompt") == prompt and entry.get("variant") in variants and entry.get("file") not in now:
            (out_dir / entry["file"]).unlink(missing_ok=True)
