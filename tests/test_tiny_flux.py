"""The tiny FLUX.1 (models/tiny.py `tiny_flux`): built offline, a real FluxPipeline that generates.

`--model tiny-flux` of the FLUX.1 family (tests/test_flux_family.py trains it)."""

from __future__ import annotations

import numpy as np
import torch

from sdlora.models.tiny import t5_tokenizer, tiny_flux


def test_the_t5_tokenizer_is_built_offline_and_ends_texts_as_t5_does():
    tokenizer = t5_tokenizer()
    ids = tokenizer("a photo of sks toy", padding="max_length", max_length=10, truncation=True).input_ids
    assert ids[5] == tokenizer.eos_token_id == 1 and ids[6:] == [tokenizer.pad_token_id] * 4 == [0] * 4
    assert tokenizer.unk_token_id not in ids  # every word of the prompt is in the vocabulary
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of sks toy"
    spelled = tokenizer("Zebra-42!").input_ids  # unknown words fall back to characters, not <unk>
    assert tokenizer.unk_token_id not in spelled and tokenizer.decode(spelled, skip_special_tokens=True) == "Zebra-42!"


def test_tiny_flux_is_a_flux_pipeline_that_generates_at_64_px():
    from diffusers import FluxPipeline

    pipe = tiny_flux()
    assert isinstance(pipe, FluxPipeline)
    assert pipe.transformer.config.guidance_embeds and pipe.vae.config.latent_channels == 16
    assert pipe.scheduler.config.use_dynamic_shifting
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe(
            "a photo of sks toy",
            height=64,
            width=64,
            num_inference_steps=2,
            guidance_scale=3.5,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    images = generate()
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(generate(), images)  # a seed decides the image
    # Every build has the same weights (a fixed seed), as the other tiny models.
    again = tiny_flux()
    for (name, a), (_, b) in zip(pipe.transformer.state_dict().items(), again.transformer.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_flow_matching_step_on_the_tiny_flux_transformer_trains():
    """What the FLUX.1 family will do behind `Family.denoise`: pack 2 x 2 latent cells into tokens, call the
    transformer with sigma as its timestep and the guidance value, unpack; the flow-matching loss then
    gives finite gradients and one SGD step lowers it on the same batch."""
    from diffusers import FluxPipeline

    from sdlora.train.flow_matching import FlowMatching, ResolutionShift
    from sdlora.train.losses import diffusion_loss

    pipe = tiny_flux()
    objective = FlowMatching(resolution_shift=ResolutionShift(), timestep_scale=1.0)  # FLUX.1 takes sigma
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(["a photo of sks toy"] * 2, None, max_sequence_length=16)
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 16, 32, 32, generator=gen), torch.randn(2, 16, 32, 32, generator=gen)
    t = objective.sample_timesteps(gen, 2, latents.shape[1:])
    image_ids = FluxPipeline._prepare_latent_image_ids(2, 16, 16, "cpu", torch.float32)

    def loss() -> torch.Tensor:
        noisy = FluxPipeline._pack_latents(objective.noisy_input(latents, noise, t), 2, 16, 32, 32)
        packed = pipe.transformer(
            hidden_states=noisy,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=objective.model_timesteps(t),
            img_ids=image_ids,
            txt_ids=text_ids,
            guidance=torch.full((2,), 3.5),
            return_dict=False,
        )[0]
        pred = FluxPipeline._unpack_latents(packed, 64, 64, pipe.vae_scale_factor)
        return diffusion_loss(pred, objective.target(latents, noise, t), objective.loss_weights(t))

    before = loss()
    before.backward()
    grads = [p.grad for p in pipe.transformer.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            if p.grad is not None:
                p.sub_(1e-2 * p.grad)
        assert float(loss()) < float(before)
