"""Latent text-to-image from scratch: a UNet2DConditionModel on the latents of a frozen VAE (pretrained, or
trained here first, the run's VAE stage: families/latent_space.py), with the text machinery of the pixel text
family; exported as a StableDiffusionPipeline folder that plain diffusers loads; with model.backbone = dit a
PixArtTransformer2DModel, exported as a PixArtSigmaPipeline folder."""

from __future__ import annotations

from pathlib import Path

import torch

from difftrain.config import RunConfig
from difftrain.diffusion.objective import Objective
from difftrain.families.base import RunSummary
from difftrain.families.export_latent import export_pixart, export_stable_diffusion, write_latent_model_card
from difftrain.families.latent_space import LatentSpace
from difftrain.families.text import TextPixelFamily


class LatentTextFamily(LatentSpace, TextPixelFamily):
    name = "latent-text"

    @classmethod
    def handles(cls, cfg: RunConfig) -> bool:
        return cfg.model.conditioning == "text" and cfg.model.space == "latent" and cfg.model.pretrained is None

    def plan(self) -> None:
        self.plan_latent_space()
        super().plan()

    def export(self, network: torch.nn.Module, objective: Objective, output_dir: Path) -> None:
        if self.cfg.model.backbone == "dit":  # a PixArt transformer
            export_pixart(network, self.export_vae(), self.exported_text_encoder, self.text.tokenizer,
                          objective.inference_scheduler(self.cfg.sample.scheduler), output_dir)
            return
        export_stable_diffusion(network, self.export_vae(), self.exported_text_encoder, self.text.tokenizer,
                                objective.inference_scheduler(self.cfg.sample.scheduler), output_dir)

    def write_model_card(self, summary: RunSummary, objective: Objective, output_dir: Path) -> None:
        write_latent_model_card(self.cfg, summary, output_dir, None, objective.describe())
