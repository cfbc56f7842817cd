"""Latent unconditional and class-conditional models from scratch: a DiT (model.backbone = dit) on the latents of
a frozen VAE (families/latent_space.py), exported as diffusers' DiTPipeline folder, which plain
`DiTPipeline.from_pretrained(dir)` loads and samples.

DiTPipeline feeds class 1000 as the unconditional class of guidance, so a class-conditional DiT keeps its null class
there (models/backbone.py); an unconditional DiT has a single class, 0, and samples with guidance_scale = 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiTPipeline

from difftrain.config import ConfigError, RunConfig
from difftrain.diffusion.objective import Objective
from difftrain.families.base import RunSummary
from difftrain.families.class_conditional import ClassConditionalPixelFamily
from difftrain.families.export import save_pipeline_atomically
from difftrain.families.export_latent import write_dit_model_card
from difftrain.families.latent_space import LatentSpace
from difftrain.families.unconditional import UnconditionalPixelFamily
from difftrain.models.backbone import DIT_PIPELINE_NULL_CLASS


class _LatentDiT(LatentSpace):
    """Planning and the DiTPipeline export, shared by the two families below."""

    streams = False  # the latent encoder reads the decoded images (VAE stage, latent cache)

    def plan(self) -> None:
        # Samplers DiTPipeline cannot step (no scale_model_input) were refused by the config checks already.
        self.plan_latent_space()
        super().plan()

    def label_names(self) -> list[str]:
        """Class names in label order (none for an unconditional model)."""
        return []

    def export(self, network: torch.nn.Module, objective: Objective, output_dir: Path) -> None:
        # The scheduler the previews and evaluation sample with, so the folder samples as the run did.
        pipe = DiTPipeline(transformer=network, vae=self.export_vae(),
                           scheduler=objective.inference_scheduler(self.cfg.sample.scheduler))
        if self.label_names():
            # Saved in model_index.json and passed back by from_pretrained: pipe.get_label_ids(["daisy"]) works.
            pipe.register_to_config(id2label={str(i): name for i, name in enumerate(self.label_names())})
        save_pipeline_atomically(pipe, output_dir)

    def write_model_card(self, summary: RunSummary, objective: Objective, output_dir: Path) -> None:
        write_dit_model_card(self.cfg, summary, self.label_names(), objective.describe(), output_dir)


class LatentUnconditionalFamily(_LatentDiT, UnconditionalPixelFamily):
    name = "latent-unconditional"

    @classmethod
    def handles(cls, cfg: RunConfig) -> bool:
        return cfg.model.conditioning == "none" and cfg.model.space == "latent" and cfg.model.pretrained is None


class LatentClassFamily(_LatentDiT, ClassConditionalPixelFamily):
    name = "latent-class"

    @classmethod
    def handles(cls, cfg: RunConfig) -> bool:
        return cfg.model.conditioning == "class" and cfg.model.space == "latent" and cfg.model.pretrained is None

    def plan(self) -> None:
        super().plan()
        if self.num_classes > DIT_PIPELINE_NULL_CLASS:
            raise ConfigError([f"'model.num_classes' = {self.num_classes}: diffusers' DiTPipeline takes class "
                               f"{DIT_PIPELINE_NULL_CLASS} as its unconditional class, so a latent class-conditional "
                               f"model has at most {DIT_PIPELINE_NULL_CLASS} classes"])

    def label_names(self) -> list[str]:
        return list(self.dataset.class_names)
