"""`sdlora sample`'s core: images from a run's LoRA beside the base model alone, same prompts and seeds.

prompts.py   prompts as typed (the class word added after a bare token), prompt files, folder names
pipeline.py  the base model with the LoRA and token embedding loaded; schedulers, precision, memory
images.py    PNGs with their settings in the metadata, the LoRA-over-baseline grid
samples.py   `generate_samples`: the sampling run, merged into samples/samples.json (`sdlora.run`)
"""

from sdlora.generate.images import make_grid, png_metadata, save_png, write_grid
from sdlora.generate.pipeline import (
    ADAPTER,
    DTYPES,
    SCHEDULERS,
    LoadedLora,
    SamplerOptions,
    base_model_only,
    check_lora_files,
    load_embeddings,
    load_lora,
    make_scheduler,
    prepare_pipeline,
    resolve_dtype,
    resolve_lora,
    resolve_lora_dir,
    scheduler_key,
)
from sdlora.generate.prompts import check_prompts, prompt_dir, read_prompts_file, slug
from sdlora.generate.samples import generate_samples
from sdlora.prompts import expand_prompt

__all__ = [
    "ADAPTER",
    "DTYPES",
    "SCHEDULERS",
    "LoadedLora",
    "SamplerOptions",
    "base_model_only",
    "check_lora_files",
    "check_prompts",
    "expand_prompt",
    "generate_samples",
    "load_embeddings",
    "load_lora",
    "make_grid",
    "make_scheduler",
    "png_metadata",
    "prepare_pipeline",
    "prompt_dir",
    "read_prompts_file",
    "resolve_dtype",
    "resolve_lora",
    "resolve_lora_dir",
    "save_png",
    "scheduler_key",
    "slug",
    "write_grid",
]
