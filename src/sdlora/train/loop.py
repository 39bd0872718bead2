"""The training loop: one for SD 1.x and SDXL, read top to bottom.

    state = setup(cfg)          # dataset, model, caches, LoRA, optimizer, accelerate, run folder
    result = train(state)       # steps; validation, checkpoints and metrics on the way; the LoRA at the end
    cleanup(state)

`run_training(cfg)` does the three. What differs between SD 1.x and SDXL (text encoders,
pooled embeddings, time ids) is asked of `state.arch`; nothing here branches on the model.
Progress goes out as plain dict events through `on_event` (only on the main process); the
CLI renders them. Everything a user can cause raises an `SdloraError` with one clear line.

A step is a pure function of (seed, step): the batch plan (train/data.py) derives samples,
noise and timesteps from them, and the LoRA, optimizer and scheduler states come from the
checkpoint, so a resumed run matches an uninterrupted one and N processes match one.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

from sdlora import config as config_mod
from sdlora.config import Config
from sdlora.data.manifest import load_manifest
from sdlora.errors import ConfigError, DataError, RunError
from sdlora.run import BEST_DIR, CONFIG, EMBEDDINGS, LORA_DIR, METRICS, SAMPLES_DIR, point_latest
from sdlora.train import cache as cache_mod
from sdlora.train import checkpoint as ckpt
from sdlora.train import losses, monitor, resolve
from sdlora.train.data import (
    BatchPlan,
    Conditioning,
    Example,
    LatentSet,
    load_examples,
    time_ids_for,
    validation_batches,
)

OnEvent = Callable[[dict[str, Any]], None]
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _noop(event: dict[str, Any]) -> None:
    pass


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


@dataclass
class TrainState:
    """Everything the loop needs, built by `setup` in dependency order."""

    cfg: Config
    accelerator: Any
    pipe: Any
    arch: Any
    unet: Any  # prepared (maybe DDP-wrapped)
    text_encoders: list[Any]  # prepared, only those with a LoRA being trained
    noise_scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    plan: BatchPlan
    val_data: LatentSet | None
    sample_conds: list[tuple[torch.Tensor, torch.Tensor | None]] | None  # cached prompt embeddings for samples
    negative_cond: tuple[torch.Tensor, torch.Tensor | None] | None
    run_dir: Path
    weight_dtype: torch.dtype
    emit: OnEvent
    step: int = 0
    best_val_loss: float = math.inf
    best_dino: float = -math.inf  # highest DINO so far (--score-every)
    loss_mean: monitor.RunningMean = field(default_factory=lambda: monitor.RunningMean(window=50))
    metrics: monitor.MetricsWriter | None = None
    last_checkpoint: Path | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    param_groups: dict[str, list[torch.nn.Parameter]] = field(default_factory=dict)
    tokens: Any = None  # TokenEmbeddings (train/embeddings.py) when the token's own embedding trains
    frozen_text_encoders: list[Any] = field(default_factory=list)  # run (not trained) for that embedding

    def request_stop(self) -> None:
        """Stop after the current step, save a checkpoint and the LoRA (what Ctrl-C does)."""
        self.stop.set()

    @property
    def live_text_encoders(self) -> list[Any]:
        """The text encoders the loss runs through (none when all text embeddings are cached)."""
        return self.text_encoders or self.frozen_text_encoders

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def unwrap(self, model: Any) -> Any:
        return self.accelerator.unwrap_model(model)


# ============================================================================ setup


def setup(cfg: Config, *, resume: Path | None = None, on_event: OnEvent | None = None) -> TrainState:
    """Build the run: fail fast on bad input, then model, caches, LoRA, optimizer, accelerate."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    cfg = resolve.resolve_precision(cfg)
    dataset_dir = Path(cfg.data.dataset).expanduser().resolve()
    manifest = load_manifest(dataset_dir)  # DataError for a missing or bad dataset, before any model loads
    token = manifest.token
    if cfg.data.token is not None and cfg.data.token != token:
        raise ConfigError(
            f"--token {cfg.data.token!r} differs from the dataset's {token!r} (its captions carry "
            f"{token!r}); leave --token out, or prepare the dataset with --token {cfg.data.token}"
        )
    resolution = cfg.data.resolution or manifest.resolution
    train_examples = load_examples(dataset_dir, manifest, "train", resolution, token)
    if not train_examples:
        raise DataError(f"{dataset_dir}: no train images in manifest.json (re-run `sdlora prepare` with more photos)")
    val_examples = load_examples(dataset_dir, manifest, "val", resolution, token)
    _check_tracker(cfg.logging.report_to)
    if cfg.train.optimizer == "adamw8bit":
        _bitsandbytes()

    _reset_accelerate_state()
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
        # SDXL's first text encoder leaves its last layer unused (penultimate hidden states).
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.lora.train_text_encoder)],
    )
    emit = on_event if (on_event is not None and accelerator.is_main_process) else _noop
    if cfg.train.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("--mixed-precision fp16 needs a CUDA GPU; on a CPU use bf16 or no")
    if accelerator.device.type == "cuda":  # TF32 matmuls: free speed for fp32 work on Ampere and newer
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    named = Path(cfg.run.runs_dir).expanduser() / cfg.run.name if cfg.run.name else None
    if resume is None and named is not None and named.exists():  # before minutes of loading and encoding
        raise RunError(
            f"{named}: a run with this name exists; choose another --name, or continue it with --resume {named}"
        )

    if cfg.validation.score_every:
        if not val_examples:
            raise DataError(
                f"{dataset_dir}: --score-every compares samples with the val photos and there are none "
                "(re-run `sdlora prepare` with --val-fraction above 0)"
            )
        # Loaded once per run (load_dino caches it): an unknown or uncached scorer fails now, before the
        # base model loads, not at the first validation. Only the main process scores; the others keep it on the CPU.
        from sdlora.evaluate.dino import load_dino

        load_dino(cfg.validation.dino_model, str(accelerator.device) if accelerator.is_main_process else "cpu")

    from sdlora.models.loading import TINY_WARNING, default_resolution, is_tiny, load_pipeline

    pipe, arch = load_pipeline(
        cfg.model.name, revision=cfg.model.revision, variant=cfg.model.variant, vae=cfg.model.vae, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    from diffusers import DDPMScheduler

    # The training noise schedule and target (epsilon or v-prediction) come from the model's own scheduler.
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if noise_scheduler.config.prediction_type not in losses.PREDICTION_TYPES:
        raise ConfigError(
            f"{cfg.model.name}: prediction_type {noise_scheduler.config.prediction_type!r} "
            "is not supported (epsilon or v_prediction)"
        )
    if is_tiny(cfg.model.name):
        emit({"event": "warning", "message": TINY_WARNING})
    native = default_resolution(cfg.model.name, arch)
    if resolution != native:
        emit({"event": "warning", "message": f"training at {resolution} px; {cfg.model.name} was made for {native} px"})

    cfg = config_mod.replace(
        cfg,
        data={
            "dataset": str(dataset_dir),
            "resolution": resolution,
            "token": token,
            "class_word": cfg.data.class_word or manifest.class_word,
        },
        lora={"alpha": cfg.effective_alpha},
    )
    weight_dtype = _DTYPES[cfg.train.mixed_precision]
    device = accelerator.device

    # Pivotal tuning: the token joins the tokenizers now, before any caption is tokenized.
    cfg = resolve.resolve_token_embedding(cfg, pipe, arch)
    tokens = None
    if cfg.embedding.train:
        from sdlora.train.embeddings import add_token

        tokens = add_token(pipe, arch, str(cfg.data.token), str(cfg.embedding.init_token))

    # Prior preservation: class images from the base model, before the LoRA exists.
    class_examples: list[Example] = []
    if cfg.prior.class_prompt:
        class_examples = _class_examples(cfg, pipe, arch, dataset_dir, resolution, accelerator, emit)

    # Encode once: latents (and text embeddings when the text encoders stay frozen).
    cache_root = dataset_dir / cache_mod.CACHE_DIR if cfg.data.cache else None
    want_samples = bool(cfg.validation.prompts)
    with accelerator.main_process_first():  # the main process fills the cache, the others read it
        sets, sample_conds, negative_cond = _encode(
            cfg, pipe, arch, device, weight_dtype, cache_root, [train_examples, val_examples, class_examples], emit
        )
    train_set, val_set, class_set = sets
    if not val_examples:
        emit(
            {
                "event": "warning",
                "message": f"{dataset_dir}: no val images in manifest.json; "
                "no validation loss and no best/ LoRA (re-run `sdlora prepare` with --val-fraction)",
            }
        )
        val_set = None

    # The encoders leave the accelerator: the VAE stays on the CPU for sample images, frozen text encoders go.
    if want_samples:
        pipe.vae.to("cpu")
    else:
        pipe.vae = None
    if not _encodes_text(cfg):
        for name in arch.text_encoders:
            setattr(pipe, name, None)
    _free_memory()

    set_seed(cfg.train.seed)  # the LoRA's initial weights
    unet, trained_encoders = _inject_lora(cfg, pipe, arch, device, weight_dtype)
    frozen_encoders = []
    if tokens is not None:
        tokens.to(device)
        if not trained_encoders:
            frozen_encoders = _frozen_text_encoders(pipe, arch, device, weight_dtype)
    from sdlora.train.export import check_exportable

    check_exportable(unet, trained_encoders or None, arch)  # a LoRA that could not be saved fails now, not at the end

    # Everything that can fail on bad input has run: now the run folder.
    run_dir = _run_dir(cfg, accelerator, resume)
    if accelerator.is_main_process:
        config_mod.save_config(_repeatable(cfg), run_dir / CONFIG)
        point_latest(run_dir)
    groups = {"unet": [p for p in unet.parameters() if p.requires_grad]}
    for name, encoder in zip(arch.text_encoders, trained_encoders):
        groups[name] = [p for p in encoder.parameters() if p.requires_grad]
    if tokens is not None:
        groups["embeddings"] = list(tokens.parameters())
    optimizer = _optimizer(cfg, groups)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )

    prepared = accelerator.prepare(unet, *trained_encoders, optimizer)
    unet, trained_encoders, optimizer = prepared[0], list(prepared[1:-1]), prepared[-1]
    accelerator.register_for_checkpointing(lr_scheduler)
    if tokens is not None:
        accelerator.register_for_checkpointing(tokens)  # the vectors, in the checkpoint beside the LoRA
    ckpt.register_hooks(accelerator, accelerator.unwrap_model)

    plan = BatchPlan(
        train_set,
        class_set if class_examples else None,
        seed=cfg.train.seed,
        batch_size=cfg.train.batch_size,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        gradient_accumulation=cfg.train.gradient_accumulation,
        noise_offset=cfg.train.noise_offset,
        noise_scheduler=noise_scheduler,
    )
    state = TrainState(
        cfg=cfg,
        accelerator=accelerator,
        pipe=pipe,
        arch=arch,
        unet=unet,
        text_encoders=trained_encoders,
        noise_scheduler=noise_scheduler,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        plan=plan,
        val_data=val_set,
        sample_conds=sample_conds,
        negative_cond=negative_cond,
        run_dir=run_dir,
        weight_dtype=weight_dtype,
        emit=emit,
        param_groups=groups,
        tokens=tokens,
        frozen_text_encoders=frozen_encoders,
    )
    if resume is not None:
        _load_checkpoint(state)
    if accelerator.is_main_process:
        state.metrics = monitor.MetricsWriter(run_dir / METRICS)
    if cfg.logging.report_to != "none":
        accelerator.project_configuration.set_directories(str(run_dir))
        accelerator.project_configuration.logging_dir = str(run_dir / "logs")
        accelerator.init_trackers("sdlora", config=_flat(cfg.to_dict()), init_kwargs={"wandb": {"name": run_dir.name}})
    return state


def _encodes_text(cfg: Config) -> bool:
    """Whether the loss runs the text encoders (a text-encoder LoRA or the token's embedding trains),
    rather than reading cached text embeddings."""
    return bool(cfg.lora.train_text_encoder or cfg.embedding.train)


def _embedding_steps(cfg: Config) -> int:
    """Steps during which the token's embedding trains (--embedding-steps-fraction of --max-steps)."""
    return max(1, math.ceil(cfg.embedding.steps_fraction * cfg.train.max_steps))


def _repeatable(cfg: Config) -> Config:
    """The config as saved in the run: without the run's name, so `--config runs/x/config.yaml` makes a new run."""
    return config_mod.replace(cfg, run={"name": None})


def _reset_accelerate_state() -> None:
    """Forget an earlier run's precision and accumulation settings (accelerate keeps them per process).

    accelerate refuses a second `Accelerator` with another mixed precision in the same process;
    a Python session or test suite that trains twice needs a clean slate. The process group
    (PartialState) is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _run_dir(cfg: Config, accelerator: Any, resume: Path | None) -> Path:
    """The run folder: the resumed one, or a new one (never an existing one); the same on every process."""
    from accelerate.utils import broadcast_object_list

    if resume is not None:
        return Path(resume).resolve()
    runs = Path(cfg.run.runs_dir).expanduser().resolve()
    message: list[Any] = [None, None]
    if accelerator.is_main_process:
        name = cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = runs / name
        if folder.exists() and cfg.run.name:
            message[1] = (
                f"{folder}: a run with this name exists; choose another --name, or continue it with --resume {folder}"
            )
        else:
            n = 2
            while folder.exists():
                folder, n = runs / f"{name}-{n}", n + 1
            folder.mkdir(parents=True)
            message[0] = str(folder)
    if accelerator.num_processes > 1:
        broadcast_object_list(message)
    if message[1]:
        raise RunError(message[1])
    return Path(message[0])


def _class_examples(
    cfg: Config, pipe: Any, arch: Any, dataset_dir: Path, resolution: int, accelerator: Any, emit: OnEvent
) -> list[Example]:
    from sdlora.train.prior import ensure_class_images

    folder = (
        Path(cfg.prior.class_dir).expanduser()
        if cfg.prior.class_dir
        else dataset_dir / cache_mod.CACHE_DIR / "class-images"
    )
    common = dict(
        class_prompt=cfg.prior.class_prompt,
        num_images=cfg.prior.num_class_images,
        folder=folder,
        resolution=resolution,
        seed=cfg.train.seed,
        device=accelerator.device,
        model_id=cfg.model.name,
    )
    ensure_class_images(
        pipe,
        arch,
        **common,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        on_progress=lambda what, done, total: emit({"event": "progress", "what": what, "done": done, "total": total}),
    )
    accelerator.wait_for_everyone()
    paths = ensure_class_images(pipe, arch, **common)  # all there now: generates nothing
    return [
        Example(
            path=p,
            caption=str(cfg.prior.class_prompt),
            original_size=(resolution, resolution),
            crop_top_left=(0, 0),
            size=(resolution, resolution),
        )
        for p in paths
    ]


def _encode(
    cfg: Config,
    pipe: Any,
    arch: Any,
    device: Any,
    weight_dtype: torch.dtype,
    cache_root: Path | None,
    example_sets: list[list[Example]],
    emit: OnEvent,
):
    """Latent sets for each example list (each image at its size); cached text embeddings for the sample prompts."""

    def progress(what: str, done: int, total: int) -> None:
        emit({"event": "progress", "what": what, "done": done, "total": total})

    model_key = (cfg.model.name, cfg.model.revision, cfg.model.variant)
    # The SDXL VAE overflows in fp16: encode in float32 unless a replacement (fp16-safe) VAE is given.
    vae_dtype = weight_dtype if cfg.model.vae else torch.float32
    latent_cache = cache_mod.TensorCache(cache_root / "latents" if cache_root else None)
    text_cache = cache_mod.TensorCache(cache_root / "text" if cache_root else None)
    everything = [ex for examples in example_sets for ex in examples]
    latents, flipped, stats = cache_mod.encode_latents(
        pipe.vae,
        [ex.path for ex in everything],
        sizes=[ex.size for ex in everything],
        key_parts=(*model_key, cfg.model.vae),
        cache=latent_cache,
        flip=cfg.data.random_flip,
        device=device,
        dtype=vae_dtype,
        on_progress=progress,
    )
    emit({"event": "cache", "what": "latents", "encoded": stats.encoded, "reused": stats.reused})

    sample_prompts = [_fill(p, cfg) for p in cfg.validation.prompts]
    embeds: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    if not _encodes_text(cfg):
        texts = [ex.caption for ex in everything] + sample_prompts + [""]
        embeds, tstats = cache_mod.encode_texts(
            arch, pipe, texts, key_parts=model_key, cache=text_cache, device=device, on_progress=progress
        )
        emit({"event": "cache", "what": "text", "encoded": tstats.encoded, "reused": tstats.reused})
    for name in arch.text_encoders:
        if getattr(pipe, name) is not None:
            getattr(pipe, name).to("cpu")

    sets, start = [], 0
    for examples in example_sets:
        index = slice(start, start + len(examples))
        start += len(examples)
        captions = [ex.caption for ex in examples]
        if _encodes_text(cfg):
            cond = Conditioning(token_ids=[ids for ids in arch.tokenize(pipe, captions)] if examples else None)
        elif examples:
            cond = Conditioning(
                embeds=torch.stack([embeds[c][0] for c in captions]),
                pooled=torch.stack([embeds[c][1] for c in captions]) if arch.is_sdxl else None,  # type: ignore[misc]
            )
        else:
            cond = Conditioning()
        plain, mirrored = time_ids_for(examples)
        sets.append(
            LatentSet(
                latents=latents[index],
                flipped=flipped[index] if flipped is not None else None,
                cond=cond,
                time_ids=plain,
                time_ids_flipped=mirrored,
            )
        )
    sample_conds = [embeds[p] for p in sample_prompts] if embeds else None
    negative = embeds.get("") if embeds else None
    return sets, sample_conds, negative


def _fill(prompt: str, cfg: Config) -> str:
    return prompt.replace("{token}", str(cfg.data.token)).replace("{class}", str(cfg.data.class_word))


def _inject_lora(cfg: Config, pipe: Any, arch: Any, device: Any, weight_dtype: torch.dtype) -> tuple[Any, list[Any]]:
    """LoRA on the UNet (and text encoders): frozen weights in the compute dtype, trainable ones in float32."""
    from diffusers.training_utils import cast_training_params

    unet = pipe.unet
    unet.requires_grad_(False)
    unet.to(device, dtype=weight_dtype)
    _add_lora(unet, cfg.lora.target_modules, cfg, "--target-modules", "UNet")
    encoders = []
    if cfg.lora.train_text_encoder:
        for name in arch.text_encoders:
            encoder = getattr(pipe, name)
            encoder.requires_grad_(False)
            encoder.to(device, dtype=weight_dtype)
            _add_lora(encoder, cfg.lora.text_encoder_target_modules, cfg, "lora.text_encoder_target_modules", name)
            encoders.append(encoder)
    # fp16/bf16 LoRA weights would underflow their updates ("Attempting to unscale FP16 gradients").
    cast_training_params([unet, *encoders], dtype=torch.float32)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in encoders:
            encoder.gradient_checkpointing_enable()
    for model in (unet, *encoders):
        model.train()
    return unet, encoders


def _frozen_text_encoders(pipe: Any, arch: Any, device: Any, weight_dtype: torch.dtype) -> list[Any]:
    """The text encoders, frozen on the device: the token's embedding trains through them."""
    encoders = []
    for name in arch.text_encoders:
        encoder = getattr(pipe, name)
        encoder.requires_grad_(False)
        encoder.to(device, dtype=weight_dtype)
        encoders.append(encoder)
    return encoders


def _add_lora(model: Any, targets: list[str], cfg: Config, flag: str, what: str) -> None:
    from peft import LoraConfig

    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.effective_alpha,
        lora_dropout=cfg.lora.dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets),
        use_dora=cfg.lora.dora,
    )
    try:
        if hasattr(model, "set_adapters"):  # diffusers models: their own peft integration
            model.add_adapter(lora)
        else:
            # transformers' `add_adapter` insists on a newer peft than it needs; inject directly and
            # record the config where `get_peft_model_state_dict` (export) looks for it.
            from peft import inject_adapter_in_model

            inject_adapter_in_model(lora, model, "default")
            model.peft_config = {"default": lora}
    except ValueError as exc:
        if "not found" in str(exc).lower() or "target modules" in str(exc).lower():
            raise ConfigError(
                f"{flag} {','.join(targets)}: no such modules in the {what} "
                f"(UNet attention: to_q,to_k,to_v,to_out.0; feed-forward: ff.net.0.proj,ff.net.2)"
            ) from None
        raise


def _group_settings(cfg: Config, name: str) -> dict[str, float]:
    """Learning rate and weight decay of one optimizer group (unet, text_encoder[_2], embeddings)."""
    if name == "embeddings":  # weight decay would pull the token's embedding towards zero
        return {"lr": cfg.embedding.learning_rate, "weight_decay": 0.0}
    lr = cfg.train.learning_rate if name == "unet" else (cfg.train.text_encoder_lr or cfg.train.learning_rate)
    return {"lr": lr, "weight_decay": cfg.train.weight_decay}


def _optimizer(cfg: Config, groups: dict[str, list[torch.nn.Parameter]]) -> torch.optim.Optimizer:
    param_groups = [{"params": params, **_group_settings(cfg, name)} for name, params in groups.items()]
    kwargs = dict(betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_epsilon)
    if cfg.train.optimizer == "adamw8bit":
        return _bitsandbytes().optim.AdamW8bit(param_groups, **kwargs)
    return torch.optim.AdamW(param_groups, **kwargs)


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            "--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes, CUDA only); or use --optimizer adamw"
        ) from None
    return bitsandbytes


def _check_tracker(report_to: str) -> None:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb", "clearml": "clearml"}.get(report_to)
    if (
        module
        and importlib.util.find_spec(module) is None
        and not (module == "tensorboard" and importlib.util.find_spec("tensorboardX"))
    ):
        raise ConfigError(f"--report-to {report_to}: {module} is not installed (pip install {module})")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ============================================================================ the loop


def train(state: TrainState, on_event: OnEvent | None = None) -> TrainResult:
    """Train from `state.step` to `--max-steps`; validate, checkpoint and log on the way."""
    cfg, acc = state.cfg, state.accelerator
    if on_event is not None and state.is_main:
        state.emit = on_event
    emit = state.emit
    total = cfg.train.max_steps
    effective = cfg.train.batch_size * acc.num_processes * cfg.train.gradient_accumulation
    emit(
        {
            "event": "start",
            "run_dir": str(state.run_dir),
            "total_steps": total,
            "start_step": state.step,
            "effective_batch": effective,
            "batch_size": cfg.train.batch_size,
            "num_processes": acc.num_processes,
            "gradient_accumulation": cfg.train.gradient_accumulation,
            "train_images": len(state.plan.instances),
            "val_images": len(state.val_data) if state.val_data is not None else 0,
            "arch": state.arch.name,
            "device": str(state.device),
            "mixed_precision": cfg.train.mixed_precision,
            "prediction_type": state.noise_scheduler.config.prediction_type,
            "token_embedding": None
            if state.tokens is None
            else {
                "token": state.tokens.token,
                "init_token": cfg.embedding.init_token,
                "until_step": _embedding_steps(cfg),
            },
        }
    )
    started = time.perf_counter()
    restore = _install_signal_handlers(state)
    monitor.machine_load(state.device)  # primes the CPU counters
    interrupted = False
    try:
        while state.step < total:
            t0 = time.perf_counter()
            record = _train_step(state)
            state.step += 1
            step = state.step
            if not math.isfinite(record["loss"]):
                where = state.last_checkpoint or "none written yet"
                hint = "; or --mixed-precision bf16/no" if cfg.train.mixed_precision == "fp16" else ""
                raise RunError(
                    f"step {step}: the loss is {record['loss']} (training diverged); stopped. "
                    f"Last good checkpoint: {where}. Try a lower --learning-rate{hint}"
                )
            record["loss_mean"] = state.loss_mean.update(record["loss"])
            elapsed = time.perf_counter() - t0
            record.update(
                step_time_s=elapsed,
                images_per_s=effective / elapsed if elapsed > 0 else 0.0,
                epoch=state.plan.epoch(step),
            )
            if step % cfg.logging.log_every == 0 or step == total:
                record.update(monitor.machine_load(state.device))
                _log(state, {"step": step, **record})
            emit(
                {
                    "event": "step",
                    "step": step,
                    "total": total,
                    "loss": record["loss"],
                    "loss_mean": record["loss_mean"],
                    "lr": record["lr"],
                    "it_s": 1.0 / elapsed if elapsed > 0 else 0.0,
                }
            )
            if step == total or (cfg.validation.validate_every and step % cfg.validation.validate_every == 0):
                validate(state)
            if cfg.checkpoint.checkpoint_every and (step % cfg.checkpoint.checkpoint_every == 0 or step == total):
                save_checkpoint(state)
            if _stop_requested(state) and step < total:
                interrupted = True
                break
    finally:
        restore()
    if interrupted:
        if state.last_checkpoint is None or ckpt.step_dir(state.run_dir, state.step) != state.last_checkpoint:
            save_checkpoint(state)
    lora_dir = export_lora(state, state.run_dir / LORA_DIR)
    acc.wait_for_everyone()
    result = TrainResult(
        run_dir=state.run_dir,
        steps=state.step,
        best_val_loss=state.best_val_loss if math.isfinite(state.best_val_loss) else None,
        lora_dir=lora_dir,
        best_dino=state.best_dino if math.isfinite(state.best_dino) else None,
        interrupted=interrupted,
        elapsed_s=time.perf_counter() - started,
        checkpoint=state.last_checkpoint,
    )
    if state.is_main:
        _write_report(state)
    emit(
        {
            "event": "interrupted" if interrupted else "done",
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()},
            "resume_command": f"sdlora train --resume {state.run_dir}",
        }
    )
    return result


def _train_step(state: TrainState) -> dict[str, Any]:
    """One optimizer step over `--gradient-accumulation` micro-batches; the metrics of the step."""
    cfg, acc = state.cfg, state.accelerator
    accum = cfg.train.gradient_accumulation
    if state.tokens is not None and state.tokens.trainable and state.step >= _embedding_steps(cfg):
        _freeze_token_embedding(state)  # once, at --embedding-steps-fraction (or on a resume past it)
    models = [state.unet, *state.text_encoders]
    total = torch.zeros((), device=state.device)
    parts_sum: dict[str, torch.Tensor] = {}
    for micro in range(accum):
        batch = state.plan.batch(state.step, micro)
        with contextlib.ExitStack() as stack:
            if micro < accum - 1:  # no gradient all-reduce until the last micro-batch
                for model in models:
                    stack.enter_context(acc.no_sync(model))
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
    record: dict[str, Any] = {"loss": total.item()}
    record.update({k: v.item() for k, v in parts_sum.items()})
    squares = 0.0
    for name, params in state.param_groups.items():
        norm = monitor.grad_norm(params)
        record[f"grad_norm/{name}"] = norm
        squares += norm**2
    record["grad_norm/total"] = math.sqrt(squares)
    if cfg.train.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for ps in state.param_groups.values() for p in ps], cfg.train.max_grad_norm)
    for name, group in zip(state.param_groups, state.optimizer.param_groups):
        record["lr" if name == "unet" else f"lr/{name}"] = group["lr"]
    state.optimizer.step()
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.tokens is not None:
        record.update({f"embedding_norm/{name}": norm for name, norm in state.tokens.norms().items()})
    return record


def compute_loss(state: TrainState, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Noise-prediction loss of one batch (instance part + weighted class part for prior preservation).

    Class images are square: beside an aspect bucket of another size they take a forward of their own.
    """
    cfg, device, scheduler = state.cfg, state.device, state.noise_scheduler

    def predict(part: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        latents, noise, timesteps = part.latents.to(device), part.noise.to(device), part.timesteps.to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        embeds, pooled = condition(state, part.cond)
        kwargs = state.arch.unet_kwargs(pooled, part.time_ids.to(device) if state.arch.is_sdxl else None)
        pred = state.unet(noisy, timesteps, embeds, return_dict=False, **kwargs)[0]
        target = losses.prediction_target(scheduler, latents, noise, timesteps)
        weights = losses.min_snr_weights(scheduler, timesteps, cfg.train.snr_gamma) if cfg.train.snr_gamma else None
        return pred, target, weights

    if batch.prior is None:
        return losses.diffusion_loss(*predict(batch)), {}
    joined = batch.with_prior()
    if joined is not None:
        n = len(batch)
        pred, target, weights = predict(joined)
        loss = losses.diffusion_loss(pred[:n], target[:n], None if weights is None else weights[:n])
        prior = losses.diffusion_loss(pred[n:], target[n:], None if weights is None else weights[n:])
    else:
        loss = losses.diffusion_loss(*predict(batch))
        prior = losses.diffusion_loss(*predict(batch.prior))
    return loss + cfg.prior.prior_loss_weight * prior, {"loss/instance": loss, "loss/prior": prior}


class _OnDevice:
    """A (possibly DDP-wrapped) text encoder with the `.device` that `Architecture.encode_tokens` reads."""

    def __init__(self, module: Any, device: torch.device):
        self.module, self.device = module, device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def condition(state: TrainState, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings (and SDXL's pooled one): cached, or from the text encoders being trained."""
    device = state.device
    if cond.embeds is not None:
        return cond.embeds.to(device), None if cond.pooled is None else cond.pooled.to(device)
    encoders = [_OnDevice(e, device) for e in state.live_text_encoders]
    return state.arch.encode_tokens(encoders, [ids.to(device) for ids in cond.token_ids])  # type: ignore[union-attr]


@torch.no_grad()
def _freeze_token_embedding(state: TrainState) -> None:
    """Stop training the token's embedding; without a text-encoder LoRA the captions' embeddings are
    final then, so each set's captions are encoded once and later steps read them like a cached run."""
    state.tokens.freeze()
    if state.text_encoders:
        return
    for data in (state.plan.instances, state.plan.classes, state.val_data):
        if data is not None and data.cond.token_ids is not None:
            ids = [t.to(state.device) for t in data.cond.token_ids]
            embeds, pooled = state.arch.encode_tokens(state.frozen_text_encoders, ids)
            data.cond = Conditioning(
                embeds=embeds.float().cpu(), pooled=None if pooled is None else pooled.float().cpu()
            )


def _log(state: TrainState, record: dict[str, Any]) -> None:
    if state.metrics is not None:
        state.metrics.write(record)
    if state.cfg.logging.report_to != "none":
        state.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


# ============================================================================ validation


@torch.no_grad()
def validate(state: TrainState) -> float | None:
    """Validation loss (fixed noise and timesteps) and sample images; keeps best/ up to date."""
    acc, cfg = state.accelerator, state.cfg
    val_loss = None
    if state.is_main:
        models = [state.unwrap(m) for m in (state.unet, *state.text_encoders)]
        for model in models:
            model.eval()
        try:
            if state.val_data is not None:
                val_loss = validation_loss(state)
                _log(state, {"step": state.step, "val_loss": val_loss})
            samples = _sample_images(state) if cfg.validation.prompts else None
        finally:
            for model in models:
                model.train()
        dino = _dino_score(state, samples)
        lower = val_loss is not None and val_loss < state.best_val_loss
        higher = dino is not None and dino > state.best_dino
        if lower:
            state.best_val_loss = val_loss  # type: ignore[assignment]
        if higher:
            state.best_dino = dino  # type: ignore[assignment]
        best = higher if cfg.validation.best_by == "dino" else lower
        if best:
            export_lora(state, state.run_dir / BEST_DIR, main_only=True)
        state.emit(
            {
                "event": "validation",
                "step": state.step,
                "val_loss": val_loss,
                "dino": dino,
                "best": best,
                "samples_dir": str(samples) if samples else None,
            }
        )
    acc.wait_for_everyone()
    return val_loss


def _dino_score(state: TrainState, samples: Path | None) -> float | None:
    """DINO of this validation's sample images vs the val photos, on --score-every steps (and the last)."""
    every = state.cfg.validation.score_every
    if not every or samples is None or not (state.step % every == 0 or state.step == state.cfg.train.max_steps):
        return None
    from sdlora.evaluate.score import EMBEDDINGS_CACHE, dino_similarity_to_val

    listed = json.loads((samples / "validation.json").read_text(encoding="utf-8"))["images"]
    images = [samples / entry["file"] for entry in listed]  # this validation's images, not older leftovers
    dino = dino_similarity_to_val(
        images,
        Path(state.cfg.data.dataset),
        dino_model=state.cfg.validation.dino_model,
        device=str(state.device),
        cache_dir=state.run_dir / EMBEDDINGS_CACHE,
    )
    _log(state, {"step": state.step, "dino": dino})
    return dino


def validation_loss(state: TrainState) -> float:
    """Mean unweighted MSE over the val images at fixed timesteps and noise (no gradient)."""
    unet = state.unwrap(state.unet)
    total, count = 0.0, 0
    assert state.val_data is not None
    batches = validation_batches(
        state.val_data,
        seed=state.cfg.validation.seed,
        loss_timesteps=state.cfg.validation.loss_timesteps,
        num_train_timesteps=int(state.noise_scheduler.config.num_train_timesteps),
        batch_size=max(4, state.cfg.train.batch_size),
    )
    device, scheduler = state.device, state.noise_scheduler
    for batch in batches:
        latents, noise, timesteps = batch.latents.to(device), batch.noise.to(device), batch.timesteps.to(device)
        embeds, pooled = _eval_condition(state, batch.cond)
        kwargs = state.arch.unet_kwargs(pooled, batch.time_ids.to(device) if state.arch.is_sdxl else None)
        with state.accelerator.autocast():
            pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, embeds, return_dict=False, **kwargs)[
                0
            ]
        target = losses.prediction_target(scheduler, latents, noise, timesteps)
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        total += per_sample.sum().item()
        count += per_sample.numel()
    return total / max(1, count)


def _eval_condition(state: TrainState, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor | None]:
    if cond.embeds is not None:
        return condition(state, cond)
    encoders = [state.unwrap(e) for e in state.live_text_encoders]
    with state.accelerator.autocast():
        return state.arch.encode_tokens(encoders, [ids.to(state.device) for ids in cond.token_ids])  # type: ignore[union-attr]


def _sample_images(state: TrainState) -> Path:
    """Sample images for the validation prompts, fixed seeds, under samples/step-NNNNNN/."""
    from sdlora.fsutil import atomic_path, write_json

    cfg, pipe, device = state.cfg, state.pipe, state.device
    folder = state.run_dir / SAMPLES_DIR / f"step-{state.step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    pipe.vae.to(device)
    entries = []
    try:
        for i, prompt in enumerate(cfg.validation.prompts):
            text = _fill(prompt, cfg)
            kwargs: dict[str, Any] = {}
            if state.sample_conds is not None:
                embeds, pooled = state.sample_conds[i]
                neg, neg_pooled = state.negative_cond  # type: ignore[misc]
                if state.arch.is_sdxl and pipe.config.get("force_zeros_for_empty_prompt", False):
                    neg, neg_pooled = torch.zeros_like(neg), torch.zeros_like(neg_pooled)  # as the pipeline does
                kwargs.update(prompt_embeds=embeds[None].to(device), negative_prompt_embeds=neg[None].to(device))
                if state.arch.is_sdxl:
                    kwargs.update(
                        pooled_prompt_embeds=pooled[None].to(device),  # type: ignore[index]
                        negative_pooled_prompt_embeds=neg_pooled[None].to(device),
                    )  # type: ignore[index]
            else:
                kwargs["prompt"] = text
            for k in range(cfg.validation.num_images):
                seed = cfg.validation.seed + k
                with state.accelerator.autocast():
                    image = pipe(
                        num_inference_steps=cfg.validation.steps,
                        guidance_scale=cfg.validation.guidance,
                        height=cfg.data.resolution,
                        width=cfg.data.resolution,
                        generator=torch.Generator("cpu").manual_seed(seed),
                        **kwargs,
                    ).images[0]
                name = f"{i:02d}-{k:02d}.png"
                with atomic_path(folder / name) as tmp:
                    image.save(tmp, format="PNG")
                entries.append(
                    {"file": name, "prompt": text, "prompt_as_written": prompt, "seed": seed, "step": state.step}
                )
    finally:
        pipe.vae.to("cpu")
    write_json(
        folder / "validation.json",
        {"step": state.step, "steps": cfg.validation.steps, "guidance": cfg.validation.guidance, "images": entries},
    )
    if cfg.logging.report_to != "none":
        _log_images(state, folder, entries)
    return folder


def _log_images(state: TrainState, folder: Path, entries: list[dict[str, Any]]) -> None:
    """The sample images to the trackers (tensorboard, wandb, clearml), one series per prompt."""
    import numpy as np
    from PIL import Image

    by_prompt: dict[str, list[np.ndarray]] = {}
    for entry in entries:
        with Image.open(folder / entry["file"]) as img:
            by_prompt.setdefault(f"samples/{entry['prompt']}", []).append(np.asarray(img.convert("RGB")))
    for tracker in state.accelerator.trackers:
        try:
            if tracker.name == "tensorboard":
                tracker.log_images({k: np.stack(v) for k, v in by_prompt.items()}, step=state.step, dataformats="NHWC")
            elif tracker.name == "clearml":
                for k, v in by_prompt.items():
                    tracker.log_images({k: v[0]}, step=state.step)
            else:
                tracker.log_images(by_prompt, step=state.step)
        except Exception as exc:  # a tracker's hiccup must not stop training
            state.emit({"event": "warning", "message": f"could not send sample images to {tracker.name}: {exc}"})


# ============================================================================ saving


def export_lora(state: TrainState, out_dir: Path, *, main_only: bool = False) -> Path:
    """The LoRA in diffusers and kohya format (train/export.py), with metadata."""
    if not state.is_main:
        return out_dir
    from sdlora.train.embeddings import save_embeddings
    from sdlora.train.export import META_PREFIX, build_metadata, save_lora

    cfg = state.cfg
    metadata = build_metadata(
        base_model=cfg.model.name,
        arch=state.arch,
        rank=cfg.lora.rank,
        alpha=cfg.effective_alpha,
        token=str(cfg.data.token),
        class_word=str(cfg.data.class_word),
        steps=state.step,
        resolution=int(cfg.data.resolution),  # type: ignore[arg-type]
        seed=str(cfg.train.seed),
        learning_rate=str(cfg.train.learning_rate),
        dora=str(cfg.lora.dora).lower(),
        run=state.run_dir.name,
    )
    encoders = [state.unwrap(e) for e in state.text_encoders] if state.text_encoders else None
    if state.tokens is not None:
        metadata[f"{META_PREFIX}token_embedding"] = EMBEDDINGS  # the LoRA expects the token's embedding beside it
    save_lora(out_dir, state.unwrap(state.unet), encoders, state.arch, metadata=metadata, kohya_name=state.run_dir.name)
    if state.tokens is not None:
        save_embeddings(
            out_dir / EMBEDDINGS,
            state.tokens,
            state.arch,
            {**metadata, f"{META_PREFIX}init_token": str(cfg.embedding.init_token)},
        )
    return out_dir


def save_checkpoint(state: TrainState) -> Path:
    """accelerate state (LoRA, optimizer, scheduler, RNG) + sdlora.json; keeps the newest --keep-checkpoints."""
    folder = ckpt.step_dir(state.run_dir, state.step)
    state.accelerator.save_state(str(folder))
    if state.is_main:
        ckpt.write_state(
            folder,
            {
                "step": state.step,
                "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
                "best_dino": state.best_dino if math.isfinite(state.best_dino) else None,
                "config_hash": config_mod.config_hash(state.cfg),
                "loss_mean": state.loss_mean.state_dict(),
            },
            _repeatable(state.cfg),
        )
        ckpt.prune(state.run_dir, state.cfg.checkpoint.keep_checkpoints)
        state.emit({"event": "checkpoint", "step": state.step, "path": str(folder)})
    state.last_checkpoint = folder
    state.accelerator.wait_for_everyone()
    return folder


def _load_checkpoint(state: TrainState) -> None:
    step, folder = ckpt.latest_checkpoint(state.run_dir)
    saved = ckpt.read_state(folder)
    if saved.get("config_hash") != config_mod.config_hash(state.cfg):
        state.emit(
            {
                "event": "warning",
                "message": f"{folder}: the config differs from the checkpoint's "
                "(see the warnings above); continuing with the resolved config",
            }
        )
    state.accelerator.load_state(str(folder))
    _apply_optimizer_config(state)
    state.step = int(saved["step"])
    state.best_val_loss = saved["best_val_loss"] if saved.get("best_val_loss") is not None else math.inf
    state.best_dino = saved["best_dino"] if saved.get("best_dino") is not None else -math.inf
    if saved.get("loss_mean"):
        state.loss_mean.load_state_dict(saved["loss_mean"])
    state.last_checkpoint = folder
    if state.is_main:
        _truncate_metrics(state.run_dir / METRICS, state.step)
    state.emit({"event": "resumed", "step": state.step, "path": str(folder)})


def _apply_optimizer_config(state: TrainState) -> None:
    """The config's learning rates and AdamW settings over the checkpoint's (a resume may change them).

    The optimizer's and scheduler's saved states carry the old values; the schedule's position
    (its step count) and the Adam moments are kept.
    """
    cfg, scheduler = state.cfg, state.lr_scheduler
    settings = [_group_settings(cfg, name) for name in state.param_groups]
    scheduler.base_lrs = [s["lr"] for s in settings]
    for group, setting, factor in zip(state.optimizer.param_groups, settings, scheduler.lr_lambdas):
        group.update(
            initial_lr=setting["lr"],
            lr=setting["lr"] * factor(scheduler.last_epoch),
            weight_decay=setting["weight_decay"],
            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
            eps=cfg.train.adam_epsilon,
        )
    scheduler._last_lr = [group["lr"] for group in state.optimizer.param_groups]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint (a crashed run's tail), so the resumed curve has no duplicates."""
    from sdlora.fsutil import write_text

    if not path.is_file():
        return
    import json

    keep = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            continue
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except json.JSONDecodeError:
            continue
        keep.append(line)
    write_text(path, "".join(keep))


def _write_report(state: TrainState) -> None:
    try:
        from sdlora.report import write_report
    except ImportError:
        return
    try:
        write_report(state.run_dir)
    except Exception as exc:  # the report is a convenience: it must never fail a finished training
        state.emit({"event": "warning", "message": f"report.html not written: {exc}".splitlines()[0]})


# ============================================================================ signals and cleanup


def _install_signal_handlers(state: TrainState) -> Callable[[], None]:
    """First Ctrl-C / SIGTERM: finish the step, checkpoint, save the LoRA, stop. A second: stop now."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if state.stop.is_set():
            raise KeyboardInterrupt
        state.stop.set()

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def _stop_requested(state: TrainState) -> bool:
    """Whether any process was asked to stop (all processes must agree, or the next all-reduce hangs)."""
    stop = state.stop.is_set()
    if state.accelerator.num_processes > 1:
        flag = torch.tensor(float(stop), device=state.device)
        stop = bool(state.accelerator.reduce(flag, reduction="sum").item() > 0)
    return stop


def cleanup(state: TrainState) -> None:
    if state.metrics is not None:
        state.metrics.close()
        state.metrics = None
    if state.cfg.logging.report_to != "none":
        state.accelerator.end_training()
    _free_memory()


def run_training(cfg: Config, *, resume: Path | None = None, on_event: OnEvent | None = None) -> TrainResult:
    """setup, train, cleanup: the whole `sdlora train`."""
    state = setup(cfg, resume=resume, on_event=on_event)
    try:
        return train(state, on_event)
    finally:
        cleanup(state)
