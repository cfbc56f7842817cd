"""Flow matching (diffusion/flow.py): interpolation and target against closed form, SD3's timestep densities,
the resolution shift against diffusers' own formula, the flow samplers on an exact velocity, and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from difftrain.config import ConfigError, DiffusionConfig, load_config
from difftrain.diffusion.flow import FlowMatchingObjective, resolution_mu, resolution_shift
from difftrain.diffusion.objectives import OBJECTIVES
from difftrain.sampling.sample import sample
from difftrain.sampling.schedulers import is_flow_schedule, make_scheduler

N = 1000


def objective(**fields) -> FlowMatchingObjective:
    return FlowMatchingObjective.from_config(DiffusionConfig(objective="flow_matching", **fields), sample_size=16)


def test_registered_under_its_config_name():
    assert OBJECTIVES["flow_matching"] is FlowMatchingObjective


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_interpolation_and_velocity_target_in_closed_form(shift):
    obj = objective(flow_shift=shift)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    times = torch.tensor([0, 1, 500, N - 1])
    t_unshifted = (N - times).float() / N  # the scheduler's sigmas before the shift, highest first
    sigma = shift * t_unshifted / (1 + (shift - 1) * t_unshifted)
    seen = {}

    def network(x_t, timestep):
        seen["x_t"], seen["t"] = x_t, timestep
        return torch.zeros_like(x_t)

    loss = obj.loss(network, x0, noise, times)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], (1 - s) * x0 + s * noise)
    torch.testing.assert_close(seen["t"], sigma * N)  # the scheduler's timesteps for these sigmas
    # A zero prediction's loss is the mean square of the target noise - x0.
    torch.testing.assert_close(loss, (noise - x0).pow(2).mean(dim=(1, 2, 3)))
    # The exact velocity has zero loss.
    exact = obj.loss(lambda x_t, t: noise - x0, x0, noise, times)
    torch.testing.assert_close(exact, torch.zeros(4))


def test_sigma_one_is_pure_noise_and_the_last_index_nearly_clean():
    obj = objective()
    assert obj.sigmas[0].item() == 1.0
    assert obj.sigmas[N - 1].item() == pytest.approx(1 / N)


@pytest.mark.parametrize("weighting", ["sigma_sqrt", "cosmap"])
def test_loss_weighting_is_sd3s(weighting):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    obj = objective(loss_weighting=weighting)
    x0, noise, times = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2), torch.tensor([3, 400, 900])
    loss = obj.loss(lambda x_t, t: torch.zeros_like(x_t), x0, noise, times)
    sigmas = obj.sigmas[times]
    torch.testing.assert_close(loss, compute_loss_weighting_for_sd3(weighting, sigmas).float())
    if weighting == "cosmap":
        torch.testing.assert_close(loss, 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2)))


def test_logit_normal_times_have_the_configured_logit_statistics():
    mean, std, n = 0.5, 0.8, 200_000
    obj = objective(timestep_sampling="logit_normal", logit_mean=mean, logit_std=std, num_train_timesteps=100_000)
    times = obj.sample_times(n, torch.Generator().manual_seed(0), torch.device("cpu"))
    # Index i holds the (unshifted) sigma 1 - i / N', so u = i / N' up to the 1 / N' of the floor.
    u = ((times.double() + 0.5) / 100_000).clamp(1e-6, 1 - 1e-6)
    logits = torch.log(u / (1 - u))
    # Tolerances: 5 standard errors of the sample mean (std / sqrt(n)) and of the sample std (std / sqrt(2n)),
    # plus the floor's bias, at most (1/N') / (u (1 - u)) in logit units at the tails that matter little here.
    assert logits.mean().item() == pytest.approx(mean, abs=5 * std / math.sqrt(n) + 1e-3)
    assert logits.std().item() == pytest.approx(std, abs=5 * std / math.sqrt(2 * n) + 1e-3)


def test_uniform_times_cover_every_index_evenly():
    obj = objective(num_train_timesteps=10)
    times = obj.sample_times(100_000, torch.Generator().manual_seed(1), torch.device("cpu"))
    counts = torch.bincount(times, minlength=10).double()
    assert times.min() >= 0 and times.max() <= 9
    # Binomial(100000, 0.1): standard deviation ~95; 5 of them.
    assert (counts - 10_000).abs().max().item() < 5 * 95


def test_mode_times_favour_the_middle_and_stay_in_range():
    obj = objective(timestep_sampling="mode", mode_scale=1.29)
    times = obj.sample_times(50_000, torch.Generator().manual_seed(2), torch.device("cpu"))
    assert times.min() >= 0 and times.max() <= N - 1
    middle = ((times >= N // 4) & (times < 3 * N // 4)).double().mean().item()
    assert middle > 0.6  # uniform would give 0.5; SD3's mode density with s = 1.29 puts ~0.7 there
    u = torch.tensor([0.0])  # the draw that maps to u = 1: clamped to the last index, not past the end
    assert (1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)).item() == 1.0


def test_times_come_from_the_generator_only():
    obj = objective(timestep_sampling="logit_normal")
    a = obj.sample_times(8, torch.Generator().manual_seed(3), torch.device("cpu"))
    torch.manual_seed(123)
    b = obj.sample_times(8, torch.Generator().manual_seed(3), torch.device("cpu"))
    torch.testing.assert_close(a, b)


def test_training_sigmas_are_the_exported_schedulers(tmp_path):
    obj = objective(flow_shift=2.5)
    obj.training_scheduler().save_pretrained(tmp_path)
    loaded = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path)
    assert loaded.config.shift == 2.5
    times = obj.sample_times(4096, torch.Generator().manual_seed(4), torch.device("cpu"))
    torch.testing.assert_close(obj.sigmas_at(times), loaded.sigmas[times])
    torch.testing.assert_close(obj.sigmas, loaded.sigmas)


@pytest.mark.parametrize("side", [8, 16, 32, 64, 128])
def test_resolution_shift_is_diffusers_exponential_time_shift(side):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    tokens = (side // 2) ** 2
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert resolution_mu(side) == pytest.approx(mu)
    sigmas = torch.linspace(1, 1 / N, N)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).time_shift(mu, 1.0, sigmas)
    static = FlowMatchEulerDiscreteScheduler(shift=resolution_shift(side)).sigmas
    torch.testing.assert_close(static, dynamic.float())
    obj = FlowMatchingObjective.from_config(DiffusionConfig(objective="flow_matching", flow_shift_by_resolution=True),
                                            sample_size=side)
    assert obj.shift == pytest.approx(math.exp(mu))
    assert "by resolution" in obj.describe()


def _gaussian_velocity(mean: float, std: float):
    """The exact velocity E[noise - x0 | x_t] for x0 ~ N(mean, std^2) per dimension."""

    def denoise(x, t, cond):
        sigma = (t.float() / N).clamp(0, 1)
        a = 1 - sigma
        var = a ** 2 * std ** 2 + sigma ** 2
        centred = x - a * mean
        return sigma / var * centred - (mean + a * std ** 2 / var * centred)

    return denoise


@pytest.mark.parametrize("name, steps", [("euler", 50), ("heun", 25), ("dpm++", 25), ("unipc", 25)])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_samplers_sample_gaussian_data_exactly(name, steps, shift):
    # With the exact velocity of Gaussian data each sampler must end at that Gaussian, up to its own step error
    # (Euler, first order, gets twice the steps). A sampler reading the schedule wrongly (sigmas not shifted as in
    # training, an epsilon or v parameterisation) misses by far more.
    mean, std = 0.5, 0.5
    scheduler = objective(flow_shift=shift).inference_scheduler(name)
    out = sample(_gaussian_velocity(mean, std), scheduler, (1, 32, 32), [0, 1, 2, 3], num_inference_steps=steps)
    # 4096 draws: standard errors 0.008 (mean) and 0.0055 (std); measured step errors are at most 0.023 (Euler at
    # shift 3), 0.013 for the others.
    assert out.mean().item() == pytest.approx(mean, abs=0.03)
    assert out.std().item() == pytest.approx(std, abs=0.03)


def test_flow_schedule_is_recognised_from_a_saved_config(tmp_path):
    obj = objective(flow_shift=2.0)
    obj.training_scheduler().save_pretrained(tmp_path)
    config = FlowMatchEulerDiscreteScheduler.load_config(tmp_path)
    assert is_flow_schedule(config)
    for name in ("euler", "heun", "dpm++", "unipc"):
        sched = make_scheduler(name, config)
        assert is_flow_schedule(sched.config)
        assert sched.config.get("shift", sched.config.get("flow_shift")) == 2.0
    assert not is_flow_schedule(OBJECTIVES["ddpm"].from_config(DiffusionConfig()).scheduler_config)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler-a"])
def test_samplers_that_cannot_sample_flow_are_refused_with_the_list(name):
    with pytest.raises(ValueError, match=r"euler, heun, dpm\+\+, unipc"):
        objective().inference_scheduler(name)


def test_flow_samplers_never_clip():
    for name in ("dpm++", "unipc"):
        assert not objective().inference_scheduler(name, clip_x0=True).config.thresholding


def test_describe_names_shift_density_and_weighting():
    text = objective(timestep_sampling="logit_normal", flow_shift=3.0, loss_weighting="cosmap").describe()
    assert "shift 3" in text and "logit-normal" in text and "cosmap" in text


@pytest.mark.parametrize("overrides, fragment", [
    (["diffusion.timestep_sampling=logit_normal"], "'diffusion.timestep_sampling' = 'logit_normal' is a flow-matching"),
    (["diffusion.flow_shift=3.0"], "'diffusion.flow_shift' = 3.0 is a flow-matching"),
    (["diffusion.objective=flow_matching", "diffusion.snr_gamma=5.0"], "'diffusion.snr_gamma' = 5.0 is a DDPM"),
    (["diffusion.objective=flow_matching", "diffusion.prediction_type=v_prediction"], "'diffusion.prediction_type'"),
    (["diffusion.objective=flow_matching", "diffusion.beta_schedule=squaredcos_cap_v2"], "'diffusion.beta_schedule'"),
    (["diffusion.objective=flow_matching", "sample.scheduler=ddim"],
     "'sample.scheduler' = 'ddim' cannot sample a flow-matching model; use one of euler, heun, dpm++, unipc"),
    (["diffusion.objective=flow_matching", "diffusion.logit_std=0"], "'diffusion.logit_std' = 0"),
    (["diffusion.objective=flow_matching", "diffusion.mode_scale=2.0"], "'diffusion.mode_scale' = 2.0"),
    (["diffusion.objective=flow_matching", "diffusion.flow_shift=2.0", "diffusion.flow_shift_by_resolution=true"],
     "are both set"),
])
def test_bad_combinations_are_refused_naming_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("tiny/digits-class", overrides)
    assert fragment in str(info.value)


def test_flow_matching_refuses_a_pretrained_base_and_euler_in_latent_runs():
    with pytest.raises(ConfigError) as info:
        load_config("tiny/mini-sd", ["diffusion.objective=flow_matching", "model.pretrained=some/base"])
    assert "flow matching trains from scratch only" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config("tiny/mini-sd", ["diffusion.objective=flow_matching", "sample.scheduler=euler"])
    assert "StableDiffusionPipeline" in str(info.value) and "dpm++, unipc" in str(info.value)


def test_flow_digits_preset_loads():
    cfg = load_config("digits-flow")
    assert cfg.diffusion.objective == "flow_matching" and cfg.diffusion.timestep_sampling == "logit_normal"


def test_resume_refuses_a_changed_shift_but_not_a_changed_density():
    from difftrain.training.resume_check import is_unsafe

    # The shift changes the schedule the weights were trained on (and export); the density only where training looks.
    assert is_unsafe("diffusion", "flow_shift") and is_unsafe("diffusion", "flow_shift_by_resolution")
    assert not is_unsafe("diffusion", "timestep_sampling") and not is_unsafe("diffusion", "loss_weighting")
