"""Latent diffusion and DreamBooth pieces: prior-preservation loss, latent cache, VAE scale, LoRA, config checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from difftrain.config import ConfigError, DiffusionConfig, VaeConfig, load_config
from difftrain.diffusion.loss import denoising_loss, prior_preservation_loss, training_target
from difftrain.diffusion.schedule import build_noise_scheduler
from difftrain.models.lora import add_lora, lora_state_dict
from difftrain.models.pretrained import check_base_pipeline
from difftrain.models.vae import build_scratch_vae, encode_distribution_params, measure_scaling_factor, sample_latents
from difftrain.data.batches import MicroBatch
from difftrain.families.latents import LatentEncoder


def test_prior_preservation_loss_equals_the_two_separate_mses():
    sched = build_noise_scheduler(DiffusionConfig(prediction_type="v_prediction"))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    weight = torch.randn(4, 4, 1, 1, generator=g)

    def model(x, ts):
        return F.conv2d(x, weight)

    per_example = denoising_loss(model, sched, x0, noise, t)
    prediction = model(sched.add_noise(x0, noise, t), t)
    target = training_target(sched, x0, noise, t)
    instance = F.mse_loss(prediction[:3], target[:3])
    prior = F.mse_loss(prediction[3:], target[3:])
    torch.testing.assert_close(prior_preservation_loss(per_example, 0.7), instance + 0.7 * prior)
    torch.testing.assert_close(prior_preservation_loss(per_example, 0.0), instance)


def test_v_prediction_target_is_get_velocity_for_latent_shapes():
    sched = build_noise_scheduler(DiffusionConfig(prediction_type="v_prediction", beta_schedule="scaled_linear",
                                                  beta_start=0.00085, beta_end=0.012), latent=True)
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    torch.testing.assert_close(training_target(sched, x0, noise, t), sched.get_velocity(x0, noise, t))
    assert sched.config.clip_sample is False and sched.config.steps_offset == 1


def test_six_channel_variance_output_is_split_for_latents():
    sched = build_noise_scheduler(DiffusionConfig(), latent=True)
    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 500])
    loss = denoising_loss(lambda x, ts: torch.cat([noise, torch.randn_like(noise) * 100], dim=1), sched, x0, noise, t)
    assert torch.all(loss == 0)


def _tiny_vae() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_scratch_vae(VaeConfig(block_out_channels=[8, 16], latent_channels=4), 3, 16).eval()


def test_cached_latents_match_on_the_fly_encoding_with_flips():
    vae = _tiny_vae()
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    cached = LatentEncoder(vae, 0.5, images, random_flip=True, cache=True)
    live = LatentEncoder(vae, 0.5, images, random_flip=True, cache=False)
    assert cached.params.shape == (12, 8, 8, 8)  # both flips, mean and log-variance
    indices = torch.tensor([0, 3, 5, 3])
    micro = MicroBatch(indices, images[indices])
    a = cached.draw(micro, torch.Generator().manual_seed(1))
    b = live.draw(micro, torch.Generator().manual_seed(1))
    assert a.shape == (4, 4, 8, 8)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_measured_scaling_factor_gives_unit_variance_latents():
    vae = _tiny_vae()
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    latents = sample_latents(encode_distribution_params(vae, images), torch.Generator().manual_seed(0))
    scale = measure_scaling_factor(latents)
    assert (latents * scale).std().item() == pytest.approx(1.0, rel=1e-4)


def test_lora_adds_only_trainable_lora_parameters_and_saves_lora_keys():
    from diffusers import UNet2DConditionModel

    def tiny_unet() -> UNet2DConditionModel:
        return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                    norm_num_groups=4, layers_per_block=1, attention_head_dim=4)

    unet = tiny_unet()
    count = add_lora(unet, 2, None, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], "lora.unet_target_modules")
    trained = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert count > 0 and trained and all("lora" in n for n in trained)
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
    keys = list(lora_state_dict(unet))
    assert keys and all("lora" in k for k in keys)
    with pytest.raises(ValueError, match=r"lora.unet_target_modules = \['no_such_module'\]: .*not found"):
        add_lora(tiny_unet(), 2, None, 0.0, ["no_such_module"], "lora.unet_target_modules")


def test_config_errors_for_dreambooth_and_lora_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config("tiny/dreambooth-lora", ["data.class_prompt=null", "data.instance_dir=x"])
    text = str(info.value)
    assert "'train.prior_preservation' is true but 'data.class_prompt' is not set" in text
    assert "'train.prior_preservation' needs 'model.pretrained'" in text
    with pytest.raises(ConfigError, match="'model.finetune' = 'lora' needs 'model.pretrained'"):
        load_config("tiny/digits-text", ["model.finetune=lora"])
    with pytest.raises(ConfigError, match="'model.backbone' = 'unet' with model.space = 'latent'"):
        load_config("tiny/digits-class", ["model.space=latent"])
    with pytest.raises(ConfigError, match="only 'text' is supported"):
        load_config("tiny/digits-class", ["model.pretrained=/nonexistent/base"])


def test_base_pipeline_checks_name_what_is_wrong(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        check_base_pipeline(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        check_base_pipeline(str(tmp_path / "empty"))
    ddpm = tmp_path / "ddpm"
    ddpm.mkdir()
    (ddpm / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DModel"],
         "scheduler": ["diffusers", "DDPMScheduler"]}))
    with pytest.raises(ValueError, match="not a Stable Diffusion style pipeline: it lacks vae, text_encoder, tokenizer"):
        check_base_pipeline(str(ddpm))


def test_an_unknown_component_class_of_a_base_pipeline_is_named_with_the_folder(tmp_path: Path):
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    base = tmp_path / "base"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (base / name).mkdir(parents=True)
    (base / "model_index.json").write_text(json.dumps(index))
    assert check_base_pipeline(str(base))["text_encoder"] == ["transformers", "CLIPTextModel"]
    for name, entry, fragment in (
        ("text_encoder", ["transformers", "NoSuchTextModel"], "its text_encoder class 'NoSuchTextModel' is not in transformers"),
        ("vae", ["diffusers", "NoSuchAutoencoder"], "its vae class 'NoSuchAutoencoder' is not in diffusers"),
        ("scheduler", ["my_package", "MyScheduler"], "its scheduler comes from 'my_package'"),
    ):
        (base / "model_index.json").write_text(json.dumps({**index, name: entry}))
        with pytest.raises(ValueError) as info:
            check_base_pipeline(str(base))
        assert str(info.value).startswith(f"model.pretrained = {str(base)!r}: model_index.json: {fragment}")


def test_a_base_model_schedule_is_never_clipped_even_when_its_config_does_not_say(tmp_path: Path):
    from diffusers import EulerDiscreteScheduler

    from difftrain.models.pretrained import load_base_noise_scheduler
    from difftrain.sampling.schedulers import make_scheduler

    # An Euler config has no clip_sample key; DDPMScheduler's default for it would clip latents to [-1, 1].
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_config(
        tmp_path / "scheduler")
    base = load_base_noise_scheduler(str(tmp_path))
    assert base.config.clip_sample is False and base.config.beta_schedule == "scaled_linear"
    for name in ("ddpm", "dpm++", "unipc"):
        config = make_scheduler(name, base.config).config
        assert not (config.get("clip_sample") or config.get("thresholding")), name
