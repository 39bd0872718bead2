"""The GPU benchmark in one call: `sdlora train`, sample and score on real SD 1.5 / SDXL / FLUX.1 architectures.

A GPU machine is lent only now and then, for minutes, with PyTorch, transformers, peft and
accelerate but without diffusers, open_clip, pillow-heif, imagehash or sdlora, and it cannot
download. So the run is prepared here and needs nothing there:

    # 1. here (the development machine, with network): fill .gpu-carry/ (git-ignored, < 64 MiB)
    python benchmarks/gpu.py --prepare-carry --diffusers-repo /path/to/diffusers  # a checkout or bare git dir

    # 2. there, from the repository root, with .gpu-carry/ carried along (one call, under 8 minutes)
    bash benchmarks/gpu.sh            # = python3 benchmarks/gpu.py, output in $OUT (else ./gpu-bench)
    bash benchmarks/gpu.sh --only '*flux1-512*,sdlora-flux1-1024-b1-bf16'   # a second call (below)

    # the plan, each row's estimated H100 seconds and the running total; on the CPU, at tiny size (the test)
    python benchmarks/gpu.py --list
    python benchmarks/gpu.py --tiny --out /tmp/gpu-bench

`--prepare-carry` downloads (`pip download --no-deps`, for the GPU machine's Python, 3.12 by
default) the wheels of every package sdlora and the diffusers examples need that the GPU
machine lacks, pinned to the versions installed here, and their missing dependencies in turn;
builds a wheel of sdlora itself; and copies diffusers' `examples/dreambooth/train_dreambooth_lora.py`
and `train_dreambooth_lora_flux.py` from a local diffusers repository (the revision of the
installed diffusers if the repository has it, else its newest). The FLUX example needs no more
wheels: its imports are the SD one's, and the T5 tokenizer it loads is the folder's tokenizer.json
(no SentencePiece model, so neither sentencepiece nor protobuf; the GPU machine has both anyway).
It prints the folder's size and fails if it is over 64 MiB.

There, the script installs `.gpu-carry/*.whl` with `pip install --no-deps --no-index --target`
into a scratch folder put on `PYTHONPATH` (the worktree's `src/` goes first, so the code
measured is the checkout's; the sdlora wheel serves runs outside one). It builds random-weight
models of the real architectures (same compute as the real ones; no download), saves each once
to a scratch folder (`--work`, the machine's local disk) that every row of that model reuses,
writes a few synthetic phone-size photos, runs `sdlora prepare`, then each configuration below,
and prints one table, also written as `gpu-bench.json` and `gpu-bench.md` under `--out`
(default `$OUT`, else `./gpu-bench`), after every row, so a run cut short still leaves its table.

FLUX.1 [dev] (benchmarks/train_speed.py ARCHS["flux1"], its published configs and parameter
counts): the transformer (19 double + 38 single blocks, 3072 wide, guidance embedding; 11.9 B),
the 16-channel VAE, CLIP-L and T5-XXL's encoder (4.76 B), initialised on the GPU directly in bf16
(no fp32 copy) and saved once as bf16 safetensors: 33.7 GB, about a minute. T5-XXL stays full
size although sdlora runs it once, at start-up, to encode the captions (the training steps read
the cached embeddings): a smaller T5 would not change s/step, but it would change start-up and
the peak GPU memory of the diffusers rows, whose example holds T5 on the GPU beside the
transformer before it encodes (sdlora encodes first, then moves the transformer there), and both
are in the table. The disk (64 GB) holds all three models (52 GB) only just: before a build,
models no later row wants are removed if the disk is short, and a build that cannot fit fails at
once (its rows say so) rather than after writing most of it.

Rows (`--only` / `--skip` take comma-separated id patterns, e.g. `--only 'sdlora-sdxl-*'`):
- `unet-*` / `transformer-*`: the floor, the bare denoiser forward+backward with LoRA (rank 16 on
  sdlora's default targets: the UNets' to_q/k/v/out; FLUX.1's both streams' attention
  projections) at that batch and resolution, frozen weights in the compute dtype under autocast,
  no gradient checkpointing, timed in-process (median of 10 after warm-up; peak GPU memory is
  `torch.cuda.max_memory_allocated`). FLUX.1's forward is the family's own `denoise` (latents
  packed into 2x2 tokens, T5 states padded to 512 tokens, guidance 1.0), as `sdlora train` calls
  it. Its FLOPs, counted with `torch.utils.flop_counter.FlopCounterMode` on one such step, are
  the "denoiser TFLOP/step" of every row at that model, resolution and batch. Consecutive floors
  of one model share its loaded denoiser (FLUX.1's: loaded in its saved bf16).
- `sdlora-*`: `sdlora train` as whole processes. SD: at two step counts (`--steps`,
  `--sdxl-steps`): s/step is the marginal time between them (start-up, model load and caching
  cancel; start-up is reported apart), as ../shared/PERFORMANCE.md says, and "in-loop s/step" is
  the median `step_time_s` of the longer run's metrics.jsonl. FLUX.1: one process of
  `--flux-steps` (10) steps, its s/step the in-loop median (the first step, warm-up, left out) and
  its start-up the process's wall time less steps x s/step: FLUX.1's start-up is about a minute,
  too long to pay twice per row. Peak GPU memory is the largest `cuda_peak_gb` (the whole
  process's: encoding included). Validation sampling and checkpoints are off
  (`validation.prompts=[]`, `--checkpoint-every 0`; the validation loss at the end stays),
  latents are not cached on disk (`--no-cache`: each run encodes the images once, in memory),
  everything else is sdlora's default (so pivotal tuning is on for SD; FLUX.1 has none). SD 1.5
  at 512 px, batch 1 and 4, bf16 and fp16; SDXL at 1024 px, batch 1, bf16, with and without
  gradient checkpointing; SD 1.5 bf16 batch 4 with `--compile` (regional: the UNet's transformer
  blocks): each of its two runs compiles cold (an inductor cache of its own), so the compile time
  cancels out of s/step and shows in start-up s. FLUX.1 at 1024 and 512 px, batch 1, bf16 with
  and without gradient checkpointing, and the fp8 base (`--base-precision fp8 --mixed-precision
  bf16`, precision "fp8") with it: an fp8 base is for small cards, where checkpointing is on
  anyway. Without `--base-precision` in `sdlora train --help` (an sdlora older than these rows),
  the fp8 rows are skipped, saying so.
- `diffusers-*`: diffusers' DreamBooth LoRA example for the model (the carried script) at the
  same settings, images, rank 16, the same step counts, run directly (one process, as
  `accelerate launch` does for one GPU), with an in-loop clock (a global optimizer-step hook,
  synchronised) and its peak GPU memory at exit. SD 1.5: 512 px, batch 4, bf16; it re-encodes
  every image with the VAE at every step. FLUX.1 (`train_dreambooth_lora_flux.py`): 1024 px with
  gradient checkpointing and 512 px without, bf16, one process like sdlora's; given sdlora's
  LoRA targets (`--lora_layers`; its default adds the feed-forward layers) and alpha, guidance
  1.0 and `--cache_latents` (latents encoded once, as sdlora does); it is stopped once its LoRA
  is saved, before its final inference (which reloads the whole 33.5 GB pipeline). Its LoRA
  weights are bf16 (it upcasts them only for fp16), sdlora's fp32.
- `sample-*` / `score-*`: one `sdlora sample` (LoRA and baseline images, fp16 on CUDA) and one
  `sdlora score` of them, timed as whole processes (start-up included). The scorers are the
  real DINO / CLIP when they are in the Hugging Face cache, else tiny-dino / tiny-clip (noted).
"images/s" is batch / s/step; "x floor" is s/step over the floor's at the same model,
resolution and batch (floors are timed in bf16, for the fp16 and fp8 rows too); "% bf16 peak"
is denoiser TFLOP/step / s/step over the card's dense bf16 peak (from a small table by
`torch.cuda.get_device_name()`, e.g. H100 989 TFLOP/s; `--peak-tflops` overrides), so it
counts only the denoiser's work, never the VAE's or gradient checkpointing's recompute.
"row s" is the row's own wall time (its model's build included), "est. s" its estimate.

Budget. Rows run in the table's order, the most wanted first. Each is guarded: a failure shows
its error (one line) and the rest still run. A row starts only while `--budget-s` lasts
(default 420 s, counted from the start, installing included) and only if its estimate (plus
its model's build, for the first row of a model) ends within 60 s past it; others are marked
skipped (a later, cheaper one may still start), and one in flight is stopped 60 s past it;
rerun those with `--only`. The estimates (H100 SXM; `--list` prints them, the builds counted
once, with running totals) are not measurements: FLUX.1's step costs, from its shapes, a
forward of 12.9 GFLOP per token (24 D^2 per block, 57 blocks, D 3072) plus attention
(4 N^2 D per block): at 1024 px (4096 image + 512 text tokens) about 74 TFLOP forward, 170 a
LoRA step (forward, input gradients, flash attention's backward), 245 with gradient
checkpointing; at 512 px (1536 tokens) 45 and 67. At about 45% of the dense bf16 peak (an
8192^3 bf16 matmul ran at 798 of 989 TFLOP/s on this H100) that is 0.4 / 0.55 s/step at
1024 px and 0.13 / 0.19 at 512, so 10 steps are 1-6 s of a FLUX.1 row: the row is its start-up,
estimated at 55-60 s (imports 8, loading the 33.5 GB folder, 30: the example loads it into
fp32, 67 GB, where `sdlora train` now streams the transformer straight into bf16 or fp8, so its
rows may start faster; T5 to the GPU and encoding 5; the transformer to the GPU 8; the end 5),
65-75 s a row, the
build 60, the floors 20 (1024 px, loading the transformer) and 5 (512 px, sharing it). SD's
rows are estimated from the same kind of arithmetic (SD 1.5 start-up about 18 s, SDXL 35, a
compile 60). Measured on the development machine (2 busy CPU cores), for two of T5-XXL's 24
layers (1.03 GB in bf16): a bf16 load 20 GB/s, a load cast to fp32 0.43 GB/s of the file (78 s
for FLUX.1's 33.5 GB at that rate; the GPU machine's 16 cores should do it in 10-30 s), a save
0.7 GB/s (47 s for 33.7 GB), a CPU init 24 s (why the build initialises on the GPU, and falls
back to the CPU only when the GPU is out of memory). By these, the default call (`--list`: 465 s) runs FLUX.1's floors, its 1024 px
row with gradient checkpointing beside diffusers', the fp8 one, then SD 1.5's floors, batch 4
row beside diffusers', sample and score; the rest are skipped. A second call, `--only
'*flux1-512*,sdlora-flux1-1024-b1-bf16'` (390 s), runs FLUX.1's other rows; a third, `--only
'unet-sdxl-*,sdlora-sdxl-*,sdlora-sd15-512-b1-bf16'` (250 s), SDXL's and SD 1.5's batch 1; a
fourth, `--only 'unet-sd15-*,*-compile,*-fp16'` (280 s), the compile and fp16 rows. "row s"
beside "est. s" in the first table will say how far off these are.

`--tiny` runs the rows on the CPU with tiny-sd / tiny-sdxl / tiny-flux at 64 px, 1 and 2 steps
(FLUX.1: 2, in one process), fp32, one torch thread: one `sdlora train` row per model (SD batch
4; SDXL and FLUX.1 with gradient checkpointing), the FLUX.1 fp8 row where `sdlora train` has
`--base-precision`, the floors and the compile row; no fp16 rows, no diffusers rows unless the
scripts are there (`--diffusers-dir`). It calls the sdlora verbs in-process (one import) so it
stays a quick test (`--processes`: as processes, as on the GPU); its compile row (last) spends
about 40 s compiling on a CPU, so the default test skips it and a slow one runs it. Its numbers
only prove that the script works.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fnmatch
import importlib.metadata
import importlib.util
import io
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import ARCHS, LORA_TARGETS, build_random  # noqa: E402  (benchmarks/ is a folder of scripts)

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu-carry"
DIFFUSERS_EXAMPLES = "examples/dreambooth/"
CARRY_LIMIT = 64 * 2**20
GIB = 2**30
RANK = 16
PROMPT = "sksToy on a beach"
GRACE_S = 60  # how far past --budget-s a row already started may run
INSTALL_S = 10  # estimated: installing the carried wheels there, the first thing the budget pays

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in order against the device name.
BF16_PEAK_TFLOPS = [
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
]

# What the GPU machine already holds (the device guide's package list, 2026-11): never carried.
GPU_MACHINE_HAS = {
    "accelerate", "certifi", "charset-normalizer", "click", "filelock", "fsspec", "huggingface-hub",
    "idna", "jinja2", "markdown-it-py", "mdurl", "numpy", "nvidia-ml-py", "packaging", "peft", "pillow",
    "protobuf", "psutil", "pygments", "pyyaml", "regex", "requests", "rich", "safetensors", "scipy",
    "sentencepiece", "shellingham", "tensorboard", "timm", "tokenizers", "torch", "torchvision", "tqdm",
    "transformers", "typer", "typing-extensions", "urllib3", "zipp",
}  # fmt: skip


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ============================================================================ the carry (dev machine)
def _wheel_requirements(wheel: Path, python_version: str) -> list[Any]:
    """Requires-Dist of a wheel that apply on Linux x86-64 at `python_version`, extras left out."""
    import zipfile

    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode("utf-8").splitlines()
    env = {"python_version": python_version, "python_full_version": python_version + ".0", "extra": ""}
    env.update(sys_platform="linux", platform_system="Linux", platform_machine="x86_64", os_name="posix")
    reqs = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                reqs.append(req)
    return reqs


def _pip_download(names: list[str], dest: Path, python_version: str) -> None:
    tag = "cp" + python_version.replace(".", "")
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    cmd += [
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "--abi",
        tag,
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for platform in [*platforms, "any"]:
        cmd += ["--platform", platform]
    subprocess.run(cmd + names, check=True)


def _pinned(name: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name)}"  # what was tested here
    except importlib.metadata.PackageNotFoundError:
        return name


def _diffusers_script(repo: Path, name: str, dest: Path) -> str:
    """Copy a DreamBooth LoRA example from a diffusers checkout or git dir; returns its revision."""
    path = DIFFUSERS_EXAMPLES + name
    if (repo / path).is_file():
        shutil.copyfile(repo / path, dest)
        return f"working tree {repo}"
    version = importlib.metadata.version("diffusers")
    minor = ".".join(version.split(".")[:2])
    git = ["git", "--git-dir", str(repo / ".git" if (repo / ".git").exists() else repo)]
    for ref in (f"v{version}", f"v{version}-patch", f"v{version}-release", f"v{minor}.0-release", "HEAD"):
        show = subprocess.run([*git, "show", f"{ref}:{path}"], capture_output=True)
        if show.returncode == 0:
            dest.write_bytes(show.stdout)
            commit = subprocess.run([*git, "rev-parse", ref], capture_output=True, text=True).stdout.strip()
            return f"{ref} ({commit}) of {repo}"
    raise SystemExit(f"error: {repo} has no {path} (give a diffusers checkout or git dir)")


def prepare_carry(carry: Path, diffusers_repo: Path | None, python_version: str, extra: list[str]) -> None:
    """Fill `carry` with the wheels the GPU machine lacks, an sdlora wheel and the diffusers examples."""
    carry.mkdir(parents=True, exist_ok=True)
    for old in carry.glob("*.whl"):  # one version of each, or the install there stops
        old.unlink()
    print(f"building the sdlora wheel from {REPO} ...", flush=True)
    leftovers = [p for p in (REPO / "build", REPO / "src" / "sdlora.egg-info") if not p.exists()]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(carry), str(REPO)],
        check=True,
    )
    for path in leftovers:  # setuptools' scratch folders, if this build made them
        shutil.rmtree(path, ignore_errors=True)
    # Resolve what is missing there, wheel by wheel: sdlora's needs, then theirs.
    have = set(GPU_MACHINE_HAS)
    queue = [canonical(r.name) for r in _wheel_requirements(next(carry.glob("sdlora-*.whl")), python_version)]
    queue += [canonical(e.split("=")[0].split("<")[0].split(">")[0]) for e in extra]
    wanted: dict[str, str] = {canonical(e.split("=")[0].split("<")[0].split(">")[0]): e for e in extra}
    done = {"sdlora"}
    while queue:
        batch = [n for n in dict.fromkeys(queue) if n not in done and (n not in have or n in wanted)]
        queue = []
        if not batch:
            break
        specs = [wanted.get(n) or _pinned(n) for n in batch]
        print("downloading " + " ".join(specs), flush=True)
        _pip_download(specs, carry, python_version)
        done.update(batch)
        for wheel in carry.glob("*.whl"):
            name = canonical(wheel.name.split("-")[0])
            if name in batch:
                queue += [canonical(r.name) for r in _wheel_requirements(wheel, python_version)]
    assumed = sorted(
        {
            canonical(r.name)
            for w in carry.glob("*.whl")
            for r in _wheel_requirements(w, python_version)
            if canonical(r.name) not in done
        }
    )
    print("assumed on the GPU machine: " + ", ".join(assumed))
    for name in DIFFUSERS_SCRIPTS.values():
        (carry / name).unlink(missing_ok=True)
        if diffusers_repo:
            source = _diffusers_script(diffusers_repo, name, carry / name)
            (carry / (name + ".source")).write_text(source + "\n", encoding="utf-8")
            print(f"diffusers example {name}: {source}")
    if not diffusers_repo:
        print("no --diffusers-repo: the diffusers example rows will be missing there")
    files = sorted(p for p in carry.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for p in files:
        print(f"  {p.stat().st_size / 2**20:7.2f} MiB  {p.relative_to(carry)}")
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, text=True).stdout
    tree = sum((REPO / f).stat().st_size for f in listed.split("\0") if f and (REPO / f).is_file())
    mib = 2**20
    print(f"{carry}: {len(files)} files, {total / mib:.1f} MiB; with the tracked tree {(total + tree) / mib:.1f} MiB")
    if total + tree > CARRY_LIMIT:
        raise SystemExit(
            f"error: {carry} ({total / mib:.1f} MiB) and the tree ({tree / mib:.1f} MiB) are over the "
            f"{CARRY_LIMIT / mib:.0f} MiB that travels: carry fewer packages"
        )


# ============================================================================ setting up (GPU machine)
def install_carry(carry: Path, site: Path) -> None:
    """Install the carried wheels into `site` (no index, no dependencies) and put it on the path."""
    wheels = sorted(carry.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {carry}: using what this interpreter has (run --prepare-carry on a machine with pip)")
    else:
        print(f"installing {len(wheels)} wheels from {carry} into {site} ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        subprocess.run([*cmd, "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()


def use_checkout() -> None:
    """The worktree's sdlora first, in this process and in every child."""
    src = str(REPO / "src")
    sys.path.insert(0, src)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def unmet_requirements(names: tuple[str, ...] = ("sdlora", "diffusers", "open_clip_torch", "pillow_heif")) -> list[str]:
    """Requirements of sdlora and the carried packages that this interpreter does not meet."""
    from packaging.requirements import Requirement

    reqs = []
    for name in names:
        try:
            reqs += importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            reqs.append(name)
    unmet = []
    for line in dict.fromkeys(reqs):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{req.name} (missing)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{req} (have {have})")
    return unmet


# ============================================================================ models and photos
def build_model(key: str, folder: Path, device: str) -> Path:
    """Build a random-weight model folder, initialising on the GPU when there is one (much faster)."""
    import torch

    def build(device: str) -> Path:
        return build_random(key, folder, device)

    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(folder.name + ".partial")  # build_random's scratch name
    try:
        return build(device)
    except torch.OutOfMemoryError as exc:  # too little GPU memory: build on the CPU instead (minutes for FLUX.1)
        if device == "cpu":
            raise
        print(f"  building on {device} failed ({one_line(str(exc))}); building on the CPU", flush=True)
        return build("cpu")
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # a failed build's part-written folder (disk full) goes
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def write_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """Synthetic portrait 'phone photos': a round object on noisy, cluttered backgrounds, all different."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    for i in range(n):
        bg = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        img = Image.blend(bg, Image.effect_noise(size, 40).convert("RGB"), 0.3)
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(w // 30 + 1, w // 6 + 2)
            draw.rectangle([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
        cx, cy = w // 2 + rng.randrange(-w // 10, w // 10 + 1), h // 2 + rng.randrange(-h // 10, h // 10 + 1)
        r = rng.randrange(w // 5, w // 3)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(folder / f"photo_{i:02d}.jpg", quality=90)
    return folder


# ============================================================================ the denoiser floor and its FLOPs
def _unet_step(unet: Any, device: str, resolution: int, batch: int, g: Any) -> tuple[Any, Any]:
    """The UNet's inputs (SDXL: pooled text and time ids too) and its forward: (target, forward)."""
    import torch

    cfg = unet.config
    latents = torch.randn(batch, cfg.in_channels, resolution // 8, resolution // 8, generator=g, device=device)
    text = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g, device=device)
    kwargs: dict[str, Any] = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g, device=device),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch)
            .float()
            .to(device),
        }
    timesteps = torch.randint(0, 1000, (batch,), generator=g, device=device)
    return torch.randn(
        latents.shape, generator=g, device=device
    ), lambda: unet(latents, timesteps, text, **kwargs).sample


def _flux_step(transformer: Any, device: str, resolution: int, batch: int, g: Any) -> tuple[Any, Any]:
    """FLUX.1's inputs as `sdlora train` gives them (T5 states padded to the 512-token window, CLIP's pooled
    output, a sigma, guidance on [dev]) and its forward through the family's own `denoise` (packing included)."""
    import torch

    from sdlora.models.families.flux import FLUX1, T5_WINDOW

    cfg = transformer.config
    latents = torch.randn(batch, cfg.in_channels // 4, resolution // 8, resolution // 8, generator=g, device=device)
    embeds = torch.randn(batch, T5_WINDOW, cfg.joint_attention_dim, generator=g, device=device)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g, device=device)
    sigmas = torch.rand(batch, generator=g, device=device)
    target = torch.randn(latents.shape, generator=g, device=device)
    return target, lambda: FLUX1.denoise(transformer, latents, sigmas, embeds, pooled, None)


def denoiser_probe(
    denoiser: Any, model: str, device: str, resolution: int, batch: int, precision: str, iters: int
) -> dict[str, Any]:
    """FLOPs, median time and peak memory of one denoiser forward+backward with LoRA (in this process)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    denoiser.to(device)
    if dtype != torch.float32:
        denoiser.to(dtype=dtype)  # frozen weights in the compute dtype, as the diffusers examples keep them
    for p in denoiser.parameters():  # LoRA weights stay fp32, as in training
        if p.requires_grad:
            p.data = p.data.float()
    g = torch.Generator(device).manual_seed(0)
    target, forward = (_flux_step if model == "flux1" else _unet_step)(denoiser, device, resolution, batch, g)
    cuda = device.startswith("cuda")

    def step() -> None:
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            pred = forward()
        F.mse_loss(pred.float(), target).backward()
        denoiser.zero_grad(set_to_none=True)

    def synced() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    step()  # warm-up (kernel selection, allocator)
    with FlopCounterMode(display=False) as counter:
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = synced()
        step()
        times.append(synced() - start)
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    return {"flops": counter.get_total_flops(), "s_per_step": statistics.median(times), "peak_gpu_gb": peak}


def lora_targets(model: str) -> list[str]:
    """The modules `sdlora train` puts its LoRA on by default: the UNets' attention, FLUX.1's both streams'."""
    if model == "flux1":
        from sdlora.models.families.flux import FLUX1

        return list(FLUX1.lora_targets)
    return LORA_TARGETS


def load_denoiser_with_lora(key: str, model: str) -> Any:
    """The UNet or transformer of `model` (a folder, or a tiny model's name), frozen, with a rank-RANK LoRA."""
    from peft import LoraConfig

    if model.startswith("tiny-"):
        from sdlora.models.loading import load_pipeline

        pipe, family = load_pipeline(model)
        denoiser = getattr(pipe, family.denoiser)
    elif key == "flux1":
        import torch
        from diffusers import FluxTransformer2DModel

        from sdlora.models.loading import dtype_kwargs

        # In its saved bf16: no fp32 copy of 12 B parameters (47.6 GB) on the way to the GPU.
        denoiser = FluxTransformer2DModel.from_pretrained(
            model, subfolder="transformer", **dtype_kwargs(torch.bfloat16)
        )
    else:
        from diffusers import UNet2DConditionModel

        denoiser = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    denoiser.requires_grad_(False)
    targets = lora_targets(key)
    denoiser.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=targets))
    denoiser.train()
    return denoiser


# ============================================================================ running the verbs
@dataclass
class Proc:
    code: int | str  # exit status, or "timeout"
    output: str
    wall_s: float


def one_line(text: str, limit: int = 220) -> str:
    """The line of a command's output that says what went wrong (box drawing and tracebacks left out)."""
    lines = [ln.strip().strip("│╭╮╰╯┃").strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not set(ln) <= set("─━═-╭╮╰╯│ ")]
    pattern = re.compile(r"(^error\b|^\w+(Error|Exception|Interrupt)\b|No such option|^Error\b|Usage:)", re.I)
    picked = next((ln for ln in reversed(lines) if pattern.search(ln) and not ln.startswith("Usage:")), None)
    line = picked or (lines[-1] if lines else "(no output)")
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Runner:
    """Runs `sdlora` verbs as processes (GPU mode) or in this process (--tiny), and other commands."""

    def __init__(self, in_process: bool, deadline: float):
        self.in_process = in_process
        self.deadline = deadline

    def timeout(self) -> float:
        return max(30.0, self.deadline + GRACE_S - time.monotonic())

    def sdlora(self, argv: list[str]) -> Proc:
        if not self.in_process:
            return self.command([sys.executable, "-m", "sdlora", *argv])
        from sdlora.cli import app

        buf, code = io.StringIO(), 0
        start = time.perf_counter()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                app(argv, prog_name="sdlora")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except Exception as exc:  # noqa: BLE001 (a row's failure is reported, never fatal)
                code = 1
                print(f"{type(exc).__name__}: {exc}", file=buf)
        return Proc(code, buf.getvalue(), time.perf_counter() - start)

    def command(self, cmd: list[str], cwd: Path | None = None) -> Proc:
        start = time.perf_counter()
        env = {**os.environ, "COLUMNS": "160", "PYTHONUNBUFFERED": "1"}
        try:
            done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=self.timeout())
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            return Proc("timeout", out + f"\nerror: timed out after {exc.timeout:.0f} s", time.perf_counter() - start)
        return Proc(done.returncode, done.stdout + done.stderr, time.perf_counter() - start)


class RowError(Exception):
    """One row failed: its message is the table's one line."""


def checked(proc: Proc, what: str) -> Proc:
    if proc.code != 0:
        raise RowError(f"{what}: exit {proc.code}: {one_line(proc.output)}")
    return proc


# ============================================================================ the rows
@dataclass(frozen=True)
class Model:
    """One benchmark model: how the table names it, its tiny stand-in, and what it costs to make."""

    label: str
    tiny: str  # the model --tiny uses instead
    resolution: int  # its native training resolution, px
    disk_gb: float  # its random-weight folder (SD: fp32, as train_speed.build_random saves them; FLUX.1: bf16)
    build_s: float  # estimated H100 seconds to build and save it (added to the first row that needs it)
    # s/step from one process's in-loop steps: FLUX.1's start-up (loading 33.5 GB and casting it to fp32,
    # encoding with T5-XXL) is about a minute, too long to pay twice per row for the marginal time.
    one_process: bool = False


MODELS = {
    "sd15": Model("SD 1.5", "tiny-sd", 512, 4.3, 10),
    "sdxl": Model("SDXL", "tiny-sdxl", 1024, 13.9, 25),
    "flux1": Model("FLUX.1 [dev]", "tiny-flux", 1024, 33.7, 60, one_process=True),
}
DIFFUSERS_SCRIPTS = {key: ARCHS[key].diffusers_script for key in ("sd15", "flux1")}  # the examples compared
FLOOR_KINDS = ("unet", "transformer")  # the denoiser's bare forward+backward
TRAIN_KINDS = ("sdlora", "diffusers")


@dataclass
class Spec:
    id: str
    kind: str  # unet / transformer (the floors), sdlora, diffusers, sample, score
    model: str  # a MODELS key
    resolution: int
    batch: int
    precision: str  # bf16, fp16, fp32; fp8: the base weights in fp8 (--base-precision fp8), bf16 compute
    gc: bool = False
    compile: bool = False
    est_s: float = 0.0  # estimated H100 seconds (the model's build not counted); 0 with --tiny


@dataclass
class Row:
    id: str
    what: str
    model: str
    resolution: int
    batch: int | None
    precision: str
    compile: str
    s_per_step: float | None = None
    in_loop_s_per_step: float | None = None
    images_per_s: float | None = None
    peak_gpu_gb: float | None = None
    denoiser_tflop_per_step: float | None = None
    x_floor: float | None = None
    peak_fraction: float | None = None
    startup_s: float | None = None
    row_s: float | None = None  # the row's own wall time (its model's build included)
    est_s: float | None = None  # its estimate (build included), to check the estimates against
    note: str = ""
    error: str | None = None
    skipped: bool = False


def specs(tiny: bool, diffusers: set[str], fp8: bool) -> list[Spec]:
    """The plan in the table's order, the most wanted first (see the docstring for the estimates).

    `diffusers`: the models whose diffusers example is there; `fp8`: whether `sdlora train` has
    `--base-precision` (without it: no fp8 rows with --tiny; skipped rows on the GPU, `Bench.cannot_start`)."""

    def s(
        kind: str,
        model: str,
        batch: int,
        precision: str,
        est: float,
        res: int = 0,
        gc: bool = False,
        compile: bool = False,
    ) -> Spec:
        res = 64 if tiny else res or MODELS[model].resolution
        name = MODELS[model].tiny if tiny else model
        sid = f"{kind}-{name}-{res}" + ("" if kind in ("sample", "score") else f"-b{batch}-{precision}")
        sid += "-gc" * gc + "-compile" * compile
        return Spec(sid, kind, model, res, batch, precision, gc, compile, 0.0 if tiny else est)

    if tiny:
        # --tiny checks the script's paths, not every configuration: one sdlora row per model (SD batch 4;
        # SDXL and FLUX.1 with gradient checkpointing), so the test stays quick; the compile row is last.
        rows = [s("unet", "sd15", 1, "fp32", 0), s("unet", "sd15", 4, "fp32", 0), s("sdlora", "sd15", 4, "fp32", 0)]
        rows += [s("diffusers", "sd15", 4, "fp32", 0)] if "sd15" in diffusers else []
        rows += [s("sample", "sd15", 1, "fp32", 0), s("score", "sd15", 1, "fp32", 0)]
        rows += [s("unet", "sdxl", 1, "fp32", 0), s("sdlora", "sdxl", 1, "fp32", 0, gc=True)]
        rows += [s("transformer", "flux1", 1, "fp32", 0), s("sdlora", "flux1", 1, "fp32", 0, gc=True)]
        rows += [s("sdlora", "flux1", 1, "fp8", 0)] if fp8 else []
        rows += [s("diffusers", "flux1", 1, "fp32", 0, gc=True)] if "flux1" in diffusers else []
        return rows + [s("sdlora", "sd15", 4, "fp32", 0, compile=True)]

    # The GPU plan: FLUX.1's headline rows (1024 px with gradient checkpointing, beside diffusers', and
    # the fp8 base), then SD 1.5's, fill the default --budget-s; the rest run in later calls (docstring).
    flux = [s("transformer", "flux1", 1, "bf16", 20), s("transformer", "flux1", 1, "bf16", 5, res=512)]
    flux += [s("sdlora", "flux1", 1, "bf16", 65, gc=True)]
    flux += [s("diffusers", "flux1", 1, "bf16", 65, gc=True)] if "flux1" in diffusers else []
    flux += [s("sdlora", "flux1", 1, "fp8", 75, gc=True)]
    sd15 = [s("unet", "sd15", 1, "bf16", 6), s("unet", "sd15", 4, "bf16", 4), s("sdlora", "sd15", 4, "bf16", 50)]
    sd15 += [s("diffusers", "sd15", 4, "bf16", 60)] if "sd15" in diffusers else []
    sd15 += [s("sample", "sd15", 1, "bf16", 20), s("score", "sd15", 1, "bf16", 15)]
    more_flux = [s("sdlora", "flux1", 1, "bf16", 60, res=512)]
    more_flux += [s("diffusers", "flux1", 1, "bf16", 60, res=512)] if "flux1" in diffusers else []
    more_flux += [s("sdlora", "flux1", 1, "bf16", 65), s("sdlora", "flux1", 1, "bf16", 60, res=512, gc=True)]
    more_flux += [s("sdlora", "flux1", 1, "fp8", 70, res=512, gc=True)]  # an fp8 base is for small cards: gc on
    sdxl = [s("unet", "sdxl", 1, "bf16", 8), s("sdlora", "sdxl", 1, "bf16", 80, gc=True)]
    sdxl += [s("sdlora", "sdxl", 1, "bf16", 75)]
    rest = [s("sdlora", "sd15", 1, "bf16", 40), s("sdlora", "sd15", 4, "bf16", 165, compile=True)]
    rest += [s("sdlora", "sd15", 1, "fp16", 40), s("sdlora", "sd15", 4, "fp16", 45)]
    return flux + sd15 + more_flux + sdxl + rest


def selected(spec_id: str, only: list[str], skip: list[str]) -> bool:
    if only and not any(fnmatch.fnmatch(spec_id, p) for p in only):
        return False
    return not any(fnmatch.fnmatch(spec_id, p) for p in skip)


def real_scorers_cached() -> bool:
    """Whether sdlora score's default DINO and CLIP weights are in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    dino = try_to_load_from_cache("facebook/dino-vits16", "config.json")
    clip = [
        try_to_load_from_cache("timm/vit_base_patch32_clip_224.openai", f)
        for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    ]
    return isinstance(dino, str) and any(isinstance(c, str) for c in clip)


# Runs diffusers' example as `accelerate launch` does on one GPU (one process), with two probes: the peak GPU
# memory at exit, and an in-loop clock (every optimizer step's end, synchronised). argv[1]: the pipeline
# class whose save_lora_weights ends the run (its final inference reloads the whole pipeline; FLUX.1: 33.5 GB,
# no training in it), or "" to let the example finish; argv[2:]: the example and its arguments.
DIFFUSERS_WRAPPER = """
import atexit, os, runpy, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
ends = []
def step_end(optimizer, args, kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ends.append(time.perf_counter())
register_optimizer_step_post_hook(step_end)
def report():
    if torch.cuda.is_available():
        print(f'BENCH_CUDA_PEAK_GB={torch.cuda.max_memory_allocated() / 2**30:.3f}', flush=True)
    print('BENCH_STEP_ENDS=' + ','.join(f'{t:.4f}' for t in ends), flush=True)
atexit.register(report)
if sys.argv[1]:
    import diffusers
    pipeline = getattr(diffusers, sys.argv[1])
    save = pipeline.save_lora_weights
    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        report()
        os._exit(0)
    pipeline.save_lora_weights = staticmethod(save_then_stop)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def step_times(output: str) -> list[float]:
    """The wrapped example's in-loop step times (from its second step on): DIFFUSERS_WRAPPER's clock."""
    found = re.findall(r"BENCH_STEP_ENDS=([\d.,]*)", output)
    ends = [float(t) for t in found[-1].split(",") if t] if found else []
    return [b - a for a, b in zip(ends, ends[1:])]


class Bench:
    def __init__(self, args: argparse.Namespace, device: str, runner: Runner, plan: list[Spec], fp8: bool):
        self.args, self.device, self.runner = args, device, runner
        self.tiny = args.tiny
        self.work: Path = args.work
        self.pending = list(plan)  # rows not started yet: which model folders are still wanted
        self.fp8 = fp8  # sdlora train has --base-precision
        self.models: dict[str, str] = {}  # MODELS key -> model argument for sdlora
        self.unbuilt: dict[str, str] = {}  # MODELS key -> why its build failed
        self.datasets: dict[int, Path] = {}
        self.flops: dict[tuple[str, int, int], float] = {}
        self.floor: dict[tuple[str, int, int], float] = {}
        self.live: tuple[str, Any] | None = None  # the floors' denoiser, kept for the next floor of its model
        self.sample_run: Path | None = None
        self.peak_tflops: float | None = args.peak_tflops or peak_tflops(device)

    # ------------------------------------------------------------------ inputs
    def model(self, key: str) -> str:
        if key in self.unbuilt:  # its other rows fail at once, not after another build's minute
            raise RowError(f"no {MODELS[key].label} model: {self.unbuilt[key]}")
        if key not in self.models:
            if self.tiny:
                self.models[key] = MODELS[key].tiny
                return self.models[key]
            folder = self.work / "models" / f"{key}-random"
            start = time.perf_counter()
            try:
                self.make_room(key)
                build_model(key, folder, self.device)
            except Exception as exc:
                self.unbuilt[key] = str(exc) if isinstance(exc, RowError) else one_line(f"{type(exc).__name__}: {exc}")
                raise
            print(f"  model {folder} ready in {time.perf_counter() - start:.0f} s", flush=True)
            self.models[key] = str(folder)
        return self.models[key]

    def make_room(self, key: str) -> None:
        """The GPU machine's disk (64 GB) holds SD 1.5, SDXL and FLUX.1 (52 GB) only just: before a build,
        remove the folders of models no row still to run wants, when the disk is short."""
        self.work.mkdir(parents=True, exist_ok=True)
        need_gb = MODELS[key].disk_gb + 2.0
        wanted = {spec.model for spec in self.pending}
        for other, folder in list(self.models.items()):
            if shutil.disk_usage(self.work).free / 1e9 >= need_gb:
                return
            if other not in wanted:
                print(f"  removing {folder} (no row left wants it) to make room for {key}", flush=True)
                shutil.rmtree(folder, ignore_errors=True)
                del self.models[other]
        free = shutil.disk_usage(self.work).free / 1e9
        if free < need_gb:  # fail now, not after writing most of it
            raise RowError(
                f"{free:.1f} GB free in {self.work}; {key}'s folder needs about {need_gb:.0f} (--work elsewhere)"
            )

    def model_folder(self, key: str) -> Path:
        """A diffusers folder of the model (the tiny ones saved once) for the diffusers example."""
        model = self.model(key)
        if not model.startswith("tiny-"):
            return Path(model)
        folder = self.work / "models" / model
        if not (folder / "model_index.json").is_file():
            from sdlora.models.loading import load_pipeline

            load_pipeline(model)[0].save_pretrained(folder)
        return folder

    def dataset(self, resolution: int) -> Path:
        if resolution not in self.datasets:
            photos = self.work / "photos"
            if not photos.is_dir():
                write_photos(photos, n=12, size=(96, 128) if self.tiny else (1152, 1536))
            out = self.work / f"dataset-{resolution}"
            argv = ["prepare", str(photos), "--out", str(out), "--resolution", str(resolution), "--force"]
            checked(self.runner.sdlora(argv + ["--workers", "1" if self.tiny else "8"]), "sdlora prepare")
            self.datasets[resolution] = out
        return self.datasets[resolution]

    def steps(self, spec: Spec) -> tuple[int, int]:
        return tuple(self.args.sdxl_steps if spec.model == "sdxl" else self.args.steps)

    # ------------------------------------------------------------------ rows
    def estimate(self, spec: Spec) -> float:
        """The row's estimated seconds, its model's build included when no row has built it yet."""
        builds = spec.kind not in ("sample", "score") and spec.model not in self.models
        return spec.est_s + (MODELS[spec.model].build_s if builds and not self.tiny else 0.0)

    def cannot_start(self, spec: Spec) -> str | None:
        """Why the row is skipped, or None: --budget-s spent, its estimate past the budget's grace, no fp8 option."""
        if spec.precision == "fp8" and not self.fp8:
            return "this sdlora train has no --base-precision (the fp8 base)"
        now, deadline = time.monotonic(), self.runner.deadline
        if now > deadline:
            return f"--budget-s {self.args.budget_s:.0f} spent"
        if now + self.estimate(spec) > deadline + GRACE_S:
            left = deadline + GRACE_S - now
            return f"estimated {self.estimate(spec):.0f} s, {left:.0f} s of --budget-s (+{GRACE_S} s) left"
        return None

    def new_row(self, spec: Spec) -> Row:
        return Row(
            id=spec.id,
            what={
                "unet": "UNet fwd+bwd (floor)",
                "transformer": "transformer fwd+bwd (floor)",
                "sdlora": "sdlora train",
                "diffusers": "diffusers example",
                "sample": "sdlora sample",
                "score": "sdlora score",
            }[spec.kind],
            model=MODELS[spec.model].tiny if self.tiny else MODELS[spec.model].label,
            resolution=spec.resolution,
            batch=spec.batch,
            precision=spec.precision,
            compile="on" if spec.compile else "off",
            est_s=self.estimate(spec) or None,
        )

    def run(self, spec: Spec) -> Row:
        row = self.new_row(spec)
        self.pending = [s for s in self.pending if s.id != spec.id]
        if spec.kind not in FLOOR_KINDS:
            self.drop_live()  # the GPU is the training process's
        notes = ["gradient checkpointing"] * spec.gc + ["base weights fp8 (--base-precision fp8), bf16 compute"] * (
            spec.precision == "fp8"
        )
        start = time.perf_counter()
        try:
            getattr(self, "row_" + spec.kind)(spec, row)
        except RowError as exc:
            row.error = str(exc)
        except Exception as exc:  # noqa: BLE001 (one row's failure never stops the others)
            row.error = one_line(f"{type(exc).__name__}: {exc}")
        row.row_s = time.perf_counter() - start
        row.note = "; ".join(filter(None, [*notes, row.note]))
        key = (spec.model, spec.resolution, spec.batch)
        kinds = FLOOR_KINDS + TRAIN_KINDS
        if row.denoiser_tflop_per_step is None and key in self.flops and spec.kind in kinds:
            row.denoiser_tflop_per_step = self.flops[key] / 1e12
        if row.s_per_step and row.s_per_step > 0:
            if spec.kind in kinds:
                row.images_per_s = spec.batch / row.s_per_step
            if key in self.floor and spec.kind not in FLOOR_KINDS:
                row.x_floor = row.s_per_step / self.floor[key]
            if row.denoiser_tflop_per_step and self.peak_tflops:
                row.peak_fraction = row.denoiser_tflop_per_step / row.s_per_step / self.peak_tflops
        return row

    def live_denoiser(self, key: str) -> Any:
        if self.live is None or self.live[0] != key:
            self.drop_live()
            self.live = (key, load_denoiser_with_lora(key, self.model(key)))
        return self.live[1]

    def drop_live(self) -> None:
        import gc

        self.live = None
        gc.collect()  # peft's modules hold cycles: only a collection frees a dropped denoiser's memory
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def row_floor(self, spec: Spec, row: Row) -> None:
        iters = 2 if self.tiny else 10
        try:
            denoiser = self.live_denoiser(spec.model)
            result = denoiser_probe(
                denoiser, spec.model, self.device, spec.resolution, spec.batch, spec.precision, iters
            )
        except BaseException:
            self.drop_live()  # e.g. out of GPU memory: the next row starts clean
            raise
        key = (spec.model, spec.resolution, spec.batch)
        self.flops[key] = result["flops"]
        self.floor[key] = result["s_per_step"]
        row.s_per_step, row.peak_gpu_gb = result["s_per_step"], result["peak_gpu_gb"]
        row.note = f"rank {RANK} LoRA on {','.join(lora_targets(spec.model))}; median of {iters}, in-process"

    row_unet = row_transformer = row_floor

    def _two_runs(self, spec: Spec, run) -> tuple[dict[int, Proc], float, float]:
        small, large = self.steps(spec)
        procs = {n: run(n) for n in (small, large)}
        per_step = (procs[large].wall_s - procs[small].wall_s) / (large - small)
        return procs, per_step, procs[small].wall_s - small * per_step

    def row_sdlora(self, spec: Spec, row: Row) -> None:
        from sdlora.run import Metric, read_metrics

        model, dataset = self.model(spec.model), self.dataset(spec.resolution)
        runs_dir = self.work / "runs"

        def run(steps: int) -> Proc:
            name = f"{spec.id}-{steps}"
            shutil.rmtree(runs_dir / name, ignore_errors=True)
            argv = ["train", "--model", model, "--dataset", str(dataset), "--resolution", str(spec.resolution)]
            argv += ["--batch-size", str(spec.batch), "--max-steps", str(steps), "--rank", str(RANK)]
            argv += ["--mixed-precision", {"fp32": "no", "fp8": "bf16"}.get(spec.precision, spec.precision)]
            argv += ["--base-precision", "fp8"] if spec.precision == "fp8" else []
            argv += ["--gradient-checkpointing" if spec.gc else "--no-gradient-checkpointing"]
            argv += ["--no-cache", "--validate-every", "0", "--checkpoint-every", "0", "validation.prompts=[]"]
            argv += ["--runs-dir", str(runs_dir), "--name", name] + ["--compile"] * spec.compile
            with self.cold_compile(self.work / "inductor" / name) if spec.compile else contextlib.nullcontext():
                return checked(self.runner.sdlora(argv), "sdlora train")

        if MODELS[spec.model].one_process:
            steps = self.args.flux_steps
            proc = run(steps)
        else:
            procs, per_step, startup = self._two_runs(spec, run)
            steps = max(procs)
        records = read_metrics(runs_dir / f"{spec.id}-{steps}" / "metrics.jsonl")
        times = [r[Metric.STEP_TIME] for r in records if Metric.STEP_TIME in r]
        peaks = [r[Metric.CUDA_PEAK_GB] for r in records if Metric.CUDA_PEAK_GB in r]
        row.in_loop_s_per_step = statistics.median(times[1:] or times) if times else None
        if MODELS[spec.model].one_process:
            if row.in_loop_s_per_step is None:
                raise RowError("sdlora train: no step times in its metrics.jsonl")
            per_step, startup = row.in_loop_s_per_step, proc.wall_s - steps * row.in_loop_s_per_step
            row.note = f"one process of {steps} steps: s/step in-loop"
        row.s_per_step, row.startup_s = per_step, startup
        row.peak_gpu_gb = max(peaks) if peaks else None
        if spec.model == "sd15" and self.sample_run is None:
            self.sample_run = runs_dir / f"{spec.id}-{steps}"

    @contextlib.contextmanager
    def cold_compile(self, cache: Path) -> Any:
        """Each run of the compile row compiles cold (its own inductor cache; in-process, no graphs of the
        run before), so its compile time is the same in both and cancels out of the marginal s/step."""
        shutil.rmtree(cache, ignore_errors=True)
        before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        if self.runner.in_process:
            import torch

            torch._dynamo.reset()
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before

    def row_diffusers(self, spec: Spec, row: Row) -> None:
        script = self.args.diffusers_dir / DIFFUSERS_SCRIPTS[spec.model]
        folder, images = self.model_folder(spec.model), self.dataset(spec.resolution) / "images"
        report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "all"  # all: none installed
        precision = {"fp32": "no"}.get(spec.precision, spec.precision)
        flux = spec.model == "flux1"

        def run(steps: int) -> Proc:
            out = self.work / "diffusers" / f"{spec.id}-{steps}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-c", DIFFUSERS_WRAPPER, "FluxPipeline" if flux else "", str(script)]
            cmd += ["--pretrained_model_name_or_path", str(folder)]
            cmd += ["--instance_data_dir", str(images), "--instance_prompt", "a photo of sksToy toy"]
            cmd += ["--output_dir", str(out), "--resolution", str(spec.resolution)]
            cmd += ["--train_batch_size", str(spec.batch), "--rank", str(RANK), "--learning_rate", "1e-4"]
            cmd += ["--max_train_steps", str(steps), "--checkpointing_steps", "100000", "--seed", "0"]
            cmd += ["--mixed_precision", precision, "--report_to", report_to]
            cmd += ["--gradient_checkpointing"] * spec.gc
            if flux:  # sdlora's settings: its LoRA targets and alpha, [dev]'s training guidance, latents encoded once
                from sdlora.models.families.flux import TRAIN_GUIDANCE

                cmd += ["--lora_layers", ",".join(lora_targets("flux1")), "--lora_alpha", str(RANK)]
                cmd += ["--guidance_scale", str(TRAIN_GUIDANCE), "--cache_latents"]
            return checked(self.runner.command(cmd, cwd=self.work), "diffusers example")

        if MODELS[spec.model].one_process:
            steps = self.args.flux_steps
            procs = {steps: run(steps)}
            times = step_times(procs[steps].output)
            if not times:
                raise RowError("diffusers example: no optimizer steps timed (BENCH_STEP_ENDS)")
            row.s_per_step = row.in_loop_s_per_step = statistics.median(times)
            row.startup_s = procs[steps].wall_s - steps * row.s_per_step
            how = f"one process of {steps} steps: s/step in-loop; stopped once its LoRA was saved"
            row.note = f"{script.name}, latents encoded once (--cache_latents); {how}"
        else:
            procs, row.s_per_step, row.startup_s = self._two_runs(spec, run)
            times = step_times(procs[max(procs)].output)
            row.in_loop_s_per_step = statistics.median(times) if times else None
            row.note = f"{script.name}, VAE encode every step"
        peaks = [float(m) for p in procs.values() for m in re.findall(r"BENCH_CUDA_PEAK_GB=([\d.]+)", p.output)]
        row.peak_gpu_gb = max(peaks) if peaks else None

    def row_sample(self, spec: Spec, row: Row) -> None:
        if self.sample_run is None:
            raise RowError("no SD 1.5 run to sample (its sdlora train row failed or was skipped)")
        n, steps = (1, 2) if self.tiny else (4, 20)
        argv = ["sample", PROMPT, "--run", str(self.sample_run), "-n", str(n), "--steps", str(steps), "--seed", "0"]
        proc = checked(self.runner.sdlora(argv), "sdlora sample")
        images = 2 * n  # LoRA and baseline
        row.batch, row.precision = images, "auto" + (" (fp16)" if self.device.startswith("cuda") else " (fp32)")
        row.images_per_s = images / proc.wall_s
        row.note = f"{images} images (LoRA + baseline) x {steps} steps: {proc.wall_s:.1f} s, {self.whole()}"

    def row_score(self, spec: Spec, row: Row) -> None:
        if self.sample_run is None or not (self.sample_run / "samples" / "samples.json").is_file():
            raise RowError("no samples to score (the sdlora sample row failed or was skipped)")
        real = not self.tiny and real_scorers_cached()
        argv = ["score", "--run", str(self.sample_run)]
        if not real:
            argv += ["--dino-model", "tiny-dino", "--clip-model", "tiny-clip"]
        proc = checked(self.runner.sdlora(argv), "sdlora score")
        samples = json.loads((self.sample_run / "samples" / "samples.json").read_text(encoding="utf-8"))
        images = len(samples.get("images", []))
        row.batch, row.precision = images, "-"
        row.images_per_s = images / proc.wall_s if images else None
        scorers = "DINO ViT-S/16 + CLIP ViT-B-32" if real else "tiny-dino + tiny-clip"
        if not real and not self.tiny:
            scorers += " (the real ones are not in the HF cache)"
        row.note = f"{images} images, {scorers}: {proc.wall_s:.1f} s, {self.whole()}"

    def whole(self) -> str:
        return "the whole call, in-process" if self.runner.in_process else "the whole process"


def peak_tflops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    return next((tflops for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


# ============================================================================ the table
COLUMNS = [
    ("id", "id"),
    ("what", "what"),
    ("model", "model"),
    ("resolution", "px"),
    ("batch", "batch"),
    ("precision", "precision"),
    ("compile", "compile"),
    ("s_per_step", "s/step"),
    ("in_loop_s_per_step", "in-loop s/step"),
    ("images_per_s", "images/s"),
    ("peak_gpu_gb", "peak GPU GiB"),
    ("denoiser_tflop_per_step", "denoiser TFLOP/step"),
    ("x_floor", "x floor"),
    ("peak_fraction", "% bf16 peak"),
    ("startup_s", "start-up s"),
    ("row_s", "row s"),
    ("est_s", "est. s"),
    ("note", "note"),
]


def cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "peak_fraction":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "/")


def markdown(rows: list[Row], header: list[str]) -> str:
    lines = [*header, "", "| " + " | ".join(title for _, title in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in rows:
        values = asdict(row)
        if row.error or row.skipped:
            values["note"] = ("skipped: " if row.skipped else "error: ") + (row.error or "")
        lines.append("| " + " | ".join(cell(key, values[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_table(out: Path, rows: list[Row], meta: dict[str, Any], header: list[str]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-bench.json").write_text(
        json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n", encoding="utf-8"
    )
    text = markdown(rows, header)
    (out / "gpu-bench.md").write_text(text, encoding="utf-8")
    return text


# ============================================================================ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare-carry", action="store_true", help="fill --carry with the wheels and the example (here)")
    p.add_argument("--diffusers-repo", type=Path, help="diffusers checkout or git dir, for --prepare-carry")
    p.add_argument("--carry", type=Path, default=CARRY, help="the carried folder (default: .gpu-carry)")
    p.add_argument("--carry-python", default="3.12", help="the GPU machine's Python, for --prepare-carry")
    p.add_argument("--carry-extra", action="append", default=[], help="another package to carry (NAME==VERSION)")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU: checks the script, not the speed")
    p.add_argument("--out", type=Path, default=None, help="where the table goes (default: $OUT, else ./gpu-bench)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (models are kept there and reused)")
    p.add_argument("--steps", type=int, nargs=2, default=None, help="the two SD 1.5 step counts (10 60; tiny 1 2)")
    p.add_argument("--sdxl-steps", type=int, nargs=2, default=None, help="the two SDXL step counts (5 25)")
    p.add_argument("--flux-steps", type=int, default=None, help="FLUX.1's steps, in one process (10; tiny 2)")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no row after this many seconds")
    p.add_argument("--only", default="", help="comma-separated row id patterns to run (fnmatch)")
    p.add_argument("--skip", default="", help="comma-separated row id patterns to leave out")
    p.add_argument("--diffusers-dir", type=Path, default=None, help="where the examples are (default: --carry)")
    p.add_argument("--no-diffusers", action="store_true", help="leave out the diffusers example rows")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, TFLOP/s")
    p.add_argument("--no-install", action="store_true", help="do not install the carried wheels")
    p.add_argument("--list", action="store_true", help="print the rows that would run and their estimates, and exit")
    p.add_argument("--processes", action="store_true", help="with --tiny: run the verbs as processes, as on the GPU")
    args = p.parse_args(argv)
    args.steps = args.steps or ([1, 2] if args.tiny else [10, 60])
    args.sdxl_steps = args.sdxl_steps or ([1, 2] if args.tiny else [5, 25])
    args.flux_steps = args.flux_steps or (2 if args.tiny else 10)
    if args.flux_steps < 2:
        p.error("--flux-steps: at least 2 (the first step is warm-up, not timed)")
    for pair in (args.steps, args.sdxl_steps):
        if not 0 < pair[0] < pair[1]:
            p.error("step counts: two positive numbers, the second larger")
    args.out = args.out or Path(os.environ.get("OUT") or "gpu-bench")
    args.work = args.work or Path(tempfile.gettempdir()) / ("sdlora-gpu-bench" + "-tiny" * args.tiny)
    args.diffusers_dir = args.diffusers_dir or args.carry
    return args


def train_has_option(flag: str) -> bool:
    """Whether `sdlora train --help` lists `flag` (in this process; wide, so no option name is cut)."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "250"
    try:
        proc = Runner(in_process=True, deadline=0.0).sdlora(["train", "--help"])
    finally:
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before
    return proc.code == 0 and flag in proc.output


def print_plan(plan: list[Spec], tiny: bool) -> None:
    """Each row with its estimate and the running total (each model's build counted once), for --list."""
    total, built = (0.0 if tiny else INSTALL_S), set()
    for spec in plan:
        builds = spec.model not in built and spec.kind not in ("sample", "score") and not tiny
        build = MODELS[spec.model].build_s if builds else 0
        built.add(spec.model)
        total += spec.est_s + build
        print(f"{spec.id:40} est. {spec.est_s + build:4.0f} s  total {total:5.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare_carry:
        prepare_carry(args.carry, args.diffusers_repo, args.carry_python, args.carry_extra)
        return 0
    diffusers = (
        set() if args.no_diffusers else {k for k, n in DIFFUSERS_SCRIPTS.items() if (args.diffusers_dir / n).is_file()}
    )
    only, skip = [p for p in args.only.split(",") if p], [p for p in args.skip.split(",") if p]
    if args.list:
        print_plan([s for s in specs(args.tiny, diffusers, fp8=True) if selected(s.id, only, skip)], args.tiny)
        return 0
    started = time.monotonic()
    if not args.tiny and not args.no_install:
        install_carry(args.carry, Path(tempfile.gettempdir()) / "sdlora-gpu-site")
    use_checkout()
    import torch

    # --base-precision is newer than this script: without it, --tiny leaves its fp8 row out and the GPU
    # run marks its fp8 rows skipped.
    fp8 = train_has_option("--base-precision")
    plan = [s for s in specs(args.tiny, diffusers, fp8=fp8 or not args.tiny) if selected(s.id, only, skip)]

    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        torch.set_num_threads(1)  # tiny models gain nothing from more, and busy machines lose a lot
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: run it on the GPU machine, or use --tiny here")
    unmet = unmet_requirements()
    if unmet:
        print("warning: unmet requirements (sdlora and the carried packages): " + "; ".join(unmet), flush=True)
    versions = {name: _version(name) for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "sdlora")}
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    runner = Runner(in_process=args.tiny and not args.processes, deadline=started + args.budget_s)
    bench = Bench(args, device, runner, plan, fp8)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": card,
        "peak_tflops_bf16": bench.peak_tflops,
        "versions": versions,
        "steps": args.steps,
        "sdxl_steps": args.sdxl_steps,
        "flux_steps": args.flux_steps,
        "base_precision_option": fp8,
        "rank": RANK,
        "unmet_requirements": unmet,
    }
    header = [
        f"# sdlora GPU benchmark: {card}, {meta['date']}",
        "",
        f"{' '.join(f'{k} {v}' for k, v in versions.items())}; LoRA rank {RANK}; "
        f"train steps {args.steps[0]} and {args.steps[1]} (SDXL {args.sdxl_steps[0]} and {args.sdxl_steps[1]}; "
        f"FLUX.1 {args.flux_steps} in one process); dense bf16 peak {bench.peak_tflops or '-'} TFLOP/s; "
        f"{shutil.disk_usage(args.work.parent if not args.work.exists() else args.work).free / 1e9:.0f} GB free "
        "for the models. Method: benchmarks/gpu.py's docstring.",
    ]
    missing = [DIFFUSERS_SCRIPTS[k] for k in DIFFUSERS_SCRIPTS if k not in diffusers]
    if missing and not args.no_diffusers:
        header.append(
            f"No diffusers example row for {', '.join(missing)}: not in {args.diffusers_dir} (--prepare-carry)."
        )
    print(header[0] + "\n" + header[2], flush=True)
    rows: list[Row] = []
    for spec in plan:
        reason = bench.cannot_start(spec)
        if reason:
            row = bench.new_row(spec)
            row.skipped, row.error = True, reason
            bench.pending.remove(spec)
        else:
            print(f"{spec.id} ...", flush=True)
            start = time.perf_counter()
            row = bench.run(spec)
            status = f"s/step {cell('s_per_step', row.s_per_step)}, images/s {cell('images_per_s', row.images_per_s)}"
            status = f"error: {row.error}" if row.error else status
            print(f"  {spec.id}: {status} ({time.perf_counter() - start:.0f} s)", flush=True)
        rows.append(row)
        write_table(args.out, rows, {**meta, "elapsed_s": round(time.monotonic() - started, 1)}, header)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    header.append(f"Whole run: {meta['elapsed_s']:.0f} s.")
    print("\n" + write_table(args.out, rows, meta, header), flush=True)
    print(f"table: {args.out / 'gpu-bench.md'} and {args.out / 'gpu-bench.json'}")
    return 0


def _version(name: str) -> str:
    if name == "sdlora":  # the checkout's, not an installed copy's
        import sdlora

        return sdlora.__version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        module = importlib.import_module(name)
        return getattr(module, "__version__", "?")


if __name__ == "__main__":
    sys.exit(main())
