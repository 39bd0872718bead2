"""How fast the miniature world's base models learn on this CPU: the numbers that size `python -m sdlora.world build`.

Run by hand, niced, a part at a time (each stops itself after --minutes of training):

    nice -n 19 python benchmarks/world_feasibility.py render              # scenes/s at 32 and 64 px
    nice -n 19 python benchmarks/world_feasibility.py vae --minutes 4     # AutoencoderKL reconstruction curves
    nice -n 19 python benchmarks/world_feasibility.py vae-steps           # AutoencoderKL s/step at batch 32 only
    nice -n 19 python benchmarks/world_feasibility.py unet                # UNet2DConditionModel s/step at batch 32

`vae` trains each VAE of VAES (name: block_out_channels, image size; the latent is image size /
2^(blocks-1)) on pre-rendered base scenes (AdamW, MSE + 1e-6 KL, batch 32) for --minutes each and
prints steps/s and the held-out reconstruction error (MSE on [-1, 1] pixels, and PSNR) as it
goes. `unet` times forward + backward + AdamW steps of each UNet of UNETS (epsilon loss, a
77-token, 128-wide text context as the world's CLIP would give) at each latent size. Times are
wall clock on however many cores torch is given (--threads), and the process's CPU seconds per
step: on a shared machine (the load average is printed beside them) the wall clock is whatever the
neighbours leave, and CPU-s/step divided by the threads is what a step takes on idle cores.

Measured 2026-12-06 on the shared 2-core machine (load average 3-10), batch 32, CPU-s per step
with --threads 1 (about the wall time on an idle core). With --threads 2 on a loaded machine the
same steps took 2.4-4.1 CPU-s and 8 s of wall clock (OpenMP threads spinning at their barriers): the
build should run one thread per process, two processes side by side.

    render (one scene, loaded machine) 32 px 14 ms, 64 px 32 ms, 128 px 43 ms
    VAE (32, 64, 64), 32 px -> 8x8x4     0.95 M   0.49-0.59 s/step
        held-out PSNR: 15.2 dB at step 50, 16.8 at 100, 19.2 at 200, 20.6 at 350, 21.5 at 500, 21.7 at 550
    VAE (32, 64), 32 px -> 16x16x4       0.66 M   0.70 s/step
        held-out PSNR: 16.3 dB at step 50, 18.1 at 100, 20.5 at 150, 22.2 at 250, 23.0 at 350, 23.6 at 462
        (objects, colours, dots and stripes recognisable at 462 steps; the 8x8 VAE's are blobs at 290)
    VAE (32, 64), 64 px -> 32x32x4       0.66 M   2.74 s/step
    UNet (32, 64, 128), 1 layer/block  3.22 M   8x8: 0.24-0.31 s/step, 16x16: 0.70, 32x32: 4.1
    UNet (64, 128), 2 layers/block     4.46 M   8x8: 0.60 s/step, 16x16: 1.42, 32x32: 8.8
    UNet (32, 64, 128), attention only
      on the two coarser levels        4.22 M   8x8: 0.19 s/step, 16x16: 0.42
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from sdlora.world.scenes import batches

VAES = {
    "vae-2blk-64px": ((32, 64), 64),  # 64 px -> 32x32x4 latents (the tiny-sd layout)
    "vae-2blk-32px": ((32, 64), 32),  # 32 px -> 16x16x4
    "vae-3blk-32px": ((32, 64, 64), 32),  # 32 px -> 8x8x4
    "vae-4blk-64px": ((32, 64, 64, 64), 64),  # 64 px -> 8x8x4 (SD's factor 8)
}
UNETS = {
    "unet-3.2M": dict(block_out_channels=(32, 64, 128), layers_per_block=1),
    "unet-4.5M": dict(block_out_channels=(64, 128), layers_per_block=2),
    # unet-3.2M's widths, attention moved off the full latent size (the costly part at 16x16 and 32x32)
    # onto the 128-wide level.
    "unet-4.2M-late-attn": dict(
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
}
LATENTS = (8, 16, 32)
BATCH = 32
CONTEXT = (77, 128)  # tokens, width of the text encoder's output


def load() -> str:
    return "load average %.1f %.1f %.1f" % os.getloadavg()


def scenes(count: int, size: int, seed: int) -> torch.Tensor:
    """`count` base scenes at `size` px as a float tensor in [-1, 1], (count, 3, size, size)."""
    it = batches(seed, size, min(count, 64))
    out = []
    while sum(len(b) for b in out) < count:
        out.append(next(it).images)
    x = np.concatenate(out)[:count]
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def bench_render() -> None:
    for size in (32, 64, 128):
        t = time.perf_counter()
        scenes(64, size, seed=1)
        dt = time.perf_counter() - t
        print(f"render {size:3d} px: {64 / dt:6.1f} scenes/s ({1000 * dt / 64:.1f} ms each)  [{load()}]", flush=True)


def vae_model(blocks: tuple[int, ...]):
    from diffusers import AutoencoderKL

    n = len(blocks)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=blocks,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
    )


def save_pairs(path: str, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
    """Held-out scenes over their reconstructions, 16 across, as one PNG."""
    from PIL import Image

    pair = torch.cat([originals[:16], reconstructions[:16]])  # (32, 3, h, w)
    n, _, h, w = pair.shape
    grid = pair.clamp(-1, 1).add(1).mul(127.5).round().byte().reshape(2, 16, 3, h, w)
    grid = grid.permute(0, 3, 1, 4, 2).reshape(2 * h, 16 * w, 3).numpy()
    Image.fromarray(grid).save(path)


def bench_vae(names: list[str], minutes: float, train_count: int, eval_every: int, save: str | None) -> None:
    for name in names:
        blocks, size = VAES[name]
        torch.manual_seed(0)
        t = time.perf_counter()
        train, val = scenes(train_count, size, seed=0), scenes(128, size, seed=10_000)
        print(
            f"\n{name}: rendered {train_count + 128} scenes at {size} px in {time.perf_counter() - t:.0f} s", flush=True
        )
        vae = vae_model(blocks)
        params = sum(p.numel() for p in vae.parameters()) / 1e6
        print(
            f"{name}: {params:.2f} M parameters, latent {size // 2 ** (len(blocks) - 1)}x{size // 2 ** (len(blocks) - 1)}x4",
            flush=True,
        )
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
        g = torch.Generator().manual_seed(0)
        start, cpu0, step = time.perf_counter(), time.process_time(), 0
        while True:
            elapsed = time.perf_counter() - start
            if step % eval_every == 0 or elapsed >= minutes * 60:
                vae.eval()
                with torch.no_grad():
                    rec = vae(val, sample_posterior=False).sample
                mse = float(torch.mean((rec - val) ** 2))
                psnr = 10 * math.log10(4 / mse)  # peak-to-peak 2 on [-1, 1]
                rate = step / elapsed if elapsed else 0.0
                cpu = (time.process_time() - cpu0) / step if step else 0.0
                print(
                    f"{name}: {elapsed:6.0f} s  step {step:5d}  {rate:.2f} steps/s  {cpu:.2f} CPU-s/step  "
                    f"val MSE {mse:.4f}  PSNR {psnr:.1f} dB  [{load()}]",
                    flush=True,
                )
                vae.train()
                if elapsed >= minutes * 60:
                    if save:
                        save_pairs(os.path.join(save, f"{name}.png"), val, rec)
                    break
            idx = torch.randint(0, len(train), (BATCH,), generator=g)
            x = train[idx]
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=g)).sample
            loss = torch.nn.functional.mse_loss(rec, x) + 1e-6 * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1


def bench_vae_steps(names: list[str], steps: int) -> None:
    """CPU-s per training step of each VAE at batch BATCH (no learning curve: cheap)."""
    for name in names:
        blocks, size = VAES[name]
        torch.manual_seed(0)
        x = scenes(BATCH, size, seed=0)
        vae = vae_model(blocks)
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
        times, cpus = [], []
        for _ in range(steps + 1):  # the first is warm-up
            t, c = time.perf_counter(), time.process_time()
            post = vae.encode(x).latent_dist
            loss = torch.nn.functional.mse_loss(vae.decode(post.sample()).sample, x) + 1e-6 * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        per, cpu = float(np.median(times[1:])), float(np.median(cpus[1:]))
        print(
            f"{name} at {size} px, batch {BATCH}: {per:.2f} s/step, {cpu:.2f} CPU-s/step (medians of {steps})  [{load()}]",
            flush=True,
        )


def unet_model(spec: dict, latent: int):
    from diffusers import UNet2DConditionModel

    k = len(spec["block_out_channels"])
    blocks = dict(
        down_block_types=("CrossAttnDownBlock2D",) * (k - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (k - 1),
    )
    return UNet2DConditionModel(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=CONTEXT[1],
        attention_head_dim=8,
        norm_num_groups=16,
        **{**blocks, **spec},
    )


def bench_unet(names: list[str], latents: list[int], steps: int) -> None:
    for name in names:
        for latent in latents:
            torch.manual_seed(0)
            unet = unet_model(UNETS[name], latent)
            params = sum(p.numel() for p in unet.parameters()) / 1e6
            opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
            x = torch.randn(BATCH, 4, latent, latent)
            ctx = torch.randn(BATCH, *CONTEXT)
            times, cpus = [], []
            for _ in range(steps + 1):  # the first is warm-up
                t, c = time.perf_counter(), time.process_time()
                ts = torch.randint(0, 1000, (BATCH,))
                noise = torch.randn_like(x)
                loss = torch.nn.functional.mse_loss(unet(x + noise, ts, encoder_hidden_states=ctx).sample, noise)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t)
                cpus.append(time.process_time() - c)
            per, cpu = float(np.median(times[1:])), float(np.median(cpus[1:]))
            print(
                f"{name} ({params:.2f} M) at {latent}x{latent}x4, batch {BATCH}: {per:.2f} s/step, {cpu:.2f} CPU-s/step (medians of {steps})  [{load()}]",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["render", "vae", "vae-steps", "unet"])
    ap.add_argument("--minutes", type=float, default=3.0, help="vae: training time per VAE")
    ap.add_argument("--train-count", type=int, default=2048, help="vae: pre-rendered training scenes")
    ap.add_argument("--eval-every", type=int, default=25, help="vae: steps between held-out evaluations")
    ap.add_argument("--save", help="vae: folder for a PNG of held-out scenes over their reconstructions")
    ap.add_argument("--vaes", nargs="+", default=list(VAES), choices=list(VAES))
    ap.add_argument("--unets", nargs="+", default=list(UNETS), choices=list(UNETS))
    ap.add_argument("--latents", nargs="+", type=int, default=list(LATENTS))
    ap.add_argument("--steps", type=int, default=3, help="vae-steps, unet: timed steps per row")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs  [{load()}]", flush=True)
    if args.part == "render":
        bench_render()
    elif args.part == "vae":
        bench_vae(args.vaes, args.minutes, args.train_count, args.eval_every, args.save)
    elif args.part == "vae-steps":
        bench_vae_steps(args.vaes, args.steps)
    else:
        bench_unet(args.unets, args.latents, args.steps)


if __name__ == "__main__":
    main()
