"""Unconditional pixel-space model from scratch: a diffusers UNet2DModel exported as a DDPMPipeline, or a DiT
(model.backbone = dit, one class that is always 0) exported as difftrain's UnconditionalPipeline.

The smallest family, and the base of the other pixel-space ones: docs/architecture.md walks through it.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMPipeline, UNet2DModel

from difftrain.config import ConfigError, RunConfig
from difftrain.data.batches import MicroBatch
from difftrain.data.transforms import random_hflip_pair, to_model_range
from difftrain.diffusion.objective import Network, Objective
from difftrain.families.base import Batch, Family, Models, NetworkSpec, PreviewLayout, RunSummary
from difftrain.families.export import save_pipeline_atomically, write_model_card
from difftrain.models.backbone import (Conditioning, component_name, network_call, plan_network,
                                       transformer_settings, unread_backbone_settings)
from difftrain.models.unet import UNET_PRESETS, unet_kwargs
from difftrain.pipeline import UnconditionalPipeline
from difftrain.sampling.generate import ImageSampler

logger = logging.getLogger(__name__)


class UnconditionalPixelFamily(Family):
    name = "pixel-unconditional"
    streams = True
    presets = UNET_PRESETS
    """UNet size presets of this family (transformer presets are backbone.DIT_PRESETS)."""

    @classmethod
    def handles(cls, cfg: RunConfig) -> bool:
        return cfg.model.conditioning == "none" and cfg.model.space == "pixel" and cfg.model.pretrained is None

    # -- planning ------------------------------------------------------------------------------------------------

    def conditioning(self) -> Conditioning:
        """What the network is conditioned on (nothing here)."""
        return Conditioning("none")

    def geometry(self) -> tuple[int, int]:
        """(sample size, channels) of x0."""
        return self.cfg.data.resolution, self.cfg.data.channels

    def plan(self) -> None:
        self.plan_network()

    dit_takes_any_shape: bool = False
    """Whether this family's DiT backbone takes non-square inputs (PixArt does; DiTTransformer2DModel unpatchifies a
    square)."""

    def size_multiple(self) -> int:
        """2^(downsamplings) of the UNet, or the DiT's patch size; refused for a DiT that takes squares only."""
        m, d = self.cfg.model, self.cfg.data
        if m.backbone == "dit":
            if not self.dit_takes_any_shape and d.buckets != "off":
                raise ValueError(f"data.buckets = {d.buckets!r}: the {self.name} family's DiT "
                                 "(DiTTransformer2DModel) takes square inputs only; set data.buckets=off or use "
                                 "model.backbone=unet")
            return int(transformer_settings(m).get("patch_size") or 1)
        kwargs = unet_kwargs(self.presets, m.size, m.unet, d.resolution, d.channels)
        levels = len(kwargs.get("block_out_channels") or
                     inspect.signature(UNet2DModel.__init__).parameters["block_out_channels"].default)
        return 2 ** (levels - 1)

    def plan_network(self) -> None:
        """The network of `model.backbone` (class and kwargs from the size preset, the data and `model.unet` or the
        transformer fields), checked before anything is built or written."""
        size, channels = self.geometry()
        for key in unread_backbone_settings(self.cfg.model):
            # A preset's UNet settings stay when model.backbone=dit is given on the command line: said, not refused.
            logger.warning("model.%s is not read: model.backbone = %r", key, self.cfg.model.backbone)
        self.network_plan, problems = plan_network(self.cfg.model, size, channels, self.conditioning(), self.presets)
        if problems:
            raise ConfigError(problems)
        self.call = network_call(self.network_plan.cls)

    # -- models --------------------------------------------------------------------------------------------------

    def network_spec(self) -> NetworkSpec:
        return NetworkSpec(self.network_plan.build, self.network_plan.description)

    def build_models(self, mixed_precision: str) -> Models:
        return Models(network=self.network_plan.build())

    def use_prepared(self, network: torch.nn.Module, trained: list[torch.nn.Module], accelerator: Any) -> None:
        self.unet = network

    # -- the step ------------------------------------------------------------------------------------------------

    def batch(self, micro: MicroBatch, generator: torch.Generator, device: torch.device) -> Batch:
        images = micro.images.to(device, non_blocking=True)
        masks = None if micro.masks is None else micro.masks.to(device, non_blocking=True)
        if self.cfg.data.random_flip:
            images, masks = random_hflip_pair(images, generator, masks)
        mask = None if masks is None else masks.float() / 255.0
        return Batch(to_model_range(images), self.condition(micro, generator, device), mask)

    def condition(self, micro: MicroBatch, generator: torch.Generator, device: torch.device) -> Any:
        """The condition of these rows after condition dropout (drawn after x0's random draws); None here."""
        return None

    def network(self, condition: Any) -> Network:
        # By the planned class: the prepared module may be wrapped (DDP), so its own type says nothing.
        module, call = self.unet, self.call
        return lambda x, t: call(module, x, t, condition)

    # -- sampling and export -------------------------------------------------------------------------------------

    def sampler(self, network: torch.nn.Module) -> ImageSampler:
        return ImageSampler(network)

    def preview_conditions(self) -> PreviewLayout:
        count = self.cfg.sample.num_images
        return PreviewLayout(count=count, per_row=max(1, int(round(count ** 0.5))))

    def export(self, network: torch.nn.Module, objective: Objective, output_dir: Path) -> None:
        if component_name(network) == "unet":
            pipe = DDPMPipeline(unet=network, scheduler=objective.training_scheduler())
        else:  # DDPMPipeline calls its network without the class label a DiT needs
            pipe = UnconditionalPipeline(transformer=network,
                                         scheduler=objective.inference_scheduler(self.cfg.sample.scheduler))
        save_pipeline_atomically(pipe, output_dir)

    def write_model_card(self, summary: RunSummary, objective: Objective, output_dir: Path) -> None:
        write_model_card(self.cfg, summary, [], objective.describe(), output_dir)
