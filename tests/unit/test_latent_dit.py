"""Latent DiT families without training: which configs they take, which they refuse before anything is written, and
the length of the VAE stage."""

from __future__ import annotations

import pytest

from difftrain import families
from difftrain.config import ConfigError, load_config
from difftrain.config.checks import _NO_INIT_NOISE_SIGMA
from difftrain.config.schema import FLOW_SCHEDULERS
from difftrain.diffusion.objectives import OBJECTIVES
from difftrain.families.vae_stage import DEFAULT_MAX_VAE_STEPS, vae_train_steps

FLOW = ["diffusion.objective=flow_matching", "diffusion.beta_schedule=linear", "diffusion.prediction_type=epsilon"]


@pytest.mark.parametrize("overrides, name", [
    ([], "latent-class"),
    (["model.conditioning=none", "sample.guidance_scale=1.0"], "latent-unconditional"),
])
def test_latent_dit_configs_get_their_family(overrides: list[str], name: str):
    family = families.family_for(load_config("tiny/latent-dit", overrides, output_dir="unused"))
    assert family.name == name and family.latent and not family.streams


@pytest.mark.parametrize("conditioning", ["class", "none"])
def test_a_latent_unet_without_text_is_refused_naming_the_backbone(conditioning: str):
    overrides = ["model.backbone=unet", f"model.conditioning={conditioning}", "sample.guidance_scale=1.0"]
    with pytest.raises(ConfigError, match="'model.backbone' = 'unet' with model.space = 'latent'.*model.backbone = 'dit'"):
        load_config("tiny/latent-dit", overrides, output_dir="unused")


@pytest.mark.parametrize("name", FLOW_SCHEDULERS)
def test_the_config_check_refuses_exactly_the_flow_samplers_that_latent_pipelines_cannot_step(name: str):
    """StableDiffusionPipeline, PixArtSigmaPipeline and DiTPipeline call scheduler.scale_model_input; the config
    check's list of flow samplers refused in latent space is the list of those without it."""
    cfg = load_config("tiny/latent-dit", [*FLOW, f"sample.scheduler={name}"] if name not in _NO_INIT_NOISE_SIGMA
                      else [*FLOW, "sample.scheduler=dpm++"], output_dir="unused")
    objective = OBJECTIVES["flow_matching"].from_config(cfg.diffusion, latent=True, sample_size=8)
    steps_in_pipelines = hasattr(objective.inference_scheduler(name), "scale_model_input")
    assert steps_in_pipelines == (name not in _NO_INIT_NOISE_SIGMA)
    if not steps_in_pipelines:
        with pytest.raises(ConfigError, match=f"'sample.scheduler' = '{name}': a latent run exports"):
            load_config("tiny/latent-dit", [*FLOW, f"sample.scheduler={name}"], output_dir="unused")


def test_the_vae_stage_follows_the_run_unless_its_steps_are_set():
    def steps(preset: str, *overrides: str, images: int = 64) -> int:
        return vae_train_steps(load_config(preset, list(overrides), output_dir="unused"), images)[0]

    assert steps("tiny/mini-sd") == 4  # explicit
    assert steps("tiny/mini-sd", "vae.train_steps=null", "train.max_steps=2") == 2
    assert steps("tiny/mini-sd", "vae.train_steps=null", "train.max_steps=100000") == DEFAULT_MAX_VAE_STEPS
    # 3 epochs of 64 images at batch 8: 24 steps
    assert steps("tiny/mini-sd", "vae.train_steps=null", "train.max_steps=null", "train.num_epochs=3") == 24
    assert steps("mini-sd") == 500  # the preset's 3,200 steps: the cap, the VAE stage its header's budget measured
    assert steps("mini-sd", "train.max_steps=2") == 2
    with pytest.raises(ConfigError, match="vae.train_steps"):
        load_config("tiny/mini-sd", ["vae.train_steps=0"], output_dir="unused")
