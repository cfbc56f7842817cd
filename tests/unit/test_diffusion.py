"""Noise schedules, training targets and min-SNR weighting against closed forms and diffusers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from difftrain.config import DiffusionConfig
from difftrain.diffusion.loss import denoising_loss, sample_noise, training_target
from difftrain.diffusion.schedule import build_noise_scheduler, min_snr_weights, snr


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedules_decrease_from_near_one_to_near_zero(schedule):
    sched = build_noise_scheduler(DiffusionConfig(beta_schedule=schedule))
    a = sched.alphas_cumprod
    assert a.shape == (1000,)
    assert torch.all(a[1:] < a[:-1])
    assert a[0] > 0.99 and a[-1] < 0.01


def test_linear_schedule_known_values():
    sched = build_noise_scheduler(DiffusionConfig(beta_schedule="linear"))
    assert sched.betas[0].item() == pytest.approx(1e-4)
    assert sched.betas[-1].item() == pytest.approx(0.02)
    # alpha_bar_0 = 1 - beta_0
    assert sched.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    sched = build_noise_scheduler(DiffusionConfig())
    t = torch.tensor([0, 10, 500, 999])
    a = sched.alphas_cumprod[t]
    torch.testing.assert_close(snr(sched.alphas_cumprod, t), (a / (1 - a)).float())


def test_min_snr_weights_closed_form():
    s = torch.tensor([0.5, 5.0, 50.0])
    gamma = 5.0
    torch.testing.assert_close(min_snr_weights(s, gamma, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(min_snr_weights(s, gamma, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    torch.testing.assert_close(min_snr_weights(s, gamma, "sample"), torch.tensor([0.5, 5.0, 5.0]))
    with pytest.raises(ValueError, match="'bogus'"):
        min_snr_weights(s, gamma, "bogus")


def test_v_target_matches_scheduler_get_velocity_and_closed_form():
    sched = build_noise_scheduler(DiffusionConfig(prediction_type="v_prediction"))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 100, 500, 999])
    target = training_target(sched, x0, noise, t)
    torch.testing.assert_close(target, sched.get_velocity(x0, noise, t))
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_targets_for_epsilon_and_sample():
    x0, noise, t = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.tensor([1, 2])
    assert torch.equal(training_target(build_noise_scheduler(DiffusionConfig()), x0, noise, t), noise)
    assert torch.equal(training_target(build_noise_scheduler(DiffusionConfig(prediction_type="sample")), x0, noise, t), x0)


def test_loss_is_zero_for_a_perfect_model_and_mse_otherwise():
    sched = build_noise_scheduler(DiffusionConfig(prediction_type="epsilon"))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([5, 50, 500])
    perfect = denoising_loss(lambda x, ts: noise, sched, x0, noise, t)
    assert perfect.shape == (3,) and torch.all(perfect == 0)
    zero = denoising_loss(lambda x, ts: torch.zeros_like(x), sched, x0, noise, t)
    torch.testing.assert_close(zero, noise.pow(2).mean(dim=(1, 2, 3)))


def test_model_input_is_the_scheduler_noised_sample():
    sched = build_noise_scheduler(DiffusionConfig())
    x0, noise, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([10, 900])
    seen = {}

    def model(x, ts):
        seen["x"], seen["t"] = x, ts
        return torch.zeros_like(x)

    denoising_loss(model, sched, x0, noise, t)
    torch.testing.assert_close(seen["x"], sched.add_noise(x0, noise, t))
    assert torch.equal(seen["t"], t)


def test_min_snr_weighting_scales_per_example_loss():
    sched = build_noise_scheduler(DiffusionConfig(prediction_type="epsilon"))
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([1, 300, 999])
    plain = denoising_loss(lambda x, ts: torch.zeros_like(x), sched, x0, noise, t)
    weighted = denoising_loss(lambda x, ts: torch.zeros_like(x), sched, x0, noise, t, snr_gamma=5.0)
    expected = plain * min_snr_weights(snr(sched.alphas_cumprod, t), 5.0, "epsilon")
    torch.testing.assert_close(weighted, expected)
    # Low-noise steps (huge SNR) are down-weighted; high-noise steps keep weight 1.
    assert weighted[0] < plain[0] and weighted[2] == pytest.approx(plain[2].item())


def test_variance_channels_are_split_off():
    sched = build_noise_scheduler(DiffusionConfig(prediction_type="epsilon"))
    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 4])
    six = denoising_loss(lambda x, ts: torch.cat([noise, torch.full_like(noise, 9.0)], dim=1), sched, x0, noise, t)
    assert torch.all(six == 0)


def test_offset_noise_adds_a_per_channel_constant():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    plain = torch.randn(2, 3, 8, 8, generator=g1)
    offset = torch.randn(2, 3, 1, 1, generator=g1)
    noisy = sample_noise(torch.Size((2, 3, 8, 8)), g2, torch.device("cpu"), 0.1)
    torch.testing.assert_close(noisy, plain + 0.1 * offset)
    g3 = torch.Generator().manual_seed(3)
    torch.testing.assert_close(sample_noise(torch.Size((2, 3, 8, 8)), g3, torch.device("cpu"), 0.0), plain)


def test_squaredcos_matches_cosine_formula():
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    # Nichol & Dhariwal 2021: alpha_bar(t) = cos^2(((t/T) + s) / (1 + s) * pi / 2), s = 0.008
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert sched.alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-4)
