"""The world's base-model build (sdlora/world/trainers/): each trainer runs a few steps, is deterministic
for its seed, resumes from its checkpoint exactly, and saves a folder its real loader reads
(diffusers from_pretrained, open_clip's local-dir:, the DINO scorer's ViT loader)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sdlora.world import vocab
from sdlora.world.__main__ import app as world_app
from sdlora.world.trainers import clip, common, dino, flux, tokenizer, unet, unet_xl, vae

TINY = 0.0005  # --steps-scale of the fast tests: 1 to 4 steps per trainer, 64 scenes a pool shard
runner = CliRunner()
# One xdist worker runs the module, so `built` (11 s) is built once, not on both workers.
pytestmark = pytest.mark.xdist_group("world_build")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Every trainer's few steps into one output folder, in-process, as the build's phases order them."""
    out = tmp_path_factory.mktemp("world-build")
    threads = torch.get_num_threads()
    try:
        for module in (vae, clip, unet, unet_xl, flux, dino):
            module.main(["--out", str(out), "--steps-scale", str(TINY)])
    finally:
        torch.set_num_threads(threads)
    return out


def test_tokenizer_is_clips_on_world_words():
    """World words get exactly the real CLIP tokenizer's tokens; other text falls back to pieces, never <unk>."""
    from sdlora.models.tiny import clip_tokenizer

    ours, real = tokenizer.world_tokenizer(), clip_tokenizer()
    texts = vocab.class_labels() + vocab.colour_labels() + vocab.prompts("sks toy")
    texts.append(vocab.caption("pink bottle with black checks, eyes and a handle", "night"))
    for text in texts:
        assert ours.convert_ids_to_tokens(ours(text).input_ids) == real.convert_ids_to_tokens(real(text).input_ids)
    assert tokenizer.vocab_size() < 1000
    assert ours.eos_token_id == tokenizer.vocab_size() - 1  # the highest id: argmax pooling finds it
    ids = ours("zebra sksToy").input_ids
    assert ours.unk_token_id not in ids[1:-1] and len(ids) > 4


def test_clip_scorer_loads_and_text_tower_matches(built):
    from transformers import CLIPTextModel

    from sdlora.evaluate.clip import load_clip

    scorer = load_clip(f"local-dir:{built / clip.NAME}", None, device="cpu")
    assert scorer.embed([Image.new("RGB", (32, 32), "red")]).shape == (1, 64)
    text = ["a photo of a red toy on the beach", "a photo of a blue cup in the snow"]
    assert scorer.embed_text(text).shape == (2, 64)
    # world-sd's text encoder is the scorer's text tower: same ids, same last hidden state.
    sd = built / unet.PIPELINE
    encoder = CLIPTextModel.from_pretrained(sd / "text_encoder", torch_dtype=torch.float32).eval()
    ids = scorer.tokenizer(text)
    m = scorer.model
    with torch.no_grad():
        x = m.ln_final(m.transformer(m.token_embedding(ids) + m.positional_embedding, attn_mask=m.attn_mask))
        assert torch.allclose(encoder(ids).last_hidden_state, x, atol=1e-4)
        # The trainer's shortened text pass is open_clip's own encode_text.
        assert torch.allclose(clip.encode_text(m, ids), m.encode_text(ids, normalize=True), atol=1e-5)


def test_dino_scorer_loads(built):
    from sdlora.evaluate.dino import load_dino

    scorer = load_dino(str(built / dino.NAME), device="cpu")
    emb = scorer.embed([Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")])
    assert emb.shape == (2, 128) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-3)


def samples_32_px(pipe, **size) -> bool:
    """The pipeline draws a world prompt (2 steps) at the world's 32 px: its default size (FluxPipeline's
    default is fixed, so world-flux is given it: `size`)."""
    image = pipe(
        "a photo of a red toy on the beach",
        num_inference_steps=2,
        output_type="pil",
        generator=torch.Generator().manual_seed(0),
        **size,
    ).images[0]
    return image.size == (32, 32)


def test_world_sd_is_a_pipeline_folder_that_samples(built):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    folder = built / unet.PIPELINE
    assert (folder / "model_index.json").is_file()
    autoencoder = AutoencoderKL.from_pretrained(folder / "vae")
    assert autoencoder.config.scaling_factor != 0.18215  # measured on the pool, not SD's
    # No config names a folder of the machine that built it (the VAE was loaded from the build's work/).
    assert not [p for p in built.rglob("config.json") if "_name_or_path" in p.read_text(encoding="utf-8")]
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert samples_32_px(pipe)


def test_world_sdxl_is_an_sdxl_pipeline_folder_that_samples(built):
    """world-sdxl: the same VAE, the text tower twice (the second projects the pooled text), an SDXL UNet
    that takes the pooled text and the size ids; sampled at 32 px with the empty prompt as zeros."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(built / unet_xl.PIPELINE, torch_dtype=torch.float32)
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.config.force_zeros_for_empty_prompt
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert samples_32_px(pipe)


def test_world_flux_is_a_flux_dev_pipeline_folder_that_samples(built):
    """world-flux: FLUX.1 [dev]'s architecture (the guidance embedding, T5 states, CLIP's pooled text) on the
    world VAE with FLUX's shift_factor, at 32 px, the size sdlora reads from its VAE."""
    from diffusers import FluxPipeline

    from sdlora.models.families.flux import FLUX1
    from sdlora.models.loading import default_resolution

    folder = built / flux.PIPELINE
    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert pipe.transformer.config.guidance_embeds and pipe.vae.config.shift_factor is not None
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel" and pipe.tokenizer_2.model_max_length == 32
    assert default_resolution(str(folder), FLUX1) == 32
    assert samples_32_px(pipe, height=32, width=32, guidance_scale=3.5)


def test_flux_student_starts_as_its_teacher():
    """Guidance distillation starts from the teacher: whatever the guidance value, the student's velocity is
    the teacher's until the guidance embedding learns (its last layer starts at zero)."""
    teacher = flux.build_model(guidance=False).eval()
    with torch.no_grad():  # a teacher that is not at its initial weights
        for param in teacher.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    student = flux.student_of(teacher).eval()
    gen = torch.Generator().manual_seed(0)
    noisy, embeds, pooled = (
        torch.randn(2, 4, 16, 16, generator=gen),
        torch.randn(2, 7, 64, generator=gen),
        torch.randn(2, 128, generator=gen),
    )
    sigmas = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        expected = flux.velocity(teacher, noisy, sigmas, embeds, pooled)
        for guidance in (1.0, 5.0):
            got = flux.velocity(student, noisy, sigmas, embeds, pooled, torch.full((2,), guidance))
            assert torch.allclose(got, expected, atol=1e-5)


def test_trainers_are_deterministic(built, tmp_path):
    """The same seed gives the same weights: a second VAE and ViT, trained apart, are byte-identical."""
    threads = torch.get_num_threads()
    try:
        for module, rel in ((vae, f"{common.WORK}/{vae.NAME}"), (dino, dino.NAME)):
            module.main(["--out", str(tmp_path), "--steps-scale", str(TINY)])
            weights = [
                n for n in ("diffusion_pytorch_model.safetensors", "model.safetensors") if (built / rel / n).is_file()
            ]
            assert weights, f"{rel}: no weights file to compare"
            for name in weights:
                assert (built / rel / name).read_bytes() == (tmp_path / rel / name).read_bytes()
    finally:
        torch.set_num_threads(threads)


def test_interrupted_trainer_resumes_exactly(tmp_path):
    """Killed after step 3 and run again, a trainer ends with the weights of one that was never stopped."""

    def run(ckpt: Path, stop_at: int | None) -> torch.Tensor:
        torch.manual_seed(0)
        model, ema = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        opt = common.adamw(model, 0.1)
        trainer = common.Trainer("t", model, opt, 6, 0.1, 2, ckpt, every=2, ckpt_every=1, ema=ema, ema_decay=0.5)

        def step(i: int):
            if i == stop_at:
                raise KeyboardInterrupt
            x = torch.randn(8, 4, generator=common.step_generator(0, i))
            return model(x).pow(2).mean()

        trainer.run(step)
        return torch.cat([model.weight.detach(), ema.weight.detach()])

    whole = run(tmp_path / "a.pt", None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", 3)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 3
    assert torch.equal(run(tmp_path / "b.pt", None), whole)


def test_unet_without_its_parts_says_what_to_build(tmp_path):
    from sdlora.errors import ModelError

    with pytest.raises(ModelError, match="--only vae"):
        unet.load_parts(tmp_path)


def test_build_rejects_an_unknown_model(tmp_path):
    result = runner.invoke(world_app, ["build", "--out", str(tmp_path), "--only", "gan"])
    assert result.exit_code == 1 and "--only gan" in result.output
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_short_build_samples_and_scores(tmp_path):
    """`python -m sdlora.world build` (two processes per phase) at a small scale: world-sd samples a
    32 px image that world-clip and world-dino score."""
    from diffusers import StableDiffusionPipeline

    from sdlora.evaluate.clip import load_clip
    from sdlora.evaluate.dino import load_dino

    cmd = [sys.executable, "-m", "sdlora.world", "build", "--out", str(tmp_path), "--steps-scale", "0.002"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("world-clip", "vae", "unet", "unet_xl", "flux", "flux-distill", "world-dino"):
        assert f"[{name}] step" in done.stdout  # each trainer printed its curve
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "world-sd", torch_dtype=torch.float32)
    image = pipe(
        "a photo of a blue cup in the snow", num_inference_steps=4, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (32, 32)
    assert load_clip(f"local-dir:{tmp_path / 'world-clip'}", None, device="cpu").embed([image]).shape == (1, 64)
    assert load_dino(str(tmp_path / "world-dino"), device="cpu").embed([image]).shape == (1, 128)
    # Run again: everything is already built, nothing retrains.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "step" not in again.stdout.replace("--steps-scale", "")


def test_checkpoint_of_another_length_is_refused(tmp_path, capsys):
    """A checkpoint from a build with another --steps-scale is not silently resumed: one line, exit 1."""
    from sdlora.errors import ConfigError

    def trainer(steps: int) -> common.Trainer:
        model = torch.nn.Linear(2, 1)
        return common.Trainer("t", model, common.adamw(model, 0.1), steps, 0.1, 1, tmp_path / "t.pt")

    def step(i: int):
        return trainer_model.weight.sum() ** 2

    first = trainer(2)
    trainer_model = first.model
    first.run(step)
    with pytest.raises(ConfigError, match="t.pt: a checkpoint of a 2-step training, this one has 3 steps"):
        trainer(3).run(step)
    # Through a trainer's entry point: the VAE's checkpoint of a 2-step build, rebuilt at 3 steps.
    work = tmp_path / "out" / common.WORK
    work.mkdir(parents=True)
    model = vae.build_model()
    torch.save({"model": model.state_dict(), "opt": {}, "step": 2, "steps": 2, "curve": []}, work / "vae.pt")
    with pytest.raises(SystemExit) as exit_:
        vae.main(["--out", str(tmp_path / "out"), "--steps-scale", "0.002"])
    assert exit_.value.code == 1
    assert "vae.pt: a checkpoint of a 2-step training, this one has 3 steps" in capsys.readouterr().err
    assert not (work / vae.NAME).exists()
