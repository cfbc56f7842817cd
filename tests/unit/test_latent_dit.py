"""Latent DiT families without training: which configs they take, which they refuse before anything is written, and
the length of the VAE stage."""

from __future__ import annotations

import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from difftrain import families
from difftrain.config import ConfigError, load_config
from difftrain.diffusion import objective, objectives
from difftrain.families.latent_class import dit_pipeline_scheduler_problems
from difftrain.families.vae_stage import DEFAULT_MAX_VAE_STEPS, vae_train_steps


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


class _FlowLikeObjective(objective.DDPMObjective):
    """Samples with diffusers' FlowMatchEulerDiscreteScheduler, as a flow-matching objective does."""

    name = "flow-like"

    def inference_scheduler(self, name, clip_x0=None):
        return FlowMatchEulerDiscreteScheduler()


def test_dit_pipeline_needs_a_scheduler_with_scale_model_input(monkeypatch):
    cfg = load_config("tiny/latent-dit", [], output_dir="unused")
    assert dit_pipeline_scheduler_problems(cfg, 8) == []  # DDIM has it
    monkeypatch.setitem(objectives.OBJECTIVES, "flow-like", _FlowLikeObjective)
    cfg.diffusion.objective = "flow-like"
    problems = dit_pipeline_scheduler_problems(cfg, 8)
    assert len(problems) == 1 and "'sample.scheduler' = 'ddim'" in problems[0]
    assert "FlowMatchEulerDiscreteScheduler, which has no scale_model_input" in problems[0]


def test_the_vae_stage_follows_the_run_unless_its_steps_are_set():
    def steps(preset: str, *overrides: str, images: int = 64) -> int:
        return vae_train_steps(load_config(preset, list(overrides), output_dir="unused"), images)[0]

    assert steps("tiny/mini-sd") == 4  # explicit
    assert steps("tiny/mini-sd", "vae.train_steps=null", "train.max_steps=2") == 2
    assert steps("tiny/mini-sd", "vae.train_steps=null", "train.max_steps=100000") == DEFAULT_MAX_VAE_STEPS
    # 3 epochs of 64 images at batch 8: 24 steps
    assert steps("tiny/mini-sd", "vae.train_steps=null", "train.max_steps=null", "train.num_epochs=3") == 24
    assert steps("mini-sd") == 800  # the preset's 2,000 steps: the same VAE stage as when it said 800
    assert steps("mini-sd", "train.max_steps=2") == 2
    with pytest.raises(ConfigError, match="vae.train_steps"):
        load_config("tiny/mini-sd", ["vae.train_steps=0"], output_dir="unused")
