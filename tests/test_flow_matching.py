"""Flow matching (train/flow_matching.py) against diffusers' own functions and scheduler, and the batch plan
drawing its timesteps as a pure function of (seed, step)."""

from __future__ import annotations

import math

import pytest
import torch

from sdlora.errors import ConfigError
from sdlora.train.data import BatchPlan, Conditioning, LatentSet
from sdlora.train.flow_matching import FlowMatching, ResolutionShift, shift_sigmas, time_shift_exponential

N = 20_000  # draws per distribution check
SHAPE = (16, 64, 64)  # a FLUX.1 latent of a 512 px image: 32 x 32 = 1024 tokens


def draw(objective: FlowMatching, seed: int = 0, n: int = N, shape=SHAPE) -> torch.Tensor:
    return objective.sample_timesteps(torch.Generator().manual_seed(seed), n, shape)


def test_noisy_input_and_target_by_hand():
    latents, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([0.25, 1.0])
    objective = FlowMatching()
    noisy = objective.noisy_input(latents, noise, t)
    torch.testing.assert_close(noisy[0], 0.75 * latents[0] + 0.25 * noise[0])
    torch.testing.assert_close(noisy[1], noise[1])  # sigma 1: pure noise
    torch.testing.assert_close(objective.noisy_input(latents, noise, torch.zeros(2)), latents)
    torch.testing.assert_close(objective.target(latents, noise, t), noise - latents)
    assert objective.loss_weights(t) is None
    assert objective.prediction_type == "flow_matching"


def test_model_timesteps_scale():
    t = torch.tensor([0.5, 0.1])
    torch.testing.assert_close(FlowMatching().model_timesteps(t), t * 1000)  # the scheduler's (SD3's) form
    torch.testing.assert_close(FlowMatching(timestep_scale=1.0).model_timesteps(t), t)  # FLUX.1's transformer


def test_fixed_shift_equals_the_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas = torch.linspace(1.0, 0.05, 20)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    torch.testing.assert_close(shift_sigmas(sigmas, 3.0), scheduler.sigmas[:-1], atol=1e-6, rtol=0)
    objective = FlowMatching(shift=3.0)
    torch.testing.assert_close(objective.shifted(sigmas, SHAPE), scheduler.sigmas[:-1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("height, width", [(32, 32), (64, 64), (128, 128), (64, 160)])
def test_resolution_shift_equals_the_dynamic_shifting_scheduler(height, width):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    shift = ResolutionShift()
    seq_len = (height // 2) * (width // 2)
    assert shift.seq_len((16, height, width)) == seq_len
    mu = calculate_shift(seq_len)  # diffusers' defaults: 256..4096 tokens, 0.5..1.15
    assert shift.mu(seq_len) == pytest.approx(mu, abs=1e-12)
    # FLUX.1-dev's scheduler config: dynamic shifting, exponential time shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256
    )
    sigmas = torch.linspace(1.0, 0.02, 25)
    scheduler.set_timesteps(sigmas=sigmas.tolist(), mu=mu)
    ours = FlowMatching(resolution_shift=shift).shifted(sigmas, (16, height, width))
    torch.testing.assert_close(ours, scheduler.sigmas[:-1], atol=1e-6, rtol=0)


def test_time_shift_keeps_the_ends_and_moves_towards_noise():
    ends = time_shift_exponential(torch.tensor([0.0, 1.0]), 1.15)
    torch.testing.assert_close(ends, torch.tensor([0.0, 1.0]))
    assert float(time_shift_exponential(torch.tensor([0.5]), 1.15)) == pytest.approx(
        math.exp(1.15) / (math.exp(1.15) + 1)
    )


def test_uniform_sampling_is_uniform():
    sigmas = draw(FlowMatching())
    assert sigmas.dtype == torch.float32 and sigmas.shape == (N,)
    assert 0 <= float(sigmas.min()) and float(sigmas.max()) <= 1
    # U(0, 1): mean 1/2, variance 1/12; the standard error of the mean is 0.002 at N draws, the bounds 5x that.
    assert float(sigmas.mean()) == pytest.approx(0.5, abs=0.01)
    assert float(sigmas.var()) == pytest.approx(1 / 12, abs=0.003)
    # Each tenth of [0, 1] holds a tenth of the draws (binomial sd 0.002; bound 0.01).
    counts = torch.histc(sigmas, bins=10, min=0, max=1) / N
    assert float((counts - 0.1).abs().max()) < 0.01


@pytest.mark.parametrize(
    "objective, mean, std",
    [
        (FlowMatching(sampling="logit_normal"), 0.0, 1.0),  # diffusers' defaults
        (FlowMatching(sampling="logit_normal", logit_mean=-0.5, logit_std=0.7), -0.5, 0.7),
        (FlowMatching(sampling="sigmoid"), 0.0, 1.0),  # sd-scripts' sigmoid_scale 1.0
        (FlowMatching(sampling="sigmoid", sigmoid_scale=2.0), 0.0, 2.0),
    ],
)
def test_logit_of_the_draws_is_normal(objective, mean, std):
    logits = torch.logit(draw(objective).double())
    # Mean and std of N normal draws: standard errors std/141 and std/200; the bounds are 5x those.
    assert float(logits.mean()) == pytest.approx(mean, abs=5 * std / math.sqrt(N))
    assert float(logits.std()) == pytest.approx(std, abs=5 * std / math.sqrt(2 * N))


def test_logit_normal_draws_what_diffusers_draws():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = draw(FlowMatching(sampling="logit_normal", logit_mean=0.3, logit_std=1.2), seed=5, n=64)
    theirs = compute_density_for_timestep_sampling(
        "logit_normal", 64, logit_mean=0.3, logit_std=1.2, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(ours, theirs)


def test_a_shift_moves_the_median_as_the_formula_says():
    # The median of uniform draws, 1/2, goes to 3 * 0.5 / (1 + 2 * 0.5) = 0.75 (sd 0.004 at N draws; bound 0.015).
    assert float(draw(FlowMatching(shift=3.0)).median()) == pytest.approx(0.75, abs=0.015)
    # FLUX.1's shift at 1024 tokens: mu = 0.5 + 0.65 * 768 / 3840 = 0.63, median e^mu / (e^mu + 1).
    mu = 0.5 + 0.65 * (1024 - 256) / (4096 - 256)
    median = float(draw(FlowMatching(resolution_shift=ResolutionShift())).median())
    assert median == pytest.approx(math.exp(mu) / (math.exp(mu) + 1), abs=0.015)
    # A larger image shifts further towards noise.
    big = float(draw(FlowMatching(resolution_shift=ResolutionShift()), shape=(16, 128, 128)).median())
    assert big > median + 0.05


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "sigmoid"])
def test_a_generator_decides_the_draw(sampling):
    objective = FlowMatching(sampling=sampling, shift=3.0)
    assert torch.equal(draw(objective, seed=7, n=16), draw(objective, seed=7, n=16))
    assert not torch.equal(draw(objective, seed=7, n=16), draw(objective, seed=8, n=16))


def test_loss_weightings_are_diffusers_sd3_ones():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    t = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(
        FlowMatching(weighting="cosmap").loss_weights(t), compute_loss_weighting_for_sd3("cosmap", t)
    )
    torch.testing.assert_close(
        FlowMatching(weighting="sigma_sqrt").loss_weights(t), compute_loss_weighting_for_sd3("sigma_sqrt", t)
    )
    # A draw of exactly 0 gets the weight of the schedule's smallest sigma, not infinity.
    assert float(FlowMatching(weighting="sigma_sqrt").loss_weights(torch.tensor([0.0]))) == pytest.approx(1e6)


def test_validation_timesteps_are_evenly_spaced_sigmas():
    torch.testing.assert_close(
        FlowMatching(shift=3.0).validation_timesteps(4), torch.tensor([0.125, 0.375, 0.625, 0.875])
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampling": "mode"}, "unknown timestep sampling 'mode'"),
        ({"weighting": "snr"}, "unknown loss weighting 'snr'"),
        ({"shift": 0.0}, "must be positive"),
        ({"shift": 3.0, "resolution_shift": ResolutionShift()}, "exclude each other"),
        ({"sigmoid_scale": -1.0}, "must be positive"),
    ],
)
def test_bad_settings_fail_with_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FlowMatching(**kwargs)


def _latent_set(sizes: list[tuple[int, int]]) -> LatentSet:
    latents = [torch.full((16, h, w), float(i + 1)) for i, (h, w) in enumerate(sizes)]
    ids = torch.zeros(len(sizes), 6)
    return LatentSet(
        latents=latents,
        flipped=None,
        time_ids=ids,
        time_ids_flipped=ids.clone(),
        cond=Conditioning(embeds=torch.zeros(len(sizes), 8, 4)),
    )


def _plan(data: LatentSet, num_processes: int = 1, process_index: int = 0, batch_size: int = 4) -> BatchPlan:
    return BatchPlan(
        data,
        None,
        seed=11,
        batch_size=batch_size,
        num_processes=num_processes,
        process_index=process_index,
        gradient_accumulation=1,
        noise_offset=0.0,
        objective=FlowMatching(resolution_shift=ResolutionShift()),
    )


def test_the_batch_plan_draws_flow_sigmas_as_a_pure_function_of_seed_and_step():
    data = _latent_set([(32, 32)] * 4 + [(64, 64)] * 4)
    single = _plan(data)
    for step in range(4):
        batch = single.batch(step, 0)
        assert batch.timesteps.dtype == torch.float32
        assert bool(((batch.timesteps >= 0) & (batch.timesteps <= 1)).all())
        # A fresh plan (a resumed run) draws the same; two processes of 2 draw the same halves.
        again = _plan(data).batch(step, 0)
        halves = [_plan(data, 2, p, batch_size=2).batch(step, 0) for p in range(2)]
        for name in ("latents", "noise", "timesteps"):
            assert torch.equal(getattr(again, name), getattr(batch, name)), (step, name)
            assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(batch, name)), (step, name)


FLOW_FLAGS = {"train.max_steps": 4, "validation.validate_every": 2, "checkpoint.checkpoint_every": 2}


@pytest.fixture
def flow_family(monkeypatch):
    """tiny-sd's family handing out flow matching: the seam, with no other change."""
    from sdlora.models.families.unet_clip import UNetClipFamily

    objective = FlowMatching(sampling="sigmoid", shift=3.0)
    monkeypatch.setattr(UNetClipFamily, "training_objective", lambda self, pipe, train: objective)


def test_the_loop_trains_whatever_objective_the_family_gives(tmp_path, tiny_dataset, flow_family):
    """The loop, batch plan and validation name no DDPM: flow matching trains through them unchanged."""
    from sdlora.train import loop
    from test_train import Events, steps_of, tiny_cfg

    events = Events()
    result = loop.run_training(tiny_cfg(tmp_path, tiny_dataset, FLOW_FLAGS), on_event=events)
    assert events.of("start")[0]["prediction_type"] == "flow_matching"
    losses = [r["loss"] for r in steps_of(result.run_dir)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert result.best_val_loss is not None and math.isfinite(result.best_val_loss)


@pytest.mark.slow  # three trainings: ~40 s on a busy 2-core machine
def test_a_resumed_flow_matching_run_matches_an_uninterrupted_one(tmp_path, tiny_dataset, flow_family):
    from sdlora.train import loop, resolve
    from test_train import steps_of, tiny_cfg

    straight = loop.run_training(tiny_cfg(tmp_path / "a", tiny_dataset, FLOW_FLAGS))
    state = loop.setup(tiny_cfg(tmp_path / "b", tiny_dataset, FLOW_FLAGS))

    def stop_at_2(event: dict) -> None:
        if event["event"] == "step" and event["step"] == 2:
            state.request_stop()  # what Ctrl-C does

    try:
        assert loop.train(state, stop_at_2).interrupted
    finally:
        loop.cleanup(state)
    run_dir, cfg, _ = resolve.resume_run(state.run_dir, [{}], ("command line",))
    loop.run_training(cfg, resume=run_dir)
    expected = [r["loss"] for r in steps_of(straight.run_dir)]
    assert [r["loss"] for r in steps_of(run_dir)] == pytest.approx(expected, abs=1e-5)
