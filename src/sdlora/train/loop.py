"""The training loop: one for every model family, read top to bottom.

    state = setup(cfg)          # dataset, model, caches, LoRA, optimizer, accelerate, run folder
    result = train(state)       # steps; validation, checkpoints and metrics on the way; the LoRA at the end
    cleanup(state)

`run_training(cfg)` does the three. Each step of `setup` is a builder in the module that owns it:
train/resolve.py (config), train/lora.py (models), train/encode.py (caches), train/optim.py,
train/runtime.py (accelerate, run folder, logging), train/checkpoint.py, train/validation.py,
train/export.py. What differs between model families (text encoders, pooled embeddings, time
ids) is asked of `state.arch`, the model's `models.families.Family`; nothing here branches on the model. Progress goes out as plain
dict events through `on_event` (only on the main process); the CLI renders them. Everything a
user can cause raises an `SdloraError` with one clear line.

A step is a pure function of (seed, step): the batch plan (train/data.py) derives samples,
noise and timesteps from them, and the LoRA, optimizer and scheduler states come from the
checkpoint, so a resumed run matches an uninterrupted one and N processes match one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdlora.config import Config
from sdlora.devices import free_memory
from sdlora.events import OnEvent, no_event
from sdlora.locks import acquire, release
from sdlora.models.families import OnDevice
from sdlora.run import LORA_DIR, Metric, point_latest
from sdlora.train import checkpoint as ckpt
from sdlora.train import (
    compiling,
    dropout,
    ema,
    encode,
    fsdp,
    lora,
    losses,
    monitor,
    optim,
    resolve,
    runtime,
    validation,
)
from sdlora.train.data import Conditioning, batch_warning, check_caption_lengths
from sdlora.train.export import check_exportable, export_lora
from sdlora.train.preservation import dop_loss
from sdlora.train.state import TrainState


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_val_loss: float | None
    lora_dir: Path | None
    best_dino: float | None = None  # highest DINO of the validation samples (--score-every), else None
    interrupted: bool = False
    elapsed_s: float = 0.0
    checkpoint: Path | None = None
    stop_signal: int = 0  # the signal that stopped an interrupted run (SIGINT for `request_stop`)
    max_steps: int = 0  # the run's --max-steps: an interrupted run with `steps` there was stopped after its last step


def setup(cfg: Config, *, resume: Path | None = None, on_event: OnEvent | None = None) -> TrainState:
    """Build the run: fail fast on bad input, then model, caches, LoRA, optimizer, accelerate, run folder."""
    from accelerate.utils import set_seed

    # Everything a user can get wrong fails first, before minutes of loading and encoding.
    cfg = resolve.resolve_precision(cfg)
    # Read the dataset under its shared lock, held to the end: `prepare` refuses to rewrite it meanwhile.
    locks = [acquire(resolve.dataset_dir(cfg), "train", shared=True)]
    try:
        cfg, train_examples, val_examples = resolve.resolve_dataset(cfg)
        cfg = resolve.resolve_alpha(cfg)
        runtime.check_tracker(cfg.logging.report_to)
        optim.check_optimizer(cfg)
        if fsdp.requested():
            fsdp.check_run(cfg)
        accelerator = runtime.make_accelerator(cfg)
        emit = on_event if (on_event is not None and accelerator.is_main_process) else no_event
        runtime.check_new_run(cfg, resume)
        if warning := batch_warning(train_examples, cfg.train.batch_size, accelerator.num_processes):
            emit({"event": "warning", "message": warning})
        if resume is not None:
            locks.append(runtime.lock_run(Path(resume), accelerator))  # before minutes of loading
        validation.check_scorer(cfg, val_examples, accelerator)

        pipe, arch, objective = lora.load_base(cfg, emit, [*train_examples, *val_examples])
        cfg = resolve.resolve_family_defaults(cfg, arch, pipe)
        lora.check_rank(cfg, pipe, arch, emit)  # before minutes of encoding
        device, weight_dtype = accelerator.device, resolve.weight_dtype(cfg)
        cfg = resolve.resolve_token_embedding(cfg, pipe, arch)
        tokens = lora.token_embedding(cfg, pipe, arch)  # pivotal tuning: before any caption is tokenized
        check_caption_lengths(cfg, pipe, arch, [*train_examples, *val_examples], emit)

        # Encode once (the base model makes the class images first); the encoders then leave the accelerator.
        class_examples = encode.class_examples(cfg, pipe, arch, accelerator, emit)
        with accelerator.main_process_first():  # the main process fills the cache, the others read it
            data = encode.encode_examples(
                cfg, pipe, arch, device, weight_dtype, train_examples, val_examples, class_examples, emit
            )
        empty_caption = dropout.empty_caption(cfg, pipe, arch, data.negative_cond, encode.encodes_text(cfg))
        encode.release_encoders(cfg, pipe, arch)

        set_seed(cfg.train.seed)  # the LoRA's initial weights
        unet, encoders = lora.inject_lora(cfg, pipe, arch, device, weight_dtype, fsdp.denoiser_device(accelerator))
        frozen_encoders = lora.frozen_encoders(cfg, tokens, encoders, pipe, arch, device, weight_dtype)
        check_exportable(unet, encoders or None, arch)  # a LoRA that could not be saved fails now, not at the end
        compiling.compile_unet(cfg, unet)  # --compile: in place, after the LoRA is in (its keys stay as they are)
        unet = fsdp.shard(unet, arch, accelerator)  # FSDP: before the optimizer, EMA and groups hold its parameters

        # Everything that can fail on bad input has run: now the run folder, the optimizer, accelerate.
        run_dir, lock = runtime.create_run_dir(cfg, accelerator, resume)
        locks.append(lock)
        groups = optim.param_groups(unet, encoders, arch, tokens, loraplus=cfg.lora.loraplus_ratio is not None)
        ema_weights = ema.build(cfg, groups, device)
        optimizer = optim.build_optimizer(cfg, groups)
        lr_scheduler = optim.build_scheduler(cfg, optimizer)
        unet, encoders, optimizer = fsdp.prepare(accelerator, unet, encoders, optimizer)

        state = TrainState(
            cfg=cfg,
            accelerator=accelerator,
            pipe=pipe,
            arch=arch,
            unet=unet,
            text_encoders=encoders,
            objective=objective,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            plan=encode.batch_plan(cfg, data, accelerator, objective),
            val_data=data.val,
            sample_conds=data.sample_conds,
            negative_cond=data.negative_cond,
            run_dir=run_dir,
            weight_dtype=weight_dtype,
            emit=emit,
            param_groups=groups,
            tokens=tokens,
            frozen_text_encoders=frozen_encoders,
            empty_caption=empty_caption,
            ema=ema_weights,
            locks=[lock for lock in locks if lock is not None],
        )
        if resume is not None:
            ckpt.load_checkpoint(state)
        runtime.start_logging(state)
        return state
    except BaseException:
        for lock in locks:
            if lock is not None:
                release(lock)
        raise


def train(state: TrainState, on_event: OnEvent | None = None) -> TrainResult:
    """Train from `state.step` to `--max-steps`; validate, checkpoint and log on the way."""
    cfg, acc = state.cfg, state.accelerator
    if on_event is not None and state.is_main:
        state.emit = on_event
    emit, total = state.emit, cfg.train.max_steps
    effective = cfg.train.batch_size * acc.num_processes * cfg.train.gradient_accumulation
    emit(runtime.start_event(state, effective))
    started = time.perf_counter()
    restore = runtime.install_signal_handlers(state)
    monitor.machine_load(state.device)  # primes the CPU counters
    interrupted = False
    try:
        while state.step < total:
            t0 = time.perf_counter()
            record = _train_step(state)
            state.step += 1
            step = state.step
            runtime.check_finite(state, record[Metric.LOSS])
            record[Metric.LOSS_MEAN] = state.loss_mean.update(record[Metric.LOSS])
            elapsed = time.perf_counter() - t0
            monitor.add_timing(record, elapsed, effective, state.plan.epoch(step))
            if step % cfg.logging.log_every == 0 or step == total:
                record.update(monitor.machine_load(state.device))
                runtime.log(state, {Metric.STEP: step, **record})
            emit(runtime.step_event(step, total, record, elapsed))
            if step == total or (cfg.validation.validate_every and step % cfg.validation.validate_every == 0):
                with ema.eval_weights(state), fsdp.gathered(state.unet):
                    validation.validate(state)
            if cfg.checkpoint.checkpoint_every and (step % cfg.checkpoint.checkpoint_every == 0 or step == total):
                ckpt.save_checkpoint(state)
            if runtime.stop_requested(state) and step < total:
                interrupted = True
                break
        # A first Ctrl-C / SIGTERM saves; a second one (still handled) stops the save (runtime.StopNow).
        if interrupted and state.last_checkpoint != ckpt.step_dir(state.run_dir, state.step):
            ckpt.save_checkpoint(state)
        with ema.eval_weights(state), fsdp.gathered(state.unet):
            lora_dir = export_lora(state, state.run_dir / LORA_DIR)
        if state.is_main:
            point_latest(state.run_dir)  # only a run with a LoRA (or a checkpoint) becomes `latest`
        acc.wait_for_everyone()
    finally:
        restore()
    # A signal after the last step (its validation, checkpoint or the export above) found nothing left to
    # stop: everything was saved whole. It still ends the command as a signal does (128 + N).
    interrupted = interrupted or state.stop.is_set()
    result = TrainResult(
        run_dir=state.run_dir,
        steps=state.step,
        best_val_loss=state.best_val_loss if math.isfinite(state.best_val_loss) else None,
        lora_dir=lora_dir,
        best_dino=state.best_dino if math.isfinite(state.best_dino) else None,
        interrupted=interrupted,
        elapsed_s=time.perf_counter() - started,
        checkpoint=state.last_checkpoint,
        stop_signal=state.stop_signal if interrupted else 0,
        max_steps=total,
    )
    emit(runtime.end_event(result, interrupted))
    return result


def _train_step(state: TrainState) -> dict[str, Any]:
    """One optimizer step over `--gradient-accumulation` micro-batches; the metrics of the step."""
    cfg, acc = state.cfg, state.accelerator
    accum = cfg.train.gradient_accumulation
    if state.tokens is not None and state.tokens.trainable and state.step >= resolve.embedding_steps(cfg):
        state.tokens.freeze()  # once, at --embedding-steps-fraction (or on a resume past it)
        if not state.text_encoders:
            encode.encode_frozen_captions(state)
    models = [state.unet, *state.text_encoders]
    total = torch.zeros((), device=state.device)
    parts_sum: dict[str, torch.Tensor] = {}
    for micro in range(accum):
        batch = state.plan.batch(state.step, micro)
        batch = dropout.apply(state, batch, state.plan.positions(state.step, micro))
        with contextlib.ExitStack() as stack:
            if micro < accum - 1:  # no gradient all-reduce until the last micro-batch
                for model in models:
                    stack.enter_context(fsdp.no_sync(acc, model))
            loss, parts = compute_loss(state, batch)
            acc.backward(loss / accum)
        total += loss.detach() / accum
        for key, value in parts.items():
            parts_sum[key] = parts_sum.get(key, 0) + value.detach() / accum
    if acc.num_processes > 1:
        total = acc.reduce(total, reduction="mean")
        if state.tokens is not None:  # outside any DDP module: average its gradients by hand
            for vector in state.tokens.parameters():
                if vector.grad is not None:
                    vector.grad = acc.reduce(vector.grad, reduction="mean")
    acc.unscale_gradients()  # fp16: true gradient norms, and clipping in real units
    record: dict[str, Any] = {Metric.LOSS: total.item(), **{k: v.item() for k, v in parts_sum.items()}}
    record.update(monitor.group_grad_norms(state.param_groups))
    if cfg.train.max_grad_norm > 0:
        params = [p for ps in state.param_groups.values() for p in ps]
        fsdp.clip_grad_norm_(params, cfg.train.max_grad_norm, record[Metric.GRAD_NORM_TOTAL])
    for name, group in zip(state.param_groups, state.optimizer.param_groups):
        record[Metric.lr(name)] = group["lr"]
    record.update(optim.effective_lrs(list(state.param_groups), state.optimizer))
    state.optimizer.step()
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    ema.update(state)
    if state.tokens is not None:
        record.update({Metric.embedding_norm(name): norm for name, norm in state.tokens.norms().items()})
    return record


def compute_loss(state: TrainState, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's loss of one batch: the instance part (weighted by the subject masks with
    --masked-loss), plus the weighted class part of prior preservation or of --preservation dop.

    Class images are square: beside an aspect bucket of another size they take a forward of their own.
    """
    cfg, parts = state.cfg, {}
    if batch.mask is not None:
        parts[Metric.MASK_COVERAGE] = batch.mask.to(state.device).float().flatten(1).mean(dim=1).mean()
    if batch.class_cond is not None:  # --preservation dop (train/preservation.py)
        loss, preservation = dop_loss(state, batch, predict, _weight_map(state, batch))
        parts.update({Metric.LOSS_INSTANCE: loss, Metric.LOSS_PRESERVATION: preservation})
        return loss + cfg.prior.preservation_weight * preservation, parts
    if batch.prior is None:
        return losses.diffusion_loss(*predict(state, batch), _weight_map(state, batch)), parts
    joined = batch.with_prior()  # class images have no mask: weight 1
    if joined is not None:
        n, (pred, target, weights), wmap = len(batch), predict(state, joined), _weight_map(state, joined)
        loss = losses.diffusion_loss_of_rows(pred, target, weights, wmap, slice(None, n))
        prior = losses.diffusion_loss_of_rows(pred, target, weights, wmap, slice(n, None))
    else:
        loss = losses.diffusion_loss(*predict(state, batch), _weight_map(state, batch))
        prior = losses.diffusion_loss(*predict(state, batch.prior))
    parts.update({Metric.LOSS_INSTANCE: loss, Metric.LOSS_PRIOR: prior})
    return loss + cfg.prior.prior_loss_weight * prior, parts


def predict(state: TrainState, part: Any, unet: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The denoiser's prediction for a batch (part) on its noisy latents, the target, and the loss weights
    (Min-SNR's, say): all as the objective (train/objective.py) has them."""
    device, objective = state.device, state.objective
    latents, noise, t = part.latents.to(device), part.noise.to(device), part.timesteps.to(device)
    noisy = objective.noisy_input(latents, noise, t)
    embeds, pooled = condition(state, part.cond)
    timesteps, time_ids = objective.model_timesteps(t), part.time_ids.to(device)
    pred = state.arch.denoise(unet or state.unet, noisy, timesteps, embeds, pooled, time_ids)
    return pred, objective.target(latents, noise, t), objective.loss_weights(t)


def _weight_map(state: TrainState, part: Any) -> torch.Tensor | None:
    """--masked-loss: each latent cell's weight (W outside the object, 1 on it); None without masks."""
    if part.mask is None:
        return None
    return losses.mask_weights(part.mask_or_ones().to(state.device), state.cfg.data.unmasked_weight)


def condition(state: TrainState, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings (and SDXL's pooled one): cached, or from the text encoders being trained."""
    device = state.device
    if cond.embeds is not None:
        return cond.cached_on(device)
    encoders = [OnDevice(e, device) for e in state.live_text_encoders]
    return state.arch.encode_tokens(encoders, [ids.to(device) for ids in cond.token_ids])  # type: ignore[union-attr]


def cleanup(state: TrainState) -> None:
    """Close metrics.jsonl and the trackers, release the run folder's and the dataset's locks; give the memory back."""
    runtime.stop_logging(state)
    while state.locks:
        release(state.locks.pop())
    free_memory()


def run_training(cfg: Config, *, resume: Path | None = None, on_event: OnEvent | None = None) -> TrainResult:
    """setup, train, cleanup: the whole `sdlora train`."""
    state = setup(cfg, resume=resume, on_event=on_event)
    try:
        return train(state, on_event)
    finally:
        cleanup(state)
