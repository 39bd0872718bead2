"""FLUX.1's `--train-text-encoder` on tiny-flux: a LoRA on CLIP-L alone (`Family.lora_text_encoders`) beside a
frozen T5 the loss still runs, as sd-scripts' lora_flux.py and diffusers' train_dreambooth_lora_flux.py train
it; checkpointed and resumed, written in the diffusers file (`text_encoder.` keys FluxPipeline.load_lora_weights
reads) and in the kohya file (`lora_te1_` + CLIP's module path, as sd-scripts and ComfyUI name CLIP-L); with
the token's own embedding beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from recipe_helpers import assert_same_lora, stopped_and_resumed
from sdlora.config import load_config
from sdlora.models import load_pipeline
from sdlora.models.families import FLUX1, SD1
from sdlora.run import DIFFUSERS_LORA, EMBEDDINGS
from sdlora.train import loop


def flux_cfg(tmp_path: Path, dataset: Path, **flags):
    base = {
        "model.name": "tiny-flux",
        "data.dataset": str(dataset),
        "run.runs_dir": str(tmp_path / "runs"),
        "train.max_steps": 2,
        "train.learning_rate": 1e-3,
        "validation.validate_every": 0,
        "validation.prompts": [],
        "checkpoint.checkpoint_every": 0,
        "train.mixed_precision": "no",
        "lora.train_text_encoder": True,
    }
    return load_config(None, {**base, **flags}, [])


def has_lora(model: torch.nn.Module) -> bool:
    return any(hasattr(module, "lora_A") for module in model.modules())


def clip_pooled(encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder(ids, output_hidden_states=False).pooler_output


def test_the_family_says_which_encoders_a_text_encoder_lora_trains():
    assert FLUX1.lora_text_encoders() == ("text_encoder",)  # CLIP-L; T5-XXL (text_encoder_2) stays frozen
    assert SD1.lora_text_encoders() == SD1.text_encoders


def test_clip_l_trains_t5_stays_frozen_and_both_files_carry_clip_ls_lora(tmp_path: Path, tiny_dataset: Path):
    state = loop.setup(flux_cfg(tmp_path, tiny_dataset, **{"run.name": "te"}))
    try:
        clip, t5 = state.pipe.text_encoder, state.pipe.text_encoder_2
        assert [state.unwrap(e) for e in state.text_encoders] == [clip] and state.frozen_text_encoders == [t5]
        assert state.live_text_encoders == [state.text_encoders[0], t5]  # the family's order: CLIP-L, then T5
        assert has_lora(clip) and not has_lora(t5)
        assert not any(p.requires_grad for p in t5.parameters())
        assert "text_encoder" in state.param_groups and "text_encoder_2" not in state.param_groups
        before = {n: p.detach().clone() for n, p in clip.named_parameters() if p.requires_grad}
        result = loop.train(state)
        after = dict(clip.named_parameters())
        assert before and all(not torch.equal(before[n], after[n]) for n in before if ".lora_B." in n)

        lora = result.run_dir / "lora"
        tensors = load_file(lora / DIFFUSERS_LORA)
        assert any(k.startswith("text_encoder.") for k in tensors)
        assert not any(k.startswith("text_encoder_2.") for k in tensors)

        # The diffusers file, in a fresh FluxPipeline: CLIP-L's output as the trained encoder gives it.
        ids = torch.randint(0, clip.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))
        clip.eval()
        trained = clip_pooled(clip, ids)
        pipe, _ = load_pipeline("tiny-flux")
        base = clip_pooled(pipe.text_encoder, ids)
        pipe.load_lora_weights(lora)
        assert has_lora(pipe.text_encoder) and not has_lora(pipe.text_encoder_2)
        torch.testing.assert_close(clip_pooled(pipe.text_encoder, ids), trained, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base, trained, atol=1e-4)  # the LoRA changed CLIP-L's output

        # The kohya file: CLIP-L under lora_te1_ (no T5 part), each module's delta the peft one.
        kohya = load_file(lora / "te.safetensors")
        te = {k for k in kohya if not k.startswith("lora_unet_")}
        assert te and all(k.startswith("lora_te1_text_model_encoder_layers_") for k in te)
        saved = yaml.safe_load((result.run_dir / "config.yaml").read_text(encoding="utf-8"))
        scale = float(saved["lora"]["alpha"]) / float(saved["lora"]["rank"])
        root = "text_model." if hasattr(clip, "text_model") else ""
        paths = {
            k[len("text_encoder.") : -len(".lora_A.weight")]
            for k in tensors
            if k.startswith("text_encoder.") and k.endswith(".lora_A.weight")
        }
        assert len(paths) * 3 == len(te)  # lora_down, lora_up, alpha per module
        for path in paths:
            inner = path[len(root) :]
            assert path.startswith(root) and inner.startswith("encoder.layers.")
            name = "lora_te1_text_model_" + inner.replace(".", "_")
            down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
            alpha = float(kohya[f"{name}.alpha"])
            a, b = tensors[f"text_encoder.{path}.lora_A.weight"], tensors[f"text_encoder.{path}.lora_B.weight"]
            torch.testing.assert_close(up @ down * (alpha / down.shape[0]), b @ a * scale, atol=1e-6, rtol=1e-5)
    finally:
        loop.cleanup(state)


@pytest.mark.slow  # 5 s; FLUX.1's resume without the text encoder stays in the default suite
def test_resume_equals_straight_through(tmp_path: Path, tiny_dataset: Path):
    flags = {"train.max_steps": 4, "train.lr_scheduler": "cosine"}
    straight = loop.run_training(flux_cfg(tmp_path, tiny_dataset, **flags, **{"run.name": "straight"}))
    resumed, _, _ = stopped_and_resumed(flux_cfg(tmp_path, tiny_dataset, **flags, **{"run.name": "halves"}), 2)
    assert resumed.steps == 4
    assert any(key.startswith("text_encoder.") for key in assert_same_lora(straight, resumed))


def test_with_the_tokens_embedding_both_train(tmp_path: Path, tiny_dataset: Path):
    """Pivotal tuning beside the CLIP-L LoRA: the token's vectors train through CLIP-L (with its LoRA) and the
    frozen T5; the run writes both the LoRA's CLIP-L part and the embedding."""
    flags = {"embedding.train": True, "embedding.steps_fraction": 1.0, "run.name": "piv"}
    state = loop.setup(flux_cfg(tmp_path, tiny_dataset, **flags))
    try:
        assert state.tokens is not None and state.frozen_text_encoders == [state.pipe.text_encoder_2]
        before = [p.detach().clone() for p in state.tokens.parameters()]
        result = loop.train(state)
        assert any(not torch.equal(b, p) for b, p in zip(before, state.tokens.parameters()))
        assert any(k.startswith("text_encoder.") for k in load_file(result.lora_dir / DIFFUSERS_LORA))
        assert (result.lora_dir / EMBEDDINGS).is_file()
    finally:
        loop.cleanup(state)
