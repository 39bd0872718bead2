"""Why a CPU training step collapses on a busy machine: OpenMP threads and their wait policy.

Run by hand (a few minutes; no model folder, a smaller LoRA UNet built in memory):

    python benchmarks/openmp_wait.py --rounds 4                     # 1 thread, 2 spinning, 2 passive
    python benchmarks/openmp_wait.py --variants 1 2-passive --width 64

Each variant is a fresh process (torch's OpenMP reads OMP_NUM_THREADS and OMP_WAIT_POLICY once, when it
loads) that times a LoRA UNet forward+backward (SD 1.5's blocks at `--width` channels instead of 320,
32x32 latents, 77x768 text) for `--steps` steps after one warm-up, and prints its median wall and CPU
seconds per step. The variants run in turn, round after round, so a neighbour that comes or goes moves
all of them alike; the ratios against the first variant are taken round by round (train_pairs.py).
CPU seconds well above wall x threads' share mean threads spun while they waited.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_pairs import pair_ratios  # noqa: E402  (benchmarks/ is a folder of scripts)

# name -> environment: "2" is libgomp's default spinning wait (OMP_WAIT_POLICY unset), how sdlora ran before.
VARIANTS = {
    "1": {"OMP_NUM_THREADS": "1"},
    "2": {"OMP_NUM_THREADS": "2"},
    "2-passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
}


def worker(steps: int, width: int) -> None:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    unet.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=targets))
    unet.train()
    latents, text = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 768)
    target = torch.randn_like(latents)
    wall, cpu = [], []
    for _ in range(steps + 1):  # the first is warm-up
        w0, c0 = time.perf_counter(), time.process_time()
        F.mse_loss(unet(latents, torch.randint(0, 1000, (1,)), text).sample, target).backward()
        unet.zero_grad(set_to_none=True)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    print(json.dumps({"threads": torch.get_num_threads(), "wall": wall[1:], "cpu": cpu[1:]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process, after one warm-up")
    parser.add_argument("--width", type=int, default=64, help="the UNet's first block channels (SD 1.5: 320)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["1", "2", "2-passive"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.width)
        return
    medians: dict[str, list[float]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for name in args.variants:
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
            load = os.getloadavg()[0]
            cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--width", str(args.width)]
            out = subprocess.run(cmd, env={**env, **VARIANTS[name]}, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            wall, cpu = statistics.median(result["wall"]), statistics.median(result["cpu"])
            medians[name].append(wall)
            print(
                f"round {r + 1} threads {name:<9} {wall:6.2f} s/step wall, {cpu:6.2f} s CPU; "
                f"load {load:.1f} -> {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    first = args.variants[0]
    for name in args.variants:
        print(
            f"{name:<9} s/step median {statistics.median(medians[name]):.2f}; x {first}: "
            f"{pair_ratios(medians[name], medians[first])}"
        )


if __name__ == "__main__":
    main()
