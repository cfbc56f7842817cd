"""The family registry and the objective interface: which family trains which config, that a family written
outside difftrain trains through the unchanged loop once registered, and how a base model's schedule enters the
objective."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from difftrain import families
from difftrain.config import DiffusionConfig, load_config
from difftrain.diffusion.objective import DDPMObjective
from difftrain.diffusion.objectives import OBJECTIVES
from difftrain.diffusion.schedule import build_noise_scheduler
from difftrain.families.unconditional import UnconditionalPixelFamily


@pytest.mark.parametrize("preset, overrides, name", [
    ("tiny/folder-uncond", [], "pixel-unconditional"),
    ("tiny/digits-class", [], "pixel-class"),
    ("tiny/digits-text", [], "pixel-text"),
    ("tiny/mini-sd", [], "latent-text"),
    ("tiny/dreambooth-lora", ["model.pretrained=/nonexistent/base", "data.instance_dir=/nonexistent/photos"],
     "stable-diffusion"),
])
def test_each_tiny_config_gets_its_family(preset: str, overrides: list[str], name: str):
    family = families.family_for(load_config(preset, overrides, output_dir="unused"))
    assert family.name == name  # constructing it loads nothing


def test_unknown_family_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="pixel-unconditional"):
        families.family_class("dit")


class RecordingFamily(UnconditionalPixelFamily):
    """A family defined outside difftrain: the unconditional UNet, recording which interface calls it got."""

    name = "test-recording"
    calls: list[str] = []

    def batch(self, rows, generator, device):
        RecordingFamily.calls.append("batch")
        return super().batch(rows, generator, device)

    def export(self, network, objective, output_dir: Path) -> None:
        RecordingFamily.calls.append("export")
        super().export(network, objective, output_dir)


@pytest.mark.integration
def test_a_registered_family_trains_through_the_unchanged_loop(tmp_path: Path, monkeypatch, caplog):
    from difftrain.training.loop import train

    monkeypatch.setattr(families, "FAMILIES", {"test-recording": f"{__name__}:RecordingFamily", **families.FAMILIES})
    RecordingFamily.calls.clear()
    cfg = load_config("tiny/digits-class", ["model.conditioning=none", "sample.guidance_scale=1.0",
                                            "train.max_steps=2", "sample.num_inference_steps=1", "sample.num_images=1"],
                      output_dir=str(tmp_path / "run"))
    with caplog.at_level(logging.INFO, logger="difftrain"):
        run = train(cfg)
    assert RecordingFamily.calls == ["batch", "batch", "export"]
    assert "test-recording family" in caplog.text and "test-recording family" in (run / "train.log").read_text()
    assert (run / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_objectives_are_registered_by_their_config_name():
    assert OBJECTIVES["ddpm"] is DDPMObjective
    assert DiffusionConfig().objective in OBJECTIVES


def test_a_base_schedule_wins_over_diffusion_and_the_log_says_which_values(caplog):
    base = build_noise_scheduler(DiffusionConfig(prediction_type="v_prediction", beta_schedule="scaled_linear",
                                                 beta_start=0.00085, beta_end=0.012), latent=True)
    with caplog.at_level(logging.INFO, logger="difftrain"):
        objective = DDPMObjective.from_config(DiffusionConfig(), latent=True, base_schedule=base)
    assert objective.scheduler_config.prediction_type == "v_prediction"
    text = caplog.text
    assert "diffusion.prediction_type = 'epsilon' is not used: the base model's schedule has 'v_prediction'" in text
    assert "diffusion.beta_schedule" in text and "diffusion.num_train_timesteps" not in text


def test_ddpm_objective_draws_noise_then_times_from_the_step_generator():
    objective = DDPMObjective.from_config(DiffusionConfig(num_train_timesteps=50, offset_noise=0.1))
    g = torch.Generator().manual_seed(3)
    noise = objective.sample_noise(torch.Size((2, 1, 4, 4)), g, torch.device("cpu"))
    times = objective.sample_times(2, g, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    expected = torch.randn(2, 1, 4, 4, generator=g)
    expected = expected + 0.1 * torch.randn(2, 1, 1, 1, generator=g)
    assert torch.equal(noise, expected)
    assert torch.equal(times, torch.randint(0, 50, (2,), generator=g))
    assert "50 timesteps" in objective.describe() and "offset noise 0.1" in objective.describe()
