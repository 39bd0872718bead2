"""Training examples and deterministic, sharded batches of cached latents.

The whole dataset lives in memory as cached latents (a few hundred KB per image), so there is
no DataLoader: a batch is a pure function of (seed, step, micro-batch, process). Sample
`pos` of the global stream is image `perm_epoch[pos % n]` with one permutation per epoch,
and its noise, timestep and flip come from a generator seeded by (seed, pos). So the data
order needs no saved state to resume, and N processes x batch B see exactly the samples,
noise and timesteps of 1 process x batch N*B: process p takes positions p*B..p*B+B-1 of
each global micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from sdlora.data.captions import has_token, read_captions
from sdlora.data.manifest import CAPTIONS, IMAGES, Manifest
from sdlora.errors import DataError
from sdlora.train import losses

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, position) over the seed space


@dataclass(frozen=True)
class Example:
    """One training or validation image and its conditioning."""

    path: Path
    caption: str
    original_size: tuple[int, int]  # (height, width) of the photo before crop/resize: SDXL's micro-conditioning
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized photo


def crop_top_left(original_wh: tuple[int, int], resolution: int, crop: str) -> tuple[int, int]:
    """Where a center crop of the photo (resized so its short side is `resolution`) starts."""
    w, h = original_wh
    if crop != "center" or min(w, h) <= 0:
        return (0, 0)
    scale = resolution / min(w, h)
    return (max(0, round((h * scale - resolution) / 2)), max(0, round((w * scale - resolution) / 2)))


def load_examples(
    dataset_dir: Path, manifest: Manifest, split: str, resolution: int, token: str
) -> list[Example]:
    """The examples of one split (`train` or `val`), with their captions; DataError naming problems."""
    captions_path = dataset_dir / CAPTIONS
    if not captions_path.is_file():
        raise DataError(f"{captions_path}: missing (run `sdlora caption {dataset_dir}` to write template captions)")
    captions = read_captions(captions_path)
    names = list(getattr(manifest, split))
    crop = str(manifest.options.get("crop", "center"))
    examples, missing_caption, missing_token, missing_file = [], [], [], []
    for name in names:
        path = dataset_dir / IMAGES / name
        if not path.is_file():
            missing_file.append(name)
            continue
        caption = captions.get(name, "").strip()
        if not caption:
            missing_caption.append(name)
            continue
        if not has_token(caption, token):
            missing_token.append(name)
            continue
        record = manifest.images.get(name)
        orig_wh = tuple(record.original_size) if record is not None else (resolution, resolution)
        examples.append(Example(
            path=path,
            caption=caption,
            original_size=(int(orig_wh[1]), int(orig_wh[0])),
            crop_top_left=crop_top_left(orig_wh, resolution, crop),  # type: ignore[arg-type]
        ))
    if missing_file:
        raise DataError(f"{dataset_dir / IMAGES}: {len(missing_file)} image(s) listed in the manifest are missing, "
                        f"e.g. {missing_file[0]} (re-run `sdlora prepare`)")
    if missing_caption:
        raise DataError(f"{captions_path}: no caption for {len(missing_caption)} image(s), e.g. {missing_caption[0]} "
                        f"(run `sdlora caption {dataset_dir}`)")
    if missing_token:
        raise DataError(f"{captions_path}: {len(missing_token)} caption(s) lack the token {token!r}, "
                        f"e.g. {missing_token[0]} (run `sdlora caption {dataset_dir} --check`)")
    return examples


@dataclass
class Conditioning:
    """Text conditioning of a set of examples: cached embeddings, or token ids when the text encoders train."""

    embeds: torch.Tensor | None = None  # (N, 77, D)
    pooled: torch.Tensor | None = None  # (N, Dp), SDXL
    token_ids: list[torch.Tensor] | None = None  # per tokenizer (N, 77)

    def take(self, index: torch.Tensor) -> "Conditioning":
        return Conditioning(
            embeds=None if self.embeds is None else self.embeds[index],
            pooled=None if self.pooled is None else self.pooled[index],
            token_ids=None if self.token_ids is None else [ids[index] for ids in self.token_ids],
        )

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        first = parts[0]
        return Conditioning(
            embeds=None if first.embeds is None else torch.cat([p.embeds for p in parts]),  # type: ignore[misc]
            pooled=None if first.pooled is None else torch.cat([p.pooled for p in parts]),  # type: ignore[misc]
            token_ids=None if first.token_ids is None
            else [torch.cat(ids) for ids in zip(*[p.token_ids for p in parts])],  # type: ignore[misc]
        )


@dataclass
class LatentSet:
    """Cached latents of a set of examples, with their conditioning and SDXL time ids."""

    latents: torch.Tensor  # (N, C, h, w) scaled, float32
    flipped: torch.Tensor | None  # mirror images' latents, or None without --random-flip
    cond: Conditioning
    time_ids: torch.Tensor  # (N, 6): original (h, w), crop (top, left), target (h, w)
    time_ids_flipped: torch.Tensor  # the same with the crop mirrored

    def __len__(self) -> int:
        return self.latents.shape[0]


def time_ids_for(examples: Sequence[Example], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    plain, mirrored = [], []
    for ex in examples:
        h, w = ex.original_size
        top, left = ex.crop_top_left
        scale = resolution / max(1, min(h, w))
        mirrored_left = max(0, round(w * scale) - resolution - left)
        plain.append([h, w, top, left, resolution, resolution])
        mirrored.append([h, w, top, mirrored_left, resolution, resolution])
    return torch.tensor(plain, dtype=torch.float32), torch.tensor(mirrored, dtype=torch.float32)


@dataclass
class Batch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning
    time_ids: torch.Tensor
    num_instance: int  # the first num_instance rows are the object; the rest are class images


def sample_generator(seed: int, stream: int, position: int) -> torch.Generator:
    """A CPU generator for one sample, independent of process count, batch size and resume."""
    value = (seed * _MIX + stream * 1_000_003 + position) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class BatchPlan:
    """Which samples, noise and timesteps each process uses at each (step, micro-batch)."""

    def __init__(
        self,
        instances: LatentSet,
        classes: LatentSet | None,
        *,
        seed: int,
        batch_size: int,
        num_processes: int,
        process_index: int,
        gradient_accumulation: int,
        noise_offset: float,
        noise_scheduler: Any,
    ):
        self.instances, self.classes = instances, classes
        self.seed = seed
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.accum = gradient_accumulation
        self.noise_offset = noise_offset
        self.noise_scheduler = noise_scheduler
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    def _perm(self, stream: int, epoch: int, n: int) -> torch.Tensor:
        key = (stream, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            gen = torch.Generator().manual_seed((self.seed * 7919 + stream * 104729 + epoch) % (2**63 - 1))
            self._perms[key] = torch.randperm(n, generator=gen)
        return self._perms[key]

    def positions(self, step: int, micro: int) -> list[int]:
        """Global stream positions of this process's samples (step counts from 0)."""
        first = ((step * self.accum) + micro) * self.global_batch + self.process_index * self.batch_size
        return list(range(first, first + self.batch_size))

    def _draw(self, data: LatentSet, stream: int, positions: list[int]):
        n = len(data)
        index, latents, noise, timesteps, time_ids = [], [], [], [], []
        for pos in positions:
            i = int(self._perm(stream, pos // n, n)[pos % n])
            gen = sample_generator(self.seed, stream, pos)
            flip = data.flipped is not None and bool(torch.randint(0, 2, (1,), generator=gen).item())
            latent = (data.flipped if flip else data.latents)[i]  # type: ignore[index]
            timesteps.append(losses.sample_timesteps(self.noise_scheduler, 1, generator=gen))
            noise.append(losses.offset_noise(latent[None], self.noise_offset, generator=gen)[0])
            latents.append(latent)
            time_ids.append((data.time_ids_flipped if flip else data.time_ids)[i])
            index.append(i)
        cond = data.cond.take(torch.tensor(index))
        return torch.stack(latents), torch.stack(noise), torch.cat(timesteps), cond, torch.stack(time_ids)

    def batch(self, step: int, micro: int) -> Batch:
        positions = self.positions(step, micro)
        parts = [self._draw(self.instances, 0, positions)]
        if self.classes is not None:
            parts.append(self._draw(self.classes, 1, positions))
        latents, noise, timesteps, conds, time_ids = zip(*parts)
        return Batch(
            latents=torch.cat(latents), noise=torch.cat(noise), timesteps=torch.cat(timesteps),
            cond=Conditioning.cat(conds), time_ids=torch.cat(time_ids), num_instance=len(positions),
        )

    def epoch(self, step: int) -> float:
        return (step * self.accum * self.global_batch) / max(1, len(self.instances))


def validation_batches(
    data: LatentSet, *, seed: int, loss_timesteps: int, num_train_timesteps: int, batch_size: int
):
    """The fixed validation set: each val image at `loss_timesteps` evenly spaced timesteps, fixed noise.

    Same tensors at every call (generators seeded here), so val losses are comparable across steps.
    """
    items = []
    for i in range(len(data)):
        for k in range(loss_timesteps):
            t = int((k + 0.5) * num_train_timesteps / loss_timesteps)
            gen = sample_generator(seed, 2, i * loss_timesteps + k)
            noise = torch.randn(data.latents[i].shape, generator=gen)
            items.append((i, t, noise))
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        index = torch.tensor([i for i, _, _ in chunk])
        yield Batch(
            latents=data.latents[index], noise=torch.stack([n for _, _, n in chunk]),
            timesteps=torch.tensor([t for _, t, _ in chunk], dtype=torch.long),
            cond=data.cond.take(index), time_ids=data.time_ids[index], num_instance=len(chunk),
        )
