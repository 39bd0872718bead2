"""The config groups: one dataclass field per option, with everything `sdlora train` shows for it.

Each field declares, in one place: its type and default, its help (the docstring under it), and,
when they differ from what the field name gives, its command-line flag(s), help panel and metavar
(`cli(...)` metadata). The flag is `--` + the field name with dashes unless `cli` says otherwise;
the panel is the group's `PANEL` unless `cli` says otherwise. Error messages name fields through
`flag()`, so a message always names a flag that exists (`sdlora.cli.train` builds them from here).

It is longer than the other modules (~490 lines) on purpose: it is the one reference of every
training option, a docstring each, and splitting the groups over files would scatter it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from sdlora.data.buckets import resolution_problem
from sdlora.errors import ConfigError

PRESETS = ("sd15", "sdxl", "tiny", "world")
# `--optimizer` choices, in the order of train/optim.py's OPTIMIZERS table (a test keeps the two equal);
# ADAPTIVE ones find the learning rate themselves (--learning-rate is a multiplier, 1.0 normally).
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "prodigy", "adamw-schedulefree")
ADAPTIVE_OPTIMIZERS = ("prodigy",)
SCHEDULE_FREE_OPTIMIZERS = ("adamw-schedulefree",)
DEFAULT_VALIDATION_PROMPT = "a photo of {token} {class}"

# The help panels of `sdlora train`, in the order they are shown.
PANELS = (
    "Model",
    "Data",
    "LoRA",
    "Token embedding",
    "Training",
    "Precision and memory",
    "Validation",
    "Checkpoints",
    "Logging",
)


def cli(*flags: str, panel: str | None = None, metavar: str | None = None, repeat: bool = False) -> dict[str, Any]:
    """Field metadata for the command line: flag(s) (the first long one is named in messages), the help
    panel (default: the group's), the metavar, and `repeat` (a list given as a repeated flag instead
    of one comma-separated value)."""
    return {"flags": flags, "panel": panel, "metavar": metavar, "repeat": repeat}


class _Group:
    """Shared by all groups: collect every problem, then raise one error naming the flags."""

    PANEL = "Options"

    def _check(self) -> list[str]:
        return []

    def __post_init__(self) -> None:
        problems = self._check()
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def flags(cls, name: str) -> tuple[str, ...]:
        """Every command-line flag of field `name` (long ones first as declared, then short ones)."""
        declared = cls.__dataclass_fields__[name].metadata.get("flags")
        return tuple(declared) if declared else ("--" + name.replace("_", "-"),)

    @classmethod
    def flag(cls, name: str) -> str:
        """The flag that messages name for field `name`."""
        return cls.flags(name)[0]

    @classmethod
    def panel(cls, name: str) -> str:
        return cls.__dataclass_fields__[name].metadata.get("panel") or cls.PANEL

    def _minimums(self, *, at_least_1: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> list[str]:
        """One message per set field below its minimum, naming the flag."""
        problems = [
            f"{self.flag(n)} must be at least 1, got {getattr(self, n)}"
            for n in at_least_1
            if getattr(self, n) is not None and getattr(self, n) < 1  # None: resolved later (the model's)
        ]
        return problems + [
            f"{self.flag(n)} must be >= 0, got {getattr(self, n)}" for n in non_negative if getattr(self, n) < 0
        ]

    def _positive(self, *names: str) -> list[str]:
        """One message per set field that is not > 0, naming the flag."""
        values = ((n, getattr(self, n)) for n in names)
        return [f"{self.flag(n)} must be positive, got {v}" for n, v in values if v is not None and v <= 0]


@dataclass
class ModelArgs(_Group):
    PANEL = "Model"

    name: str = field(
        default="stable-diffusion-v1-5/stable-diffusion-v1-5", metadata=cli("--model", "-m", metavar="NAME")
    )
    """Base model: a hub id or local diffusers folder (SD 1.x, SDXL, FLUX.1, FLUX.2 [klein], Z-Image), an SD 1.x / SDXL .safetensors file, or tiny-sd / tiny-sdxl / tiny-flux / tiny-flux2-klein / tiny-zimage (random weights, for tests)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the base model."""
    variant: Optional[str] = None
    """Weight file variant to load, e.g. fp16 (smaller download, same results in mixed precision)."""
    vae: Optional[str] = field(default=None, metadata=cli(metavar="NAME"))
    """Replacement VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix to encode SDXL latents in fp16."""

    def _check(self) -> list[str]:
        return [] if self.name.strip() else [f"{self.flag('name')} is empty"]


@dataclass
class DataArgs(_Group):
    PANEL = "Data"

    dataset: str = field(default="dataset", metadata=cli("--dataset", "-d", metavar="DIR"))
    """Prepared dataset folder (`sdlora prepare` writes it)."""
    resolution: Optional[int] = None
    """Training resolution in pixels; default: the dataset's (images are center-cropped/resized to it)."""
    token: Optional[str] = None
    """The identifier token in the captions; default: the dataset manifest's."""
    class_word: Optional[str] = None
    """The object's class word (used in validation prompts); default: the dataset manifest's."""
    random_flip: bool = False
    """Also train on mirrored images: more variety, but mirrors text and logos on the object."""
    cache: bool = True
    """Keep encoded latents and text embeddings in <dataset>/.cache so later runs skip the encoders."""
    masked_loss: Optional[bool] = None
    """Weight the loss by the subject masks that `sdlora prepare` made, so the background is not learned; default: on when the dataset has masks."""
    unmasked_weight: float = 0.1
    """Masked loss: weight of the background against 1 on the object (0 ignores it; a little keeps scenes coherent)."""
    caption_dropout: float = field(default=0.0, metadata=cli(metavar="P"))
    """Fraction of samples trained on the empty caption (0.05-0.1): the LoRA also helps unconditioned guidance."""

    def _check(self) -> list[str]:
        problems = []
        if not 0.0 <= self.unmasked_weight <= 1.0:
            problems.append(f"{self.flag('unmasked_weight')} must be in [0, 1], got {self.unmasked_weight}")
        if not 0.0 <= self.caption_dropout < 1.0:
            problems.append(f"{self.flag('caption_dropout')} must be in [0, 1), got {self.caption_dropout}")
        if self.resolution is not None and (problem := resolution_problem(self.resolution, self.flag("resolution"))):
            problems.append(problem)
        if not str(self.dataset).strip():
            problems.append(f"{self.flag('dataset')} is empty")
        return problems


@dataclass
class LoraArgs(_Group):
    PANEL = "LoRA"

    rank: int = 16
    """LoRA rank: higher learns more detail but uses more memory and overfits sooner."""
    alpha: Optional[float] = None
    """LoRA alpha (the update is scaled by alpha/rank); default: equal to the rank."""
    dropout: float = 0.0
    """Dropout on the LoRA input: a little (0.05-0.1) can reduce overfitting on few photos."""
    target_modules: Optional[list[str]] = None
    """Denoiser modules that get a LoRA; default: the model's attention projections (UNet: to_q, to_k, to_v, to_out.0; FLUX.1 also add_q_proj, add_k_proj, add_v_proj, to_add_out); add ff.net.0.proj,ff.net.2 (feed-forward) for more capacity."""
    text_encoder_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"], metadata=cli("--text-encoder-modules")
    )
    """Text-encoder modules that get a LoRA with --train-text-encoder."""
    train_text_encoder: bool = False
    """Also train a LoRA on the text encoder(s) (both for SDXL; CLIP-L alone for FLUX.1, T5 frozen): better
    identity, more memory, no text cache."""
    dora: bool = False
    """DoRA (weight-decomposed LoRA, peft's use_dora): often better at low rank, about 2x slower steps."""
    loraplus_ratio: Optional[float] = field(default=None, metadata=cli(metavar="R"))
    """LoRA+: the B (up) matrices learn R times faster than A (the paper suggests 16); off by default."""
    ema_decay: float = field(default=0.0, metadata=cli(metavar="D"))
    """EMA of the LoRA weights (0.999; 0.995 for short runs) for validation, samples, best/ and the export; 0: off."""
    ema_every: int = 1
    """Update the EMA every N optimizer steps (with --ema-decay)."""
    ema_device: Literal["device", "cpu"] = "device"
    """Where the fp32 EMA lives: device (the training device) or cpu (saves accelerator memory, slower)."""
    lora_type: Literal["lora", "lokr", "loha"] = "lora"
    """lora; lokr (Kronecker product: small files, more capacity per parameter) or loha (Hadamard product), exported for ComfyUI/A1111/Forge (LyCORIS)."""
    lokr_factor: Optional[int] = field(default=None, metadata=cli(metavar="F"))
    """LoKr's Kronecker factor (LyCORIS' factor); default: each layer split as evenly as it can; small (4-8) gives smaller files."""
    lokr_decompose_both: bool = False
    """LoKr: also make the first Kronecker factor low-rank (LyCORIS' decompose_both)."""

    def _check(self) -> list[str]:
        problems = self._minimums(at_least_1=("rank",)) + self._positive("alpha")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"{self.flag('dropout')} must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            problems.append(f"{self.flag('target_modules')} is empty; give e.g. to_q,to_k,to_v,to_out.0")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"{self.flag('ema_decay')} must be in [0, 1) (e.g. 0.999; 0 is off), got {self.ema_decay}")
        problems += self._minimums(at_least_1=("ema_every",))
        if self.lora_type != "lora":
            kind = f"{self.flag('lora_type')} {self.lora_type}"
            if self.dora:
                problems.append(f"{self.flag('dora')} needs {self.flag('lora_type')} lora, not {self.lora_type}")
            if self.dropout:
                problems.append(f"{self.flag('dropout')} needs {self.flag('lora_type')} lora ({kind} has none)")
            if self.loraplus_ratio is not None:
                problems.append(
                    f"{self.flag('loraplus_ratio')} needs {self.flag('lora_type')} lora ({kind} has no A/B)"
                )
        if self.lokr_factor is not None and self.lokr_factor < 1:
            problems.append(f"{self.flag('lokr_factor')} must be at least 1 (unset: automatic), got {self.lokr_factor}")
        if self.loraplus_ratio is not None and self.loraplus_ratio < 1:
            problems.append(
                f"{self.flag('loraplus_ratio')} must be at least 1 (16 is the paper's), got {self.loraplus_ratio}"
            )
        return problems


@dataclass
class EmbeddingArgs(_Group):
    PANEL = "Token embedding"

    train: Optional[bool] = field(default=None, metadata=cli("--train-token-embedding"))
    """Pivotal tuning: give the token its own trained embedding (default: on when the tokenizer splits the token, as sksToy; off for a known word such as sks, and for FLUX.1, where T5-XXL then runs in every step while it trains)."""
    init_token: Optional[str] = None
    """Word whose embedding the token's starts from; default: the class word."""
    learning_rate: float = field(default=5e-3, metadata=cli("--embedding-lr"))
    """Learning rate of the token embedding (textual-inversion rates are ~50-100x the LoRA's)."""
    steps_fraction: float = field(default=0.5, metadata=cli("--embedding-steps-fraction"))
    """Train the embedding for this fraction of --max-steps, then freeze it so the LoRA settles on it (1.0: all steps)."""

    def _check(self) -> list[str]:
        problems = self._positive("learning_rate")
        if not 0.0 < self.steps_fraction <= 1.0:
            problems.append(f"{self.flag('steps_fraction')} must be in (0, 1], got {self.steps_fraction}")
        if self.init_token is not None and not self.init_token.strip():
            problems.append(f"{self.flag('init_token')} is empty; give a word such as the class word")
        return problems


_MEMORY = "Precision and memory"


@dataclass
class OptimArgs(_Group):
    PANEL = "Training"

    max_steps: int = 1000
    """Optimizer steps to train; 500-1500 at batch 1 suits 20-200 photos."""
    batch_size: int = 1
    """Images per process per step: larger is smoother and faster per image, uses more memory."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step: a larger effective batch without more memory."""
    learning_rate: float = field(default=1e-4, metadata=cli("--learning-rate", "--lr"))
    """Learning rate of the UNet LoRA: higher learns faster and overfits sooner."""
    text_encoder_lr: Optional[float] = None
    """Learning rate of the text-encoder LoRA; default: --learning-rate."""
    optimizer: Literal[OPTIMIZER_NAMES] = field(default="adamw", metadata=cli(panel=_MEMORY))  # type: ignore[valid-type]
    """adamw; adamw8bit (bitsandbytes, CUDA only: less optimizer memory); prodigy (finds the rate: --lr 1.0); adamw-schedulefree (no schedule)."""
    weight_decay: float = 1e-2
    """AdamW weight decay of the LoRA weights."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    lr_scheduler: Literal["constant", "cosine", "linear", "constant_with_warmup"] = "constant"
    """Learning-rate schedule over --max-steps: constant, cosine, linear or constant_with_warmup."""
    lr_warmup_steps: int = 0
    """Steps of linear warm-up at the start."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = field(default="auto", metadata=cli(panel=_MEMORY))
    """auto (bf16 on GPUs that have it, else fp16; on a CPU bf16 with AVX512-BF16 or AMX, else fp32), no (fp32), fp16 (CUDA) or bf16: faster, less memory; LoRA weights stay fp32."""
    # The field's names for the base's storage (SimpleTuner's base_model_precision: fp8-torchao, nf4-bnb;
    # OneTrainer's FLOAT_8 / NFLOAT_4), without the backend: models/precision.py.
    base_precision: Literal["auto", "bf16", "fp8", "nf4"] = field(default="auto", metadata=cli(panel=_MEMORY))
    """How the frozen denoiser (UNet or transformer) is stored: auto (the --mixed-precision dtype), bf16 (needs --mixed-precision bf16, so the same as auto there: for a config that states it), fp8 (torchao: Linear weights in 1 byte, half of bf16's; CPU too) or nf4 (bitsandbytes: about a quarter; CUDA only); LoRA weights stay fp32."""
    gradient_checkpointing: bool = field(default=False, metadata=cli(panel=_MEMORY))
    """Recompute activations in the backward pass: much less memory, about 30% slower steps."""
    compile: bool = field(default=False, metadata=cli(panel=_MEMORY))
    """torch.compile the UNet's transformer blocks (regional: one compile per block shape): faster GPU steps after a slower first one."""
    seed: int = 0
    """Seed for LoRA init, data order, noise and timesteps: the same seed repeats a run exactly."""
    snr_gamma: Optional[float] = None
    """Min-SNR loss weighting gamma (5.0 is the paper's): faster convergence; off by default."""
    timestep_sampling: Literal["uniform", "logit-normal", "sigmoid", "flux-shift"] = "uniform"
    """Flow-matching models (FLUX.1, FLUX.2 [klein], Z-Image): how training sigmas are drawn: uniform (diffusers' FLUX LoRA script; the UNets' only kind), logit-normal (SD3's), sigmoid (sd-scripts' FLUX example) or, for FLUX.1, flux-shift (sd-scripts' flux_shift: sigmoid, then shifted by the image's size as FLUX.1's scheduler shifts at inference)."""
    shift: Optional[float] = None
    """Flow-matching models (FLUX.1, FLUX.2 [klein], Z-Image): shift training sigmas towards noise, s' = S*s/(1+(S-1)*s); sd-scripts' FLUX example uses 3.1582 with sigmoid. Default: none for FLUX.1; Z-Image: its scheduler's (Turbo: 3.0)."""
    noise_offset: float = 0.0
    """Offset noise (e.g. 0.05): lets the model learn very dark or bright images."""
    prodigy_d_coef: float = field(default=1.0, metadata=cli(panel=_MEMORY))
    """Prodigy's d_coef: scales the rate it finds (below 1 is more careful)."""
    prodigy_safeguard_warmup: bool = field(default=False, metadata=cli(panel=_MEMORY))
    """Prodigy's safeguard_warmup: steadier rate estimates during a warm-up (diffusers' script turns it on)."""
    prodigy_bias_correction: bool = field(default=False, metadata=cli(panel=_MEMORY))
    """Prodigy's use_bias_correction (Adam's bias correction; diffusers' script turns it on)."""

    def _check(self) -> list[str]:
        problems = self._minimums(
            at_least_1=("max_steps", "batch_size", "gradient_accumulation"),
            non_negative=("lr_warmup_steps", "max_grad_norm", "noise_offset"),
        ) + self._positive("learning_rate", "text_encoder_lr", "shift")
        if self.optimizer in SCHEDULE_FREE_OPTIMIZERS and self.lr_scheduler != "constant":
            problems.append(
                f"{self.flag('optimizer')} {self.optimizer} has no learning-rate schedule: drop "
                f"{self.flag('lr_scheduler')} {self.lr_scheduler} ({self.flag('lr_warmup_steps')} is its own warm-up)"
            )
        elif self.optimizer in ADAPTIVE_OPTIMIZERS and self.learning_rate < 0.1:
            problems.append(
                f"{self.flag('optimizer')} {self.optimizer} finds the rate itself: {self.flag('learning_rate')} is a "
                f"multiplier of it, normally 1.0 (got {self.learning_rate})"
            )
        if self.optimizer in ADAPTIVE_OPTIMIZERS and self.text_encoder_lr not in (None, self.learning_rate):
            problems.append(
                f"{self.flag('optimizer')} {self.optimizer} finds one rate for every group: drop "
                f"{self.flag('text_encoder_lr')} {self.text_encoder_lr}"
            )
        if self.prodigy_d_coef <= 0:
            problems.append(f"{self.flag('prodigy_d_coef')} must be positive, got {self.prodigy_d_coef}")
        if (
            self.lr_scheduler == "constant"
            and self.lr_warmup_steps > 0
            and self.optimizer not in SCHEDULE_FREE_OPTIMIZERS
        ):
            problems.append(
                f"{self.flag('lr_warmup_steps')} needs {self.flag('lr_scheduler')} constant_with_warmup, cosine "
                "or linear (constant ignores warm-up)"
            )
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            problems.append(
                f"{self.flag('snr_gamma')} must be positive (5.0 is the paper's choice), got {self.snr_gamma}"
            )
        return problems


@dataclass
class PriorArgs(_Group):
    PANEL = "Data"

    preservation: Literal["none", "images", "dop"] = field(default="none", metadata=cli(metavar="KIND"))
    """Keep the class word's meaning: none, images (prior preservation: class images from --class-prompt, which alone means images) or dop (the base model's own output for the caption with the class word instead of the token: no class images, one more forward per step)."""
    preservation_weight: float = 1.0
    """Weight of the --preservation dop loss against the instance loss."""
    class_prompt: Optional[str] = field(default=None, metadata=cli(metavar="PROMPT"))
    """Prompt for prior-preservation class images (e.g. 'a photo of a toy'); unset = no prior preservation."""
    num_class_images: int = 100
    """Class images to use (generated once with the base model when missing, then cached)."""
    prior_loss_weight: float = 1.0
    """Weight of the class-image loss: higher keeps the class more general, learns the object slower."""
    class_dir: Optional[str] = field(default=None, metadata=cli(metavar="DIR"))
    """Folder of class images (yours are used first); default: <dataset>/.cache/class-images."""

    def _check(self) -> list[str]:
        problems = self._minimums(
            at_least_1=("num_class_images",), non_negative=("prior_loss_weight", "preservation_weight")
        )
        if self.class_prompt is not None and not self.class_prompt.strip():
            problems.append(f"{self.flag('class_prompt')} is empty; give a prompt such as 'a photo of a toy'")
        elif self.preservation == "dop" and self.class_prompt is not None:
            problems.append(
                f"{self.flag('preservation')} dop and {self.flag('class_prompt')} (class images) are two kinds of "
                f"preservation; use one: {self.flag('preservation')} dop without {self.flag('class_prompt')}, "
                f"or {self.flag('class_prompt')} alone"
            )
        elif self.preservation == "images" and self.class_prompt is None:
            problems.append(
                f"{self.flag('preservation')} images needs {self.flag('class_prompt')} (e.g. 'a photo of a toy')"
            )
        return problems

    @property
    def kind(self) -> str:
        """The preservation in use: none, images or dop (--class-prompt alone means images)."""
        return "images" if self.class_prompt else self.preservation


@dataclass
class ValidationArgs(_Group):
    PANEL = "Validation"

    validate_every: int = 100
    """Validation loss and sample images every N steps and at the end (0: only at the end)."""
    prompts: list[str] = field(
        default_factory=lambda: [DEFAULT_VALIDATION_PROMPT],
        metadata=cli("--validation-prompt", metavar="PROMPT", repeat=True),
    )
    """Prompts for the sample images, repeatable ({token} and {class} are filled in); validation.prompts=[] for none."""
    num_images: int = field(default=1, metadata=cli("--validation-images"))
    """Sample images per prompt (seeds seed, seed+1, ...): more shows variety, costs time."""
    steps: Optional[int] = field(default=None, metadata=cli("--validation-steps"))
    """Inference steps per sample image: fewer is cheaper and rougher; default: the model's, at most 20 (SD 20; FLUX.1 [schnell] and the distilled FLUX.2 [klein] 4, Z-Image-Turbo 8)."""
    guidance: Optional[float] = field(default=None, metadata=cli("--validation-guidance"))
    """Guidance scale of the sample images; default: the model's (7.5 classifier-free for SD, 3.5 FLUX.1 [dev]'s distilled, 4.0 FLUX.2 [klein], 0 Z-Image-Turbo, 5.0 Z-Image)."""
    seed: int = field(default=0, metadata=cli("--validation-seed"))
    """Seed of the sample images and of the fixed validation noise (same across steps and runs)."""
    loss_timesteps: int = field(default=5, metadata=cli("--val-loss-timesteps"))
    """Fixed timesteps per val image for the validation loss: more is less noisy, costs forwards."""
    score_every: int = 0
    """DINO of the sample images vs the val photos every N steps (a multiple of --validate-every); 0: off.
    It scores the validation samples, so it costs their sampling time: meant for GPUs."""
    dino_model: str = field(default="facebook/dino-vits16", metadata=cli(metavar="NAME"))
    """DINO scorer for --score-every: a hub id, a local folder, or tiny-dino (random weights, offline)."""
    best_by: Literal["val_loss", "dino"] = "val_loss"
    """What picks best/: val_loss (the lowest validation loss) or dino (the highest DINO; needs --score-every)."""

    def _check(self) -> list[str]:
        problems = self._minimums(
            at_least_1=("num_images", "steps", "loss_timesteps"), non_negative=("validate_every", "score_every")
        )
        every, score = self.flag("validate_every"), self.flag("score_every")
        if self.score_every > 0 and self.validate_every > 0 and self.score_every % self.validate_every:
            problems.append(
                f"{score} {self.score_every} must be a multiple of {every} {self.validate_every} "
                "(DINO scores the validation samples)"
            )
        if self.score_every and not self.prompts:
            problems.append(f"{score} scores the validation samples: give at least one {self.flag('prompts')}")
        if self.best_by == "dino" and not self.score_every:
            problems.append(f"{self.flag('best_by')} dino needs {score} N (DINO is only computed then)")
        return problems


@dataclass
class LoggingArgs(_Group):
    PANEL = "Logging"

    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    report_to: Literal["none", "tensorboard", "wandb", "clearml"] = "none"
    """Also send metrics to a tracker: none, tensorboard, wandb or clearml (install it first)."""

    def _check(self) -> list[str]:
        return self._minimums(at_least_1=("log_every",))


@dataclass
class CheckpointArgs(_Group):
    PANEL = "Checkpoints"

    checkpoint_every: int = 250
    """Save a resumable checkpoint every N steps (0: only on Ctrl-C)."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints (each holds LoRA, optimizer and RNG states)."""

    def _check(self) -> list[str]:
        return self._minimums(at_least_1=("keep_checkpoints",), non_negative=("checkpoint_every",))


@dataclass
class RunArgs(_Group):
    PANEL = "Checkpoints"

    runs_dir: str = field(default="runs", metadata=cli(metavar="DIR"))
    """Folder that holds the run folders (and the `latest` link)."""
    name: Optional[str] = None
    """Run folder name; default: the start time (YYYYMMDD-HHMMSS)."""

    def _check(self) -> list[str]:
        if self.name is not None and (not self.name.strip() or "/" in self.name or self.name in (".", "..", "latest")):
            return [f"{self.flag('name')} {self.name!r}: give a plain folder name (not 'latest', no '/')"]
        return []


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    embedding: EmbeddingArgs = field(default_factory=EmbeddingArgs)
    train: OptimArgs = field(default_factory=OptimArgs)
    prior: PriorArgs = field(default_factory=PriorArgs)
    validation: ValidationArgs = field(default_factory=ValidationArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def __post_init__(self) -> None:
        problems = []
        if self.train.lr_warmup_steps > self.train.max_steps:
            warmup, steps = OptimArgs.flag("lr_warmup_steps"), OptimArgs.flag("max_steps")
            problems.append(f"{warmup} {self.train.lr_warmup_steps} is more than {steps} {self.train.max_steps}")
        if self.lora.ema_decay and self.train.optimizer in SCHEDULE_FREE_OPTIMIZERS:
            problems.append(
                f"{LoraArgs.flag('ema_decay')} does not combine with {OptimArgs.flag('optimizer')} "
                f"{self.train.optimizer} (it averages the weights itself); use one of them"
            )
        if self.lora.loraplus_ratio is not None and self.train.optimizer in ADAPTIVE_OPTIMIZERS:
            problems.append(
                f"{LoraArgs.flag('loraplus_ratio')} does not combine with {OptimArgs.flag('optimizer')} "
                f"{self.train.optimizer} (it sets each group's rate itself); use one of them"
            )
        if problems:
            raise ConfigError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def effective_alpha(self) -> float:
        return float(self.lora.alpha if self.lora.alpha is not None else self.lora.rank)


GROUPS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _default(cls: type, name: str) -> Any:
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
