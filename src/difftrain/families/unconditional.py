"""Unconditional pixel-space UNet from scratch (diffusers UNet2DModel), exported as a DDPMPipeline.

The smallest family, and the base of the other pixel-space ones: docs/architecture.md walks through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMPipeline, UNet2DModel

from difftrain.config import ConfigError, RunConfig
from difftrain.data.batches import MicroBatch
from difftrain.data.transforms import random_hflip, to_model_range
from difftrain.diffusion.objective import Network, Objective
from difftrain.families.base import Batch, Family, Models, NetworkSpec, PreviewLayout, RunSummary
from difftrain.families.export import save_pipeline_atomically, write_model_card
from difftrain.models.unet import UNET_PRESETS, build_unet, check_unet_kwargs, unet_kwargs
from difftrain.sampling.generate import ImageSampler


class UnconditionalPixelFamily(Family):
    name = "pixel-unconditional"
    streams = True
    unet_class: type = UNet2DModel
    presets = UNET_PRESETS

    @classmethod
    def handles(cls, cfg: RunConfig) -> bool:
        return cfg.model.conditioning == "none" and cfg.model.space == "pixel" and cfg.model.pretrained is None

    # -- planning ------------------------------------------------------------------------------------------------

    def conditioning_kwargs(self) -> dict[str, Any]:
        """UNet kwargs the condition adds (none here)."""
        return {}

    def geometry(self) -> tuple[int, int]:
        """(sample size, channels) of x0."""
        return self.cfg.data.resolution, self.cfg.data.channels

    def plan(self) -> None:
        self.plan_network()

    def plan_network(self) -> None:
        """The UNet's kwargs from the size preset, the data and `model.unet`, checked before anything is built."""
        size, channels = self.geometry()
        m = self.cfg.model
        self.unet_kwargs = unet_kwargs(self.presets, m.size, m.unet, size, channels, self.conditioning_kwargs())
        problems = check_unet_kwargs(self.unet_kwargs, size, self.unet_class)
        if problems:
            raise ConfigError(problems)

    # -- models --------------------------------------------------------------------------------------------------

    def network_spec(self) -> NetworkSpec:
        return NetworkSpec(lambda: build_unet(self.unet_kwargs, self.unet_class),
                           {"class": self.unet_class.__name__, **self.unet_kwargs})

    def build_models(self, mixed_precision: str) -> Models:
        return Models(network=build_unet(self.unet_kwargs, self.unet_class))

    def use_prepared(self, network: torch.nn.Module, trained: list[torch.nn.Module], accelerator: Any) -> None:
        self.unet = network

    # -- the step ------------------------------------------------------------------------------------------------

    def batch(self, micro: MicroBatch, generator: torch.Generator, device: torch.device) -> Batch:
        images = micro.images.to(device, non_blocking=True)
        if self.cfg.data.random_flip:
            images = random_hflip(images, generator)
        return Batch(to_model_range(images), self.condition(micro, generator, device))

    def condition(self, micro: MicroBatch, generator: torch.Generator, device: torch.device) -> Any:
        """The condition of these rows after condition dropout (drawn after x0's random draws); None here."""
        return None

    def network(self, condition: Any) -> Network:
        unet = self.unet
        return lambda x, t: unet(x, t).sample

    # -- sampling and export -------------------------------------------------------------------------------------

    def sampler(self, network: torch.nn.Module) -> ImageSampler:
        return ImageSampler(network)

    def preview_conditions(self) -> PreviewLayout:
        count = self.cfg.sample.num_images
        return PreviewLayout(count=count, per_row=max(1, int(round(count ** 0.5))))

    def export(self, network: torch.nn.Module, objective: Objective, output_dir: Path) -> None:
        save_pipeline_atomically(DDPMPipeline(unet=network, scheduler=objective.training_scheduler()), output_dir)

    def write_model_card(self, summary: RunSummary, objective: Objective, output_dir: Path) -> None:
        write_model_card(self.cfg, summary, [], objective.describe(), output_dir)
