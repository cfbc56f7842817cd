"""Fine-tuning a Stable Diffusion style pipeline (`model.pretrained`): the whole UNet or LoRA adapters on it
(and optionally on the text encoder), on captioned data or DreamBooth instance images with optional prior
preservation. Its own schedule and prediction type come from the base model, and the export is a
StableDiffusionPipeline folder or diffusers-format LoRA weights for `pipe.load_lora_weights`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import UNet2DConditionModel

from difftrain.config import RunConfig
from difftrain.data.order import sample_indices
from difftrain.diffusion.loss import prior_preservation_loss
from difftrain.diffusion.objective import Objective
from difftrain.families.base import Models, NetworkSpec, RunSummary
from difftrain.families.class_images import class_dir_for, ensure_class_images
from difftrain.families.export_latent import export_lora, export_stable_diffusion, write_latent_model_card
from difftrain.families.latent import LatentTextFamily
from difftrain.models.backbone import NetworkPlan, network_call
from difftrain.models.lora import add_lora, unmatched_pattern_keys
from difftrain.models.pretrained import (check_base_pipeline, load_base_noise_scheduler, load_base_unet,
                                         load_base_unet_config, resolve, weight_dtype)
from difftrain.models.text import load_pretrained_text_encoder
from difftrain.models.vae import load_pretrained_vae, load_vae_config

logger = logging.getLogger(__name__)

# DreamBooth class images get their own shuffled stream, so instance and class batches are independent.
_PRIOR_SEED_OFFSET = 0x9A10


class StableDiffusionFamily(LatentTextFamily):
    name = "stable-diffusion"

    @classmethod
    def handles(cls, cfg: RunConfig) -> bool:
        return cfg.model.pretrained is not None

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.base = resolve(cfg.model.pretrained)
        self.lora = cfg.model.finetune == "lora"
        self.prior_preservation = cfg.train.prior_preservation

    # -- before any model is built -------------------------------------------------------------------------------

    def check_files(self) -> None:
        check_base_pipeline(self.cfg.model.pretrained)
        super().check_files()

    def class_images_dir(self) -> Optional[Path]:
        return class_dir_for(self.cfg) if self.prior_preservation else None

    def prepare_before_data(self, run_folder: Any, processes: Any) -> None:
        """Prior preservation: generate the class images that are missing, with the base model."""
        if not self.prior_preservation:
            return
        run_folder.start()
        ensure_class_images(self.cfg, processes.device, processes.process_index, processes.num_processes,
                            processes.wait_for_everyone)
        processes.wait_for_everyone()

    def text_components(self, vocab: list[str]) -> tuple[Any, torch.nn.Module, bool, int]:
        tokenizer, encoder = load_pretrained_text_encoder(self.cfg.model.pretrained, pipeline=True,
                                                          key="model.pretrained")
        trainable = bool(self.cfg.text_encoder.train) or (self.lora and self.cfg.lora.train_text_encoder)
        # The base UNet was trained on prompts of the base tokenizer's length; keep it.
        return tokenizer, encoder, trainable, int(tokenizer.model_max_length)

    def pretrained_vae(self) -> Optional[Any]:
        """The base pipeline's VAE, or `vae.pretrained` in its place (e.g. SDXL's fp16-fixed VAE)."""
        if self.cfg.vae.pretrained is not None:
            return load_pretrained_vae(self.cfg.vae.pretrained)
        return load_pretrained_vae(self.cfg.model.pretrained, key="model.pretrained")

    def size_multiple(self) -> int:
        """The VAE's downsampling x the base UNet's (from its config.json)."""
        return self.vae_downsampling() * 2 ** (len(load_base_unet_config(self.base)["block_out_channels"]) - 1)

    def vae_downsampling(self) -> int:
        """vae.pretrained's, else the base pipeline's VAE's (its config)."""
        if self.cfg.vae.pretrained is not None:
            return super().vae_downsampling()
        config = load_vae_config(self.cfg.model.pretrained, key="model.pretrained")
        return 2 ** (len(config["block_out_channels"]) - 1)

    def plan(self) -> None:
        super().plan()
        self.num_prior_images = len(self.dataset) - self.num_train_images

    def base_schedule(self) -> Optional[Any]:
        return load_base_noise_scheduler(self.base)

    def plan_network(self) -> None:
        """The base UNet is used as it is: no kwargs to build or check, only its class to call it by."""
        self.network_plan = NetworkPlan(UNet2DConditionModel, {})
        self.call = network_call(UNet2DConditionModel)

    # -- models --------------------------------------------------------------------------------------------------

    def network_spec(self) -> NetworkSpec:
        return NetworkSpec(lambda: load_base_unet(self.base), dict(load_base_unet_config(self.base)),
                           self.text.max_length)

    def build_models(self, mixed_precision: str) -> Models:
        if self.vae is None:
            raise ValueError(f"model.pretrained = {self.cfg.model.pretrained!r}: no VAE was loaded")
        unet = load_base_unet(self.base)
        if self.lora:
            # Frozen base weights in the mixed-precision dtype; the adapters are kept in fp32.
            dtype = weight_dtype(mixed_precision)
            if dtype != torch.float32:
                unet.to(dtype)
            count = self.add_adapters(unet, self.cfg.lora.unet_target_modules, "lora.unet_target_modules")
            logger.info("%s rank %d on the UNet: %d trainable parameters", self.adapter_kind(), self.cfg.lora.rank,
                        count)
        models = self.text_encoder_models(unet)
        models.frozen.append(self.frozen_vae(mixed_precision))
        if self.lora:
            adapted = [unet] + [m for m, _ in models.trained]
            for key in ("rank_pattern", "alpha_pattern"):
                unmatched = unmatched_pattern_keys(adapted, getattr(self.cfg.lora, key))
                if unmatched:
                    logger.warning("lora.%s: %s name(s) no adapted module (kept at the default); adapted modules "
                                   "are those of lora.unet_target_modules / lora.text_encoder_target_modules",
                                   key, unmatched)
        return models

    def adapter_kind(self) -> str:
        return "DoRA" if self.cfg.lora.use_dora else "LoRA"

    def add_adapters(self, model: torch.nn.Module, targets: list, key: str) -> int:
        lora = self.cfg.lora
        return add_lora(model, lora.rank, lora.alpha, lora.dropout, targets, key, use_dora=lora.use_dora,
                        rank_pattern=lora.rank_pattern, alpha_pattern=lora.alpha_pattern)

    def text_adapters_wanted(self) -> bool:
        return self.lora and self.cfg.lora.train_text_encoder

    def add_text_adapters(self, encoder: torch.nn.Module) -> None:
        count = self.add_adapters(encoder, self.cfg.lora.text_encoder_target_modules,
                                  "lora.text_encoder_target_modules")
        logger.info("%s rank %d on %s: %d trainable parameters", self.adapter_kind(), self.cfg.lora.rank,
                    type(encoder).__name__, count)

    # -- the step ------------------------------------------------------------------------------------------------

    def rows(self, position: int, batch_size: int) -> torch.Tensor:
        """batch_size instance images, then (prior preservation) as many class images from their own stream."""
        indices = super().rows(position, batch_size)
        if not self.num_prior_images:
            return indices
        prior = sample_indices(self.num_prior_images, self.cfg.train.seed + _PRIOR_SEED_OFFSET, position, batch_size)
        return torch.cat([indices, prior + self.num_train_images])

    def reduce_loss(self, per_example: torch.Tensor) -> torch.Tensor:
        if not self.num_prior_images:
            return per_example.mean()
        return prior_preservation_loss(per_example, self.cfg.train.prior_loss_weight)

    # -- export --------------------------------------------------------------------------------------------------

    def export(self, network: torch.nn.Module, objective: Objective, output_dir: Path) -> None:
        if not self.lora:
            export_stable_diffusion(network, self.export_vae(), self.exported_text_encoder, self.text.tokenizer,
                                    objective.inference_scheduler(self.cfg.sample.scheduler), output_dir)
            return
        text_encoder = self.exported_text_encoder if self.cfg.lora.train_text_encoder else None
        paths = export_lora(network, {"text_encoder": text_encoder}, self.cfg, self.base, output_dir)
        logger.info("LoRA weights: %s (load with pipe.load_lora_weights(%r))", ", ".join(map(str, paths.values())),
                    str(output_dir))

    def write_model_card(self, summary: RunSummary, objective: Objective, output_dir: Path) -> None:
        write_latent_model_card(self.cfg, summary, output_dir, self.base, objective.describe())
