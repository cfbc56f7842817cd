"""Sampling: scheduler registry, golden sampler values, guidance, per-image seeds, grids."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from difftrain.config import DiffusionConfig
from difftrain.diffusion.schedule import build_noise_scheduler
from difftrain.sampling.generate import generate
from difftrain.sampling.grid import make_grid
from difftrain.sampling.guidance import guided_prediction
from difftrain.sampling.sample import parse_seeds, sample
from difftrain.sampling.schedulers import SCHEDULERS, make_scheduler

# Golden values: (sum |x|, mean x) after 10 steps from seeds [0, 1] with a fixed dummy denoiser.
# Regenerate (only after a deliberate change to the sampling loop or a diffusers upgrade) by printing
# `out.abs().sum()` and `out.mean()` in test_sampler_golden_values.
GOLDEN = {
    "ddpm": (87.4994, 0.093763),
    "ddim": (127.4548, -0.017574),  # x0 clipped, stepped with the noise it implies
    "dpm++": (127.5600, -0.017061),  # log-SNR-uniform steps, x0 clipped to [-1, 1] (make_scheduler)
    "unipc": (127.5218, -0.017333),  # x0 clipped to [-1, 1]
    "euler": (10410.0967, -2.081921),
    "euler-a": (8834.6895, -0.652902),
    "heun": (8523.1436, -1.641214),
}


def _dummy(x, t, cond):
    return 0.1 * x + 0.01 * (t.float() / 1000)


def _base_config(prediction_type: str = "epsilon"):
    return build_noise_scheduler(DiffusionConfig(prediction_type=prediction_type)).config


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_sampler_golden_values(name):
    out = sample(_dummy, make_scheduler(name, _base_config()), (1, 8, 8), [0, 1], num_inference_steps=10)
    total, mean = GOLDEN[name]
    assert out.abs().sum().item() == pytest.approx(total, rel=1e-4)
    assert out.mean().item() == pytest.approx(mean, rel=1e-3, abs=1e-5)


def test_pixel_samplers_clip_x0_and_change_nothing_else():
    # Without clipping, DDIM, DPM++ and UniPC give exactly what they gave before clipping was added (those
    # were the golden values then); with it the dummy's runaway samples end inside [-1, 1].
    unclipped = {"ddim": (4235.5991, -0.792133), "dpm++": (9309.8906, -1.824737), "unipc": (9247.0146, -1.813703)}
    for name, (total, mean) in unclipped.items():
        out = sample(_dummy, make_scheduler(name, _base_config(), clip_x0=False), (1, 8, 8), [0, 1],
                     num_inference_steps=10)
        assert out.abs().sum().item() == pytest.approx(total, rel=1e-4)
        assert out.mean().item() == pytest.approx(mean, rel=1e-3, abs=1e-5)
        clipped = sample(_dummy, make_scheduler(name, _base_config()), (1, 8, 8), [0, 1], num_inference_steps=10)
        assert clipped.abs().max().item() <= 1.0 + 1e-6
    # Latent schedules (clip_sample=False) are never clipped: latents have no fixed range.
    latent = build_noise_scheduler(DiffusionConfig(), latent=True).config
    for name in ("ddpm", "ddim", "dpm++", "unipc"):
        sched = make_scheduler(name, latent)
        assert not (sched.config.get("thresholding") or sched.config.get("clip_sample")), name
    assert make_scheduler("dpm++", _base_config()).config.thresholding is True
    assert make_scheduler("dpm++", _base_config()).config.sample_max_value == 1.0


def test_schedulers_keep_the_training_schedule():
    base = _base_config("v_prediction")
    for name in SCHEDULERS:
        sched = make_scheduler(name, base)
        assert sched.config.prediction_type == "v_prediction", name
        assert sched.config.num_train_timesteps == 1000
    # Pixel schedules: DDPM and DDIM clip x0 (DDIM consistently, see the sampling loop).
    assert make_scheduler("ddim", _base_config()).config.clip_sample is True
    assert make_scheduler("ddpm", _base_config()).config.clip_sample is True
    assert type(make_scheduler("DPMPP", base)).__name__ == "DPMSolverMultistepScheduler"
    assert make_scheduler("dpm++", base).config.use_lu_lambdas is True
    with pytest.raises(ValueError, match="'plms'.*ddpm"):
        make_scheduler("plms", base)


def test_batched_guidance_equals_two_separate_forwards():
    torch.manual_seed(0)
    weight = torch.randn(5, 3)

    def denoiser(x, t, cond):
        return x * weight[cond].view(-1, 3, 1, 1) + t

    x = torch.randn(4, 3, 2, 2)
    cond = torch.tensor([0, 1, 2, 3])
    null = torch.full_like(cond, 4)
    t = torch.tensor(7.0)
    for scale in (0.0, 1.0, 2.5, 7.0):
        guided = guided_prediction(denoiser, x, t, cond, null, scale)
        c, u = denoiser(x, t, cond), denoiser(x, t, null)
        torch.testing.assert_close(guided, u + scale * (c - u))


def test_guidance_uses_one_forward_of_twice_the_batch():
    calls = []

    def denoiser(x, t, cond):
        calls.append(x.shape[0])
        return x

    guided_prediction(denoiser, torch.zeros(3, 1, 2, 2), torch.tensor(1), torch.zeros(3), torch.ones(3), 3.0)
    assert calls == [6]


def _tiny_unet(num_classes=None):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
        num_class_embeds=None if num_classes is None else num_classes + 1,
    ).eval()


@pytest.mark.parametrize("name", ["ddpm", "dpm++", "euler-a"])
def test_an_image_depends_on_its_seed_not_the_batch(name):
    unet = _tiny_unet(num_classes=3)
    sched = make_scheduler(name, _base_config())
    seeds, labels = [5, 6, 7, 8], [0, 1, 2, 0]
    together = generate(unet, sched, seeds, num_inference_steps=4, class_labels=labels, guidance_scale=2.0, batch_size=4)
    one_by_one = generate(unet, sched, seeds, num_inference_steps=4, class_labels=labels, guidance_scale=2.0, batch_size=1)
    assert together.dtype == torch.uint8 and together.shape == (4, 1, 8, 8)
    # uint8 outputs of float math at different batch sizes: equal up to one rounding step.
    assert (together.int() - one_by_one.int()).abs().max() <= 1
    alone = generate(unet, sched, [7], num_inference_steps=4, class_labels=[2], guidance_scale=2.0)
    assert (alone[0].int() - together[2].int()).abs().max() <= 1
    other = generate(unet, sched, [9], num_inference_steps=4, class_labels=[2], guidance_scale=2.0)
    assert not torch.equal(other[0], together[2])


@pytest.mark.parametrize("name", ["ddpm", "euler-a"])
def test_generators_of_the_caller_give_the_images_of_the_same_seeds(name):
    # The pipelines' generator=: a generator per image draws the initial and the per-step noise exactly as
    # the seed it was seeded with does.
    sched = make_scheduler(name, _base_config())
    by_seed = sample(_dummy, sched, (1, 8, 8), [3, 4], num_inference_steps=5)
    generators = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    torch.testing.assert_close(sample(_dummy, sched, (1, 8, 8), generators, num_inference_steps=5), by_seed,
                               rtol=0, atol=0)
    mixed = sample(_dummy, sched, (1, 8, 8), [3, torch.Generator().manual_seed(4)], num_inference_steps=5)
    torch.testing.assert_close(mixed, by_seed, rtol=0, atol=0)


def test_generate_rejects_bad_labels():
    sched = make_scheduler("ddim", _base_config())
    with pytest.raises(ValueError, match=r"out of range.*0\.\.2"):
        generate(_tiny_unet(num_classes=3), sched, [0], num_inference_steps=2, class_labels=[3])
    with pytest.raises(ValueError, match="unconditional"):
        generate(_tiny_unet(), sched, [0], num_inference_steps=2, class_labels=[0])


def test_parse_seeds():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    assert parse_seeds("42") == [42]
    with pytest.raises(ValueError, match="'x'"):
        parse_seeds("1,x")


def test_make_grid_layout_and_upscaling():
    images = torch.zeros(5, 1, 8, 8, dtype=torch.uint8)
    images[1] = 255
    grid = make_grid(images, ncols=2, padding=2, min_cell_px=16)
    # 3 rows x 2 cols of 16 px cells (8 px doubled) with 2 px padding
    assert grid.size == (2 + 2 * 18, 2 + 3 * 18)
    assert grid.mode == "RGB"
    assert grid.getpixel((2 + 18 + 5, 2 + 5)) == (255, 255, 255)
    assert grid.getpixel((2 + 5, 2 + 5)) == (0, 0, 0)
    labelled = make_grid(images, ncols=2, row_labels=["a", "b", "c"])
    assert labelled.size[0] > make_grid(images, ncols=2).size[0]
    with pytest.raises(ValueError, match="uint8"):
        make_grid(images.float(), ncols=2)


def test_a_schedule_that_repeats_its_first_timestep_runs_every_step():
    # Karras sigmas on the cosine schedule map the first several sigmas to timestep 998; diffusers then
    # started one step late and indexed past its sigmas (IndexError) unless told where sampling begins.
    from diffusers import DPMSolverMultistepScheduler

    base = build_noise_scheduler(DiffusionConfig(beta_schedule="squaredcos_cap_v2")).config
    scheduler = DPMSolverMultistepScheduler.from_config(base, use_karras_sigmas=True)
    scheduler.set_timesteps(20)
    assert scheduler.timesteps[0] == scheduler.timesteps[1]  # the case this guards
    steps = []
    out = sample(_dummy, scheduler, (1, 8, 8), [0], num_inference_steps=20, callback=lambda s: steps.append(s["i"]))
    assert steps == list(range(20)) and torch.isfinite(out).all()
