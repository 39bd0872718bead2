"""Training speed against the floor: the bare UNet step, then `sdlora train` steps.

Run by hand (minutes; about 5 GB of disk for the model folder, ~8 GB of RAM):

    .venv/bin/python benchmarks/train_speed.py                       # everything, 256 px, rank 16
    .venv/bin/python benchmarks/train_speed.py --skip-train          # only the UNet floor
    .venv/bin/python benchmarks/train_speed.py --train-args="--mixed-precision bf16"
    .venv/bin/python benchmarks/train_speed.py --skip-unet --train-args="" --train-args="--no-train-token-embedding"
    .venv/bin/python benchmarks/train_speed.py --skip-unet --photos examples/photos --prepare-args="--keep-aspect"
    .venv/bin/python benchmarks/train_speed.py --skip-unet --mask-rows   # plain vs --masked-loss vs --preservation dop
    .venv/bin/python benchmarks/train_speed.py --skip-unet --prepare-args="--masks alpha" --train-args="--masked-loss"
    .venv/bin/python benchmarks/train_speed.py --diffusers-script /path/to/diffusers/examples/dreambooth/train_dreambooth_lora.py

The SDXL row (`--arch sdxl`: about 14 GB of disk for its folder, built once, and ~16 GB of RAM;
on a shared machine run it under `flock /tmp/sdlora-heavy.lock`):

    .venv/bin/python benchmarks/train_speed.py --arch sdxl --steps 2 4 --iters 2 --floor-precisions fp32 \
        --train-args="--no-train-token-embedding" \
        --diffusers-script /path/to/diffusers/examples/dreambooth/train_dreambooth_lora_sdxl.py

`--train-args` may be given several times: each is timed as its own row, in one sitting.
`--photos` and `--prepare-args` choose what `sdlora prepare` makes of which photos (the default
DreamBench photos are square; examples/photos are 4:3, for aspect-ratio buckets).
`--mask-rows` times the plain step beside `--masked-loss` and `--preservation dop` (three rows); a dataset
whose photos have no masks (`--prepare-args="--masks alpha"` needs cut-outs) gets a centred-disk mask per
image, written into its manifest like `prepare --masks` does (`--with-masks` alone does only that).
`--diffusers-script` also times diffusers' DreamBooth LoRA example at the same settings (same
model folder, photos, resolution, batch, rank, step counts), from a local copy of the diffusers
repository that is never committed here.

Method (../shared/PERFORMANCE.md): a random-weight model with the real SD 1.5 or SDXL base
architecture (same compute as the real one; ARCHS holds each one's configs) is built from configs
and saved once, part by part, with `save_pretrained` (reused afterwards). SDXL is trained at
1024 px normally; 256 px (32x32 latents) is the size used here because a step at 1024 px costs
at least 16x as much (16x the pixels), minutes on a 2-core CPU (the GPU benchmark, benchmarks/gpu.py, runs SDXL at
1024 px). The floor is the UNet forward+backward with LoRA on the attention
projections (SDXL: with its pooled-text and time-id conditioning), fp32 and under bf16 autocast.
`sdlora train` is timed as whole processes at two
step counts; the marginal time per step cancels start-up (imports, model load, caching),
which is reported separately. Peak RSS comes from /usr/bin/time -v around each process; a process
whose processes together pass `--rss-cap-gb` (20 GB) is stopped and its row says it did not fit.
diffusers' SDXL example is timed until it has written its LoRA and stopped there: what follows
is its final inference, which reloads the whole pipeline beside the trained one (2 x 14 GB).
Machines shared with other work are noisy: compare the ratios printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DREAMBENCH = REPO.parent / "shared" / "data" / "dreambench" / "duck_toy"


# ----------------------------------------------------------------------------- the model folders
@dataclass(frozen=True)
class Arch:
    """One architecture's benchmark model: its folder name, its pipeline and how each part is built."""

    key: str
    label: str
    folder: str  # under <cache>/bench/
    pipeline: str  # diffusers pipeline class
    networks: Callable[[], dict[str, Callable[[], Any]]]  # the big parts, built (and saved, freed) one at a time
    parts: Callable[[], dict[str, Any]]  # tokenizers, scheduler, absent parts (None)
    diffusers_script: str  # the diffusers example it is compared with
    # Stop the example's clock (and the example) when it has written its LoRA: what follows is its final
    # inference, which reloads the whole pipeline beside the trained one (SDXL: 2 x 14 GB, over 24 GiB).
    diffusers_until_saved: bool = False
    dtype: str = "float32"  # the dtype its networks are built and saved in (torch attribute name)


def _clip_text(hidden: int, layers: int, heads: int, act: str, projection: bool = False) -> Any:
    """A CLIP text encoder of the given size: 77 positions, the CLIP vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act=act,
        vocab_size=49408,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(sample_size: int, scaling_factor: float, **extra: Any) -> Any:
    """SD's VAE (SD 1.5 and SDXL share it): four blocks, 128-512 channels, 4 latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        **extra,
    )


def _sd15_networks() -> dict[str, Callable[[], Any]]:
    from diffusers import UNet2DConditionModel

    return {
        "unet": lambda: UNet2DConditionModel(  # diffusers' defaults are SD 1.5's blocks and layers
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "vae": lambda: _vae(512, 0.18215),
        "text_encoder": lambda: _clip_text(768, 12, 12, "quick_gelu"),  # CLIP ViT-L/14
    }


def _sd15_parts() -> dict[str, Any]:
    from diffusers import PNDMScheduler

    from sdlora.models.tiny import clip_tokenizer

    scheduler = PNDMScheduler(  # SD 1.5's scheduler_config.json
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    return {
        "tokenizer": clip_tokenizer(),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _sdxl_networks() -> dict[str, Callable[[], Any]]:
    from diffusers import UNet2DConditionModel

    return {
        "unet": lambda: UNet2DConditionModel(  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,  # 768 + 1280: both text encoders' penultimate states
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + pooled text 1280
        ),
        "vae": lambda: _vae(1024, 0.13025, force_upcast=True),
        "text_encoder": lambda: _clip_text(768, 12, 12, "quick_gelu"),  # CLIP ViT-L/14
        "text_encoder_2": lambda: _clip_text(1280, 32, 20, "gelu", projection=True),  # OpenCLIP ViT-bigG/14
    }


def _sdxl_parts() -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler

    from sdlora.models.tiny import clip_tokenizer

    scheduler = EulerDiscreteScheduler(  # SDXL base's scheduler_config.json
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return {
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(pad_token="!"),  # OpenCLIP's tokenizer pads with "!"
        "scheduler": scheduler,
    }


def _t5_xxl() -> Any:
    """FLUX.1's second text encoder: T5 v1.1 XXL's encoder (black-forest-labs/FLUX.1-dev text_encoder_2), 4.76 B."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def _flux1_networks() -> dict[str, Callable[[], Any]]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    return {
        "transformer": lambda: FluxTransformer2DModel(  # black-forest-labs/FLUX.1-dev transformer/config.json
            patch_size=1,
            in_channels=64,  # 16 latent channels x 2 x 2 packed cells
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,  # 24 x 128 = 3072 wide
            joint_attention_dim=4096,  # T5-XXL's d_model
            pooled_projection_dim=768,  # CLIP-L's pooled output
            guidance_embeds=True,  # [dev]
            axes_dims_rope=(16, 56, 56),
        ),
        "vae": lambda: AutoencoderKL(  # FLUX.1-dev vae/config.json: 16 latent channels, no quant convs
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=16,
            sample_size=1024,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            force_upcast=True,
        ),
        "text_encoder": lambda: _clip_text(768, 12, 12, "quick_gelu"),  # CLIP ViT-L/14
        "text_encoder_2": _t5_xxl,
    }


def _flux1_parts() -> dict[str, Any]:
    from sdlora.models.tiny import clip_tokenizer, flux_dev_scheduler, t5_tokenizer

    scheduler = flux_dev_scheduler()  # FLUX.1-dev's scheduler_config.json
    # sdlora's offline T5 tokenizer (a small vocabulary, T5TokenizerFast, tokenizer.json only): prompts are padded
    # to the 512-token window either way, so the compute is the real one's.
    return {"tokenizer": clip_tokenizer(), "tokenizer_2": t5_tokenizer(), "scheduler": scheduler}


ARCHS = {
    "sd15": Arch(
        "sd15",
        "SD 1.5",
        "sd15-random",
        "StableDiffusionPipeline",
        _sd15_networks,
        _sd15_parts,
        "train_dreambooth_lora.py",
    ),
    "sdxl": Arch(
        "sdxl",
        "SDXL",
        "sdxl-random",
        "StableDiffusionXLPipeline",
        _sdxl_networks,
        _sdxl_parts,
        "train_dreambooth_lora_sdxl.py",
        diffusers_until_saved=True,
    ),
    # 33.5 GB in bf16 (transformer 23.8, T5-XXL 9.5): built in bf16, on a GPU (benchmarks/gpu.py), never here.
    "flux1": Arch(
        "flux1",
        "FLUX.1 [dev]",
        "flux1-random",
        "FluxPipeline",
        _flux1_networks,
        _flux1_parts,
        "train_dreambooth_lora_flux.py",
        diffusers_until_saved=True,
        dtype="bfloat16",
    ),
}
CPU_ARCHS = ("sd15", "sdxl")  # what this CPU benchmark runs (--arch); FLUX.1 is for benchmarks/gpu.py


def default_cache(arch: str = "sd15") -> Path:
    """Where the random-weight model folder of `arch` is built once and reused."""
    return Path(os.environ.get("SDLORA_CACHE", Path.home() / ".cache" / "sdlora")) / "bench" / ARCHS[arch].folder


@contextlib.contextmanager
def default_dtype(dtype: Any) -> Iterator[None]:
    """Parameters made meanwhile are `dtype` (built in it, never cast from fp32: no fp32 copy at all)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_random(arch: str, folder: Path, device: str = "cpu") -> Path:
    """A diffusers pipeline folder with random weights and the real architecture of `arch` (ARCHS).

    The networks are built, saved and freed one at a time, so the peak memory is the largest
    one (SDXL's UNet: 10.3 GB in fp32), not the whole model (14 GB); `device` is where they
    are initialised (a GPU does it in seconds; tokenizers and the scheduler stay on the CPU), in
    the architecture's `dtype` (FLUX.1: bf16, as published, so its 12 B transformer is 23.8 GB).
    model_index.json comes from the same pipeline built on the meta device (no memory), so
    the folder is exactly what `save_pretrained` of the whole pipeline writes.
    """
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers
    import torch

    spec = ARCHS[arch]
    print(f"building a random-weight {spec.label}-size model in {folder} (once) ...", flush=True)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    networks, parts = spec.networks(), spec.parts()
    with torch.device("meta"):
        getattr(diffusers, spec.pipeline)(**{name: build() for name, build in networks.items()}, **parts).save_config(
            tmp
        )
    torch.manual_seed(0)
    for name, build in networks.items():
        with torch.device(device), default_dtype(getattr(torch, spec.dtype)):
            module = build()
        module.save_pretrained(tmp / name)  # safetensors copies GPU tensors to the CPU itself
        del module
        gc.collect()
    for name, part in parts.items():
        if hasattr(part, "save_pretrained"):
            part.save_pretrained(tmp / name)
    tmp.rename(folder)  # a half-written folder is never mistaken for a finished one
    return folder


def build_sd15_random(folder: Path) -> Path:
    """A StableDiffusionPipeline folder with random weights and the real SD 1.5 architecture."""
    return build_random("sd15", folder)


def build_sdxl_random(folder: Path, device: str = "cpu") -> Path:
    """A StableDiffusionXLPipeline folder with random weights and the real SDXL base architecture."""
    return build_random("sdxl", folder, device)


# ----------------------------------------------------------------------------- the UNet floor
def unet_worker(model: Path, resolution: int, rank: int, precision: str, iters: int, gc: bool) -> None:
    """Runs in its own process: time UNet forward+backward with LoRA, print one JSON line."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    if gc:
        unet.enable_gradient_checkpointing()
    unet.train()
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, resolution // 8, resolution // 8, generator=g)
    target = torch.randn(latents.shape, generator=g)
    cfg = unet.config
    text = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    added = {}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text and the six micro-conditioning time ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32),
        }
    times = []
    for _ in range(iters + 1):  # the first is warm-up
        t = torch.randint(0, 1000, (1,), generator=g)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = unet(latents, t, text, **added).sample
        F.mse_loss(pred.float(), target).backward()
        unet.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    print(json.dumps({"s_per_step": statistics.median(times[1:]), "all": times, "load_s": load_s}))


# ----------------------------------------------------------------------------- process timing
def timed(
    cmd: list[str],
    cwd: Path | None = None,
    allow_failure: bool = False,
    *,
    rss_cap_gb: float | None = None,
    done_file: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Wall time, peak RSS (GB) and output of one process.

    `rss_cap_gb`: stop the command when its processes together hold more than this (a model that
    does not fit must not push the shared machine into the OOM killer); the result says `over_cap`.
    `done_file`: the clock stops when this file is written (its size is steady for a poll) and the
    command is stopped there: what it does afterwards is not timed.
    `env`: the command's environment (default: this one's).
    """
    import psutil

    use_time = Path("/usr/bin/time").is_file()
    full = ["/usr/bin/time", "-v", *cmd] if use_time else cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    start = time.perf_counter()
    proc = subprocess.Popen(full, cwd=cwd, stdout=out, stderr=err, text=True, env=env)
    wall, polled_gb, over_cap, done, last_size, seen = None, 0.0, False, False, -1, None
    while proc.poll() is None:
        time.sleep(0.5)
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            rss = sum(p.memory_info().rss for p in tree if p.is_running()) / 1e9
        except psutil.Error:
            continue
        polled_gb = max(polled_gb, rss)
        size = done_file.stat().st_size if done_file is not None and done_file.is_file() else -1
        if size > 0 and seen is None:
            seen = time.perf_counter() - start
        done = size > 0 and size == last_size
        last_size = size
        over_cap = rss_cap_gb is not None and rss > rss_cap_gb
        if done or over_cap:
            wall = seen if done else time.perf_counter() - start
            # Stop the leaves only, so each parent (and /usr/bin/time) still waits and reports the peak.
            for p in tree:
                try:
                    if not p.children():
                        p.kill()
                except psutil.Error:
                    pass
            break
    proc.wait()
    wall = wall if wall is not None else time.perf_counter() - start
    out.seek(0), err.seek(0)
    stdout, stderr = out.read(), err.read()
    rss_gb = None
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if match:
        rss_gb = int(match.group(1)) / 1e6
    else:  # the largest child so far: right only if this one is the largest
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rss_gb = after / 1e6 if after > before else (polled_gb or None)
    faults = re.search(r"Major \(requiring I/O\) page faults: (\d+)", stderr)
    code = 0 if done else proc.returncode
    if over_cap:
        code = f"over {rss_cap_gb:g} GB: stopped"
    if code != 0 and not allow_failure:
        tail = "\n".join((stdout + stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"command failed ({code}): {shlex.join(cmd)}\n{tail}")
    return {
        "wall_s": wall,
        "rss_gb": rss_gb,
        "stdout": stdout,
        "stderr": stderr,
        "code": code,
        "over_cap": over_cap,
        # Weights are memory-mapped: many major faults mean they were re-read from disk (memory ran short).
        "major_faults": int(faults.group(1)) if faults else None,
    }


def unet_cmd(model: Path, args: argparse.Namespace, precision: str, gc: bool = False) -> list[str]:
    """The floor's worker process (`unet_worker`): its last stdout line is its JSON result."""
    cmd = [
        sys.executable,
        __file__,
        "--worker-unet",
        precision,
        "--model-dir",
        str(model),
        "--resolution",
        str(args.resolution),
        "--rank",
        str(args.rank),
        "--iters",
        str(args.iters),
    ]
    if gc:
        cmd.append("--worker-gc")
    return cmd


def measure_unet(model: Path, args: argparse.Namespace, precision: str, gc: bool = False) -> dict | str:
    run = timed(
        unet_cmd(model, args, precision, gc), rss_cap_gb=args.rss_cap_gb, allow_failure=args.rss_cap_gb is not None
    )
    if run["over_cap"]:
        return f"did not fit: stopped at {run['rss_gb']:.2f} GB peak RSS (cap {args.rss_cap_gb:g} GB)"
    if run["code"]:
        raise RuntimeError(f"UNet floor failed: {run['stderr'].strip().splitlines()[-25:]}")
    result = json.loads(run["stdout"].strip().splitlines()[-1])
    print(f"    steps {', '.join(f'{t:.2f}' for t in result['all'])} s; major page faults {run['major_faults']}")
    return {**result, "rss_gb": run["rss_gb"]}


# ----------------------------------------------------------------------------- sdlora train
def sdlora_help(verb: str) -> str | None:
    proc = subprocess.run(
        [sys.executable, "-m", "sdlora", verb, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    return proc.stdout if proc.returncode == 0 else None


def _first_flag(help_text: str, *candidates: str) -> str | None:
    return next((f for f in candidates if re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text)), None)


def prepare_dataset(work: Path, resolution: int, photos: Path = DREAMBENCH, prepare_args: str = "") -> Path:
    """A prepared dataset at `resolution`: real photos through `sdlora prepare`, else synthetic ones."""
    dataset = work / "dataset"
    prepare_help = sdlora_help("prepare")
    if prepare_help and photos.is_dir():
        cmd = [sys.executable, "-m", "sdlora", "prepare", str(photos), "--out", str(dataset)]
        if "--resolution" in prepare_help:
            cmd += ["--resolution", str(resolution)]
        proc = subprocess.run(cmd + shlex.split(prepare_args), capture_output=True, text=True)
        if proc.returncode == 0:
            return dataset
        if prepare_args:  # asked-for options that fail must not silently become synthetic photos
            raise RuntimeError(f"sdlora prepare failed: {proc.stderr.strip().splitlines()[-1:]}")
        shutil.rmtree(dataset, ignore_errors=True)
    spec = importlib.util.spec_from_file_location("sdlora_bench_conftest", REPO / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return conftest.write_tiny_dataset(dataset, n=10, resolution=resolution)


def add_disk_masks(dataset: Path) -> int:
    """Give every image of a prepared dataset without masks a centred-disk subject mask (masks/<name>,
    recorded in manifest.json as `prepare --masks` records them); the images that got one."""
    import numpy as np
    from PIL import Image

    from sdlora.data.manifest import load_manifest
    from sdlora.data.masks import MASKS

    manifest = load_manifest(dataset)
    if manifest.has_masks:
        return 0
    (dataset / MASKS).mkdir(exist_ok=True)
    for name, rec in manifest.images.items():
        w, h = rec.size
        yy, xx = np.mgrid[:h, :w]
        disk = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (min(h, w) * 0.35) ** 2).astype(np.uint8) * 255
        Image.fromarray(disk, "L").save(dataset / MASKS / name)
        rec.mask, rec.mask_source, rec.mask_coverage = name, {"kind": "file", "path": "bench"}, float(disk.mean() / 255)
    manifest.options["masks"] = {"kind": "folder", "dilate": 0}
    manifest.save(dataset)
    return len(manifest.images)


def train_cmd(help_text: str, model: Path, args: argparse.Namespace, steps: int, train_args: str) -> list[str]:
    steps_flag = _first_flag(help_text, "--steps", "--max-steps", "--max-train-steps")
    if steps_flag is None:
        raise RuntimeError("`sdlora train --help` shows no --steps / --max-steps option")
    cmd = [
        sys.executable,
        "-m",
        "sdlora",
        "train",
        "--model",
        str(model),
        steps_flag,
        str(steps),
        "--resolution",
        str(args.resolution),
        "--rank",
        str(args.rank),
    ]
    # Keep evaluation, samples and checkpoints off the clock (the end-of-run ones cancel in the difference).
    for flag, value in (
        ("--validate-every", "100000"),
        ("--checkpoint-every", "100000"),
        ("--validation-steps", "1"),
        ("--validation-images", "1"),
    ):
        if _first_flag(help_text, flag):
            cmd += [flag, value]
    return cmd + shlex.split(train_args)


def measure_train(model: Path, args: argparse.Namespace, train_args: str) -> dict | str:
    help_text = sdlora_help("train")
    if help_text is None:
        return "not measured: `sdlora train` does not exist yet"
    work = Path(tempfile.mkdtemp(prefix="sdlora-bench-train-"))
    try:
        dataset = prepare_dataset(work, args.resolution, args.photos, args.prepare_args)
        if args.with_masks and add_disk_masks(dataset):
            print("  (centred-disk masks added to the dataset)", flush=True)
        runs = {}
        # A first run fills the latent/text caches, so both timed runs start equally warm.
        for label, steps in [("prime", 1), *[(str(n), n) for n in args.steps]]:
            cwd = work / f"run-{label}"
            cwd.mkdir()
            (cwd / "dataset").symlink_to(dataset)
            runs[label] = timed(
                train_cmd(help_text, model, args, steps, train_args),
                cwd=cwd,
                allow_failure=args.allow_failure or args.rss_cap_gb is not None,
                rss_cap_gb=args.rss_cap_gb,
            )
            if runs[label]["over_cap"]:
                return f"did not fit: stopped at {runs[label]['rss_gb']:.2f} GB peak RSS (cap {args.rss_cap_gb:g} GB)"
            failed = f", EXIT CODE {runs[label]['code']}" if runs[label]["code"] else ""
            print(
                f"  sdlora train {steps} steps: {runs[label]['wall_s']:.1f} s, "
                f"peak RSS {runs[label]['rss_gb']:.2f} GB, major page faults {runs[label]['major_faults']}{failed}",
                flush=True,
            )
            if failed:
                own = runs[label]["stderr"].split("\tCommand being timed:")[0]  # drop /usr/bin/time's report
                print("    " + "\n    ".join(own.strip().splitlines()[-2:]), flush=True)
        small, large = args.steps
        per_step = (runs[str(large)]["wall_s"] - runs[str(small)]["wall_s"]) / (large - small)
        return {
            "s_per_step": per_step,
            "startup_s": runs[str(small)]["wall_s"] - small * per_step,
            "first_run_s": runs["prime"]["wall_s"],
            "rss_gb": max(r["rss_gb"] or 0 for r in runs.values()),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


def diffusers_cmd(
    script: Path, model: Path, photos: Path, out: Path, args: argparse.Namespace, steps: int, precision: str
) -> list[str]:
    """diffusers' train_dreambooth_lora.py at our settings (one process, no validation, no checkpoints)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        precision,
        "--dynamo_backend",
        "no",
        str(script),
        "--pretrained_model_name_or_path",
        str(model),
        "--instance_data_dir",
        str(photos),
        "--instance_prompt",
        "a photo of sksToy toy",
        "--output_dir",
        str(out),
        "--resolution",
        str(args.resolution),
        "--train_batch_size",
        "1",
        "--rank",
        str(args.rank),
        "--learning_rate",
        "1e-4",
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        "100000",
        "--seed",
        "0",
        "--report_to",
        "tensorboard",
        "--mixed_precision",
        precision,
    ]  # needs the tensorboard extra


def measure_diffusers(script: Path, model: Path, args: argparse.Namespace, precision: str) -> dict | str:
    """Marginal s/step, start-up and peak RSS of the diffusers example, on the images sdlora trains on."""
    work = Path(tempfile.mkdtemp(prefix="sdlora-bench-diffusers-"))
    try:
        photos = prepare_dataset(work, args.resolution) / "images"
        runs = {}
        for steps in args.steps:
            out = work / f"out-{steps}"
            runs[steps] = timed(
                diffusers_cmd(script, model, photos, out, args, steps, precision),
                allow_failure=args.rss_cap_gb is not None,
                rss_cap_gb=args.rss_cap_gb,
                done_file=out / "pytorch_lora_weights.safetensors" if ARCHS[args.arch].diffusers_until_saved else None,
            )
            print(
                f"  diffusers example {precision} {steps} steps: {runs[steps]['wall_s']:.1f} s, "
                f"peak RSS {runs[steps]['rss_gb']:.2f} GB, major page faults {runs[steps]['major_faults']}"
                + (f", {runs[steps]['code']}" if runs[steps]["code"] else ""),
                flush=True,
            )
            if runs[steps]["over_cap"]:
                return f"did not fit: stopped at {runs[steps]['rss_gb']:.2f} GB peak RSS (cap {args.rss_cap_gb:g} GB)"
            if runs[steps]["code"]:
                raise RuntimeError(f"diffusers example failed: {runs[steps]['stderr'].strip().splitlines()[-25:]}")
        small, large = args.steps
        per_step = (runs[large]["wall_s"] - runs[small]["wall_s"]) / (large - small)
        return {
            "s_per_step": per_step,
            "startup_s": runs[small]["wall_s"] - small * per_step,
            "rss_gb": max(r["rss_gb"] or 0 for r in runs.values()),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- report
def print_table(rows: list[tuple[str, dict | str]], floor: float | None) -> None:
    """The Markdown table of the rows: s/step, x the fp32 floor, start-up, peak RSS (a str row: why not)."""
    width = max([44, *(len(name) for name, _ in rows)])
    print()
    print(f"| {'what':<{width}} | s/step | x fp32 floor | start-up | peak RSS |")
    print(f"|{'-' * (width + 2)}|--------|--------------|----------|----------|")
    for name, r in rows:
        if isinstance(r, str):
            print(f"| {name:<{width}} | {r} |")
            continue
        ratio = f"{r['s_per_step'] / floor:.2f}" if floor else "-"
        startup = f"{r['startup_s']:.1f} s" if "startup_s" in r else f"load {r['load_s']:.1f} s"
        rss = f"{r['rss_gb']:.2f} GB" if r.get("rss_gb") else "-"
        print(f"| {name:<{width}} | {r['s_per_step']:6.2f} | {ratio:>12} | {startup:>8} | {rss:>8} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", choices=CPU_ARCHS, default="sd15", help="the architecture of the random-weight model (ARCHS)"
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="model folder (built once if missing)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3, help="timed UNet steps after one warm-up")
    parser.add_argument("--steps", type=int, nargs=2, default=[2, 7], help="the two sdlora train step counts")
    parser.add_argument(
        "--train-args",
        action="append",
        default=None,
        help="extra `sdlora train` options, one string; repeat to time several variants",
    )
    parser.add_argument("--photos", type=Path, default=DREAMBENCH, help="photo folder for `sdlora prepare`")
    parser.add_argument("--prepare-args", default="", help="extra `sdlora prepare` options, one string")
    parser.add_argument(
        "--mask-rows",
        action="store_true",
        help="rows for the plain step, --masked-loss and --preservation dop (implies --with-masks)",
    )
    parser.add_argument(
        "--with-masks", action="store_true", help="give a dataset without masks centred-disk subject masks"
    )
    parser.add_argument(
        "--floor-precisions",
        nargs="+",
        choices=["fp32", "bf16"],
        default=["fp32", "bf16"],
        help="the UNet floor rows: fp32 and/or bf16 autocast",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="also time the UNet floor with it")
    parser.add_argument(
        "--rss-cap-gb",
        type=float,
        default=20.0,
        help="stop a timed process over this peak RSS and report the row as not fitting (0: no cap)",
    )
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument(
        "--allow-failure",
        action="store_true",
        help="keep timing when `sdlora train` exits non-zero (e.g. a stage after the steps is missing)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch datasets and runs")
    parser.add_argument(
        "--diffusers-script",
        type=Path,
        default=None,
        help="diffusers' examples/dreambooth/train_dreambooth_lora.py (--arch sdxl: train_dreambooth_lora_sdxl.py): "
        "time it at the same settings",
    )
    parser.add_argument(
        "--diffusers-precision", default="no", choices=["no", "bf16"], help="mixed precision for the diffusers example"
    )
    parser.add_argument("--worker-unet", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-gc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.rss_cap_gb = args.rss_cap_gb or None
    model = args.model_dir or default_cache(args.arch)
    if args.worker_unet:
        unet_worker(model, args.resolution, args.rank, args.worker_unet, args.iters, args.worker_gc)
        return
    if args.steps[1] <= args.steps[0]:
        parser.error("--steps needs two counts, the second larger")
    if args.mask_rows:
        args.with_masks = True
        args.train_args = (args.train_args or []) + [
            "--no-masked-loss",
            "--masked-loss",
            "--no-masked-loss --preservation dop",
        ]

    spec = ARCHS[args.arch]
    if args.diffusers_script and args.diffusers_script.name != spec.diffusers_script:
        print(f"note: {spec.label} is usually compared with diffusers' {spec.diffusers_script}", flush=True)
    model.parent.mkdir(parents=True, exist_ok=True)
    build_random(args.arch, model)
    print(
        f"{spec.label}-size model {model}; {args.resolution} px, batch 1, LoRA rank {args.rank} on "
        f"{', '.join(LORA_TARGETS)}; {os.cpu_count()} CPUs",
        flush=True,
    )
    rows: list[tuple[str, dict | str]] = []
    if not args.skip_unet:
        for precision in args.floor_precisions:
            rows.append(
                (
                    f"UNet fwd+bwd, {precision}" + (" autocast" if precision == "bf16" else ""),
                    measure_unet(model, args, precision),
                )
            )
            r = rows[-1][1]
            print(f"  {rows[-1][0]}: " + (r if isinstance(r, str) else f"{r['s_per_step']:.2f} s"), flush=True)
        if args.gradient_checkpointing:
            rows.append(("UNet fwd+bwd, fp32, grad. checkpointing", measure_unet(model, args, "fp32", gc=True)))
    if not args.skip_train:
        for train_args in args.train_args or [""]:
            label = "sdlora train" + (f" {train_args}" if train_args else " (defaults)")
            print(label, flush=True)
            rows.append((label, measure_train(model, args, train_args)))
    if args.diffusers_script:
        rows.append(
            (
                f"diffusers {args.diffusers_script.name} ({args.diffusers_precision})",
                measure_diffusers(args.diffusers_script, model, args, args.diffusers_precision),
            )
        )

    floor = next(
        (r["s_per_step"] for name, r in rows if name.startswith("UNet") and "fp32" in name and isinstance(r, dict)),
        None,
    )
    print_table(rows, floor)


if __name__ == "__main__":
    main()
