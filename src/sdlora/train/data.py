"""Training examples and deterministic, sharded batches of cached latents.

The whole dataset lives in memory as cached latents (a few hundred KB per image), so there is
no DataLoader: a batch is a pure function of (seed, step, micro-batch, process). Images of
equal size form a bucket (a square dataset is one bucket; `prepare --keep-aspect` makes one
per aspect ratio). Each epoch shuffles every bucket (seeded by seed and epoch), cuts it into
global batches of batch_size x processes (the last one filled by wrapping around within the
bucket), and interleaves the buckets' batches at random, so every batch has one size. Global
micro-batch g takes the epoch's batch g % K (K batches per epoch), and a sample's noise,
timestep and flip come from a generator seeded by (seed, position). So the data order needs
no saved state to resume, and N processes x batch B see exactly the samples, noise and
timesteps of 1 process x batch N*B: process p takes slots p*B..p*B+B-1 of each global batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from sdlora.data.buckets import cover_crop
from sdlora.data.captions import has_token, read_unique_captions
from sdlora.data.manifest import CAPTIONS, IMAGES, Manifest
from sdlora.data.masks import MASKS
from sdlora.errors import DataError
from sdlora.train import losses
from sdlora.train.objective import Objective

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, position) over the seed space


@dataclass(frozen=True)
class Example:
    """One training or validation image and its conditioning."""

    path: Path
    caption: str
    original_size: tuple[int, int]  # (height, width) of the photo before crop/resize: SDXL's micro-conditioning
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the photo resized to cover `size`
    size: tuple[int, int]  # (height, width) it is trained at: its aspect bucket, or resolution x resolution
    mask: Path | None = None  # its subject mask (`prepare --masks`, white = object), None without one


def load_examples(dataset_dir: Path, manifest: Manifest, split: str, resolution: int, token: str) -> list[Example]:
    """The examples of one split (`train` or `val`), with their captions; DataError naming problems."""
    captions_path = dataset_dir / CAPTIONS
    if not captions_path.is_file():
        raise DataError(f"{captions_path}: missing (run `sdlora caption {dataset_dir}` to write template captions)")
    captions = read_unique_captions(captions_path)
    names = list(getattr(manifest, split))
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
        g = manifest.geometry(name, resolution)  # computed by prepare; at another resolution, the same rule
        record = manifest.images.get(name)
        mask = dataset_dir / MASKS / record.mask if record is not None and record.mask else None
        examples.append(
            Example(
                path=path,
                caption=caption,
                original_size=g.original_hw,
                crop_top_left=g.crop_top_left,
                size=g.size_hw,
                mask=mask,
            )
        )
    if missing_file:
        raise DataError(
            f"{dataset_dir / IMAGES}: {len(missing_file)} image(s) listed in the manifest are missing, "
            f"e.g. {missing_file[0]} (re-run `sdlora prepare`)"
        )
    if missing_caption:
        raise DataError(
            f"{captions_path}: no caption for {len(missing_caption)} image(s), e.g. {missing_caption[0]} "
            f"(run `sdlora caption {dataset_dir}`)"
        )
    if missing_token:
        raise DataError(
            f"{captions_path}: {len(missing_token)} caption(s) lack the token {token!r}, "
            f"e.g. {missing_token[0]} (run `sdlora caption {dataset_dir} --check`)"
        )
    return examples


def check_caption_lengths(cfg: Any, pipe: Any, arch: Any, examples: Sequence[Example], emit: Any) -> None:
    """Captions must keep the token inside the window the family reads them through (`Family.prompt_windows`:
    SD's CLIP, 77 ids, 75 of text; FLUX.1's T5, 512): a DataError naming the captions.txt line otherwise. One
    warning for captions that are merely long (their end is cut, as the pipelines cut it). Run with the
    training tokenizers (the token already added for pivotal tuning), before anything is encoded."""
    from sdlora.data.captions import parse_captions
    from sdlora.prompts import prompt_fit

    token = str(cfg.data.token)
    windows = arch.prompt_windows(pipe)
    cut, long = [], []
    seen: set[str] = set()
    for ex in examples:
        if ex.caption in seen:
            continue
        seen.add(ex.caption)
        fits = [(label, prompt_fit(tokenizer, ex.caption, token, window)) for label, tokenizer, window in windows]
        worst = max(fits, key=lambda fit: (fit[1].token_cut, fit[1].tokens - fit[1].limit), default=None)
        if worst is not None and worst[1].token_cut:
            cut.append((ex, worst[1].tokens, worst[1].limit, worst[0]))
        elif worst is not None and worst[1].over:
            long.append((ex, worst[1].tokens, worst[1].limit, worst[0]))
    if not cut and not long:
        return
    captions_path = Path(cfg.data.dataset) / CAPTIONS
    lines = {line.file: line.line_no for line in parse_captions(captions_path)} if captions_path.is_file() else {}

    def where(ex: Example) -> str:
        no = lines.get(ex.path.name)
        return f"{captions_path}:{no} ({ex.path.name})" if no else f"{captions_path} ({ex.path.name})"

    if cut:
        ex, tokens, limit, label = cut[0]
        more = f" ({len(cut)} captions in all)" if len(cut) > 1 else ""
        raise DataError(
            f"{where(ex)}: the caption is {tokens} {label} tokens and the text encoder reads {limit}, so the token "
            f"{token!r} is cut off{more}; shorten it or move {token!r} to its start"
        )
    ex, tokens, limit, label = long[0]
    emit(
        {
            "event": "warning",
            "message": f"{len(long)} caption(s) longer than the {limit} {label} tokens the text encoder reads; the "
            f"rest is ignored (e.g. {where(ex)}: {tokens} tokens)",
        }
    )


def batch_warning(examples: Sequence[Example], batch_size: int, num_processes: int) -> str | None:
    """One line when a batch holds more images than its size bucket (the whole square dataset, or one
    aspect bucket): `cut_batches` fills it by repeating images, each with its own noise and timestep."""
    sizes: dict[tuple[int, int], int] = {}
    for ex in examples:
        sizes[ex.size] = sizes.get(ex.size, 0) + 1
    global_batch = batch_size * num_processes
    if not sizes or global_batch <= min(sizes.values()):
        return None
    flag = f"--batch-size {batch_size}" + (f" x {num_processes} processes" if num_processes > 1 else "")
    smallest = min(sizes.values())
    if len(sizes) == 1:
        what = f"the {smallest} training images"
    else:
        what = f"the {smallest} images of the smallest of its {len(sizes)} size buckets (batches keep one size)"
    return (
        f"{flag} is larger than {what}: each batch repeats images to fill it (up to "
        f"{-(-global_batch // smallest)}x each, with their own noise and timesteps), so a step costs "
        f"{global_batch / smallest:.1f}x the compute of a batch of {smallest} for little more learning; "
        f"use --batch-size {max(1, smallest // num_processes)} or add photos"
    )


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

    def cached_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cached prompt embeddings (and SDXL's pooled one) on `device`."""
        assert self.embeds is not None, "no cached embeddings: the text encoders train"
        return self.embeds.to(device), None if self.pooled is None else self.pooled.to(device)

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        first = parts[0]
        return Conditioning(
            embeds=None if first.embeds is None else torch.cat([p.embeds for p in parts]),  # type: ignore[misc]
            pooled=None if first.pooled is None else torch.cat([p.pooled for p in parts]),  # type: ignore[misc]
            token_ids=None
            if first.token_ids is None
            else [torch.cat(ids) for ids in zip(*[p.token_ids for p in parts])],  # type: ignore[misc]
        )


@dataclass
class LatentSet:
    """Cached latents of a set of examples, with their conditioning and SDXL time ids.

    Latents are kept per example because aspect buckets give them different sizes.
    """

    latents: list[torch.Tensor]  # per example (C, h, w), scaled, float32
    flipped: list[torch.Tensor] | None  # mirror images' latents, or None without --random-flip
    cond: Conditioning
    time_ids: torch.Tensor  # (N, 6): original (h, w), crop (top, left), target (h, w)
    time_ids_flipped: torch.Tensor  # the same with the crop mirrored
    # The masked loss: per example its subject mask on the latent grid (1, h, w) in [0, 1], None for an
    # image without one (weight 1); the list is None when the loss is not masked. Flipped with its latent.
    masks: list[torch.Tensor | None] | None = None
    # --preservation dop: the conditioning of each example's class caption (the token taken out), else None
    class_cond: Conditioning | None = None

    def __len__(self) -> int:
        return len(self.latents)

    def buckets(self) -> list[list[int]]:
        """The example indices of each latent size, in a fixed order (by size, then index)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, latent in enumerate(self.latents):
            groups.setdefault(tuple(latent.shape), []).append(i)
        return [groups[shape] for shape in sorted(groups)]


def time_ids_for(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL time ids (N, 6) of each example as trained, and with the crop mirrored (for --random-flip)."""
    plain, mirrored = [], []
    for ex in examples:
        h, w = ex.original_size
        top, left = ex.crop_top_left
        th, tw = ex.size
        resized_w = cover_crop(w, h, (tw, th))[0][0]
        plain.append([h, w, top, left, th, tw])
        mirrored.append([h, w, top, max(0, resized_w - tw - left), th, tw])
    return (
        torch.tensor(plain, dtype=torch.float32).reshape(-1, 6),
        torch.tensor(mirrored, dtype=torch.float32).reshape(-1, 6),
    )


@dataclass
class Batch:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning
    time_ids: torch.Tensor
    prior: "Batch | None" = None  # class images for prior preservation: square, maybe not the bucket's size
    mask: torch.Tensor | None = None  # (B, 1, h, w) subject masks for the masked loss (1 = object), or None
    class_cond: Conditioning | None = None  # --preservation dop: the class captions' conditioning

    def __len__(self) -> int:
        return self.latents.shape[0]

    def with_prior(self) -> "Batch | None":
        """Instances then class images as one batch (one UNet forward), or None when their sizes differ."""
        prior = self.prior
        if prior is None or prior.latents.shape[1:] != self.latents.shape[1:]:
            return None
        return Batch(
            latents=torch.cat([self.latents, prior.latents]),
            noise=torch.cat([self.noise, prior.noise]),
            timesteps=torch.cat([self.timesteps, prior.timesteps]),
            cond=Conditioning.cat([self.cond, prior.cond]),
            time_ids=torch.cat([self.time_ids, prior.time_ids]),
            mask=None if self.mask is None else torch.cat([self.mask, prior.mask_or_ones()]),
        )

    def mask_or_ones(self) -> torch.Tensor:
        """The masks, or all ones (class images, images without a mask: the whole frame counts)."""
        if self.mask is not None:
            return self.mask
        return torch.ones((len(self), 1, *self.latents.shape[2:]), dtype=torch.float32)


def sample_generator(seed: int, stream: int, position: int) -> torch.Generator:
    """A CPU generator for one sample, independent of process count, batch size and resume."""
    value = (seed * _MIX + stream * 1_000_003 + position) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def _epoch_generator(seed: int, stream: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 7919 + stream * 104729 + epoch) % (2**63 - 1))


def cut_batches(order: Sequence[int], size: int) -> list[list[int]]:
    """`order` in batches of `size`; the last one is filled by wrapping around to the start."""
    n = len(order)
    return [[order[(start + j) % n] for j in range(size)] for start in range(0, n, size)]


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
        objective: Objective,
    ):
        self.instances, self.classes = instances, classes
        self.seed = seed
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.accum = gradient_accumulation
        self.noise_offset = noise_offset
        self.objective = objective
        self.buckets = instances.buckets()
        self.batches_per_epoch = sum(len(cut_batches(b, self.global_batch)) for b in self.buckets)
        self._perms: dict[tuple[int, int], torch.Tensor] = {}
        self._epochs: dict[int, list[list[int]]] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    def _perm(self, stream: int, epoch: int, n: int) -> torch.Tensor:
        key = (stream, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[key] = torch.randperm(n, generator=_epoch_generator(self.seed, stream, epoch))
        return self._perms[key]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches (instance indices, each from one bucket) of one epoch, in training order."""
        if epoch not in self._epochs:
            if len(self._epochs) > 8:
                self._epochs.clear()
            gen = _epoch_generator(self.seed, 0, epoch)
            per_bucket = []
            for members in self.buckets:
                order = [members[int(i)] for i in torch.randperm(len(members), generator=gen)]
                per_bucket.append(cut_batches(order, self.global_batch))
            # A random interleaving of the buckets' batch sequences: with each bucket already shuffled,
            # this is a uniformly shuffled batch order, and a single bucket keeps its order.
            labels = [b for b, batches in enumerate(per_bucket) for _ in batches]
            queues = [iter(batches) for batches in per_bucket]
            self._epochs[epoch] = [next(queues[labels[int(i)]]) for i in torch.randperm(len(labels), generator=gen)]
        return self._epochs[epoch]

    def positions(self, step: int, micro: int) -> list[int]:
        """Global stream positions of this process's samples (step counts from 0)."""
        first = ((step * self.accum) + micro) * self.global_batch + self.process_index * self.batch_size
        return list(range(first, first + self.batch_size))

    def indices(self, step: int, micro: int) -> list[int]:
        """The instance indices of this process's samples: its slots of the global batch."""
        epoch, k = divmod(step * self.accum + micro, self.batches_per_epoch)
        first = self.process_index * self.batch_size
        return self.epoch_batches(epoch)[k][first : first + self.batch_size]

    def _draw(self, data: LatentSet, stream: int, index: list[int], positions: list[int]) -> Batch:
        latents, noise, timesteps, time_ids, masks = [], [], [], [], []
        for i, pos in zip(index, positions):
            gen = sample_generator(self.seed, stream, pos)
            flip = data.flipped is not None and bool(torch.randint(0, 2, (1,), generator=gen).item())
            latent = (data.flipped if flip else data.latents)[i]  # type: ignore[index]
            timesteps.append(self.objective.sample_timesteps(gen, 1, latent.shape))
            noise.append(losses.offset_noise(latent[None], self.noise_offset, generator=gen)[0])
            latents.append(latent)
            time_ids.append((data.time_ids_flipped if flip else data.time_ids)[i])
            if data.masks is not None:
                mask = data.masks[i]
                mask = torch.ones((1, *latent.shape[1:])) if mask is None else mask
                masks.append(mask.flip(-1) if flip else mask)  # the mirrored latent's mask is the mirrored mask
        return Batch(
            latents=torch.stack(latents),
            noise=torch.stack(noise),
            timesteps=torch.cat(timesteps),
            cond=data.cond.take(torch.tensor(index)),
            time_ids=torch.stack(time_ids),
            mask=torch.stack(masks) if masks else None,
            class_cond=None if data.class_cond is None else data.class_cond.take(torch.tensor(index)),
        )

    def batch(self, step: int, micro: int) -> Batch:
        positions = self.positions(step, micro)
        batch = self._draw(self.instances, 0, self.indices(step, micro), positions)
        if self.classes is not None:  # class images: a stream of their own, one per instance sample
            n = len(self.classes)
            index = [int(self._perm(1, pos // n, n)[pos % n]) for pos in positions]
            batch = replace(batch, prior=self._draw(self.classes, 1, index, positions))
        return batch

    def epoch(self, step: int) -> float:
        return (step * self.accum) / max(1, self.batches_per_epoch)


def validation_batches(data: LatentSet, *, seed: int, timesteps: torch.Tensor, batch_size: int):
    """The fixed validation set: each val image at each of `timesteps` (the objective's
    `validation_timesteps`, evenly spaced), fixed noise.

    Same tensors at every call (generators seeded here), so val losses are comparable across steps;
    a batch holds images of one size.
    """
    count = len(timesteps)
    for bucket in data.buckets():
        items = []
        for i in bucket:
            for k, t in enumerate(timesteps):
                gen = sample_generator(seed, 2, i * count + k)
                items.append((i, t, torch.randn(data.latents[i].shape, generator=gen)))
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            index = torch.tensor([i for i, _, _ in chunk])
            yield Batch(
                latents=torch.stack([data.latents[i] for i, _, _ in chunk]),
                noise=torch.stack([n for _, _, n in chunk]),
                timesteps=torch.stack([t for _, t, _ in chunk]),
                cond=data.cond.take(index),
                time_ids=data.time_ids[index],
            )
