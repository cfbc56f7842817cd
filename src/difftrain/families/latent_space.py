"""What makes a family latent: x0 is a scaled latent of a frozen VAE (pretrained, or trained first in the run's VAE
stage), drawn by a LatentEncoder, and samples are decoded by that VAE. A mixin listed before the pixel family it
turns latent (`class LatentTextFamily(LatentSpace, TextPixelFamily)`), so its methods wrap the pixel family's
through super() and the text, class and unconditional latent families share one copy of it."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from difftrain.config import ConfigError
from difftrain.data.batches import MicroBatch
from difftrain.families.base import Batch, Models
from difftrain.families.latents import LatentEncoder
from difftrain.families.vae_stage import train_vae, vae_is_complete
from difftrain.models.vae import downsample_factor, load_pretrained_vae, load_vae_config
from difftrain.sampling.generate import ImageSampler

logger = logging.getLogger(__name__)


class VAENotTrainedYet(ValueError):
    """A step of a latent run was asked for before its VAE stage ran (`difftrain check` of a from-scratch run):
    not a mistake in the config, so check reports the step as not timed rather than failed."""


class LatentSpace:
    """The VAE side of a latent family: plan_latent_space (call it first in plan), the VAE stage, the frozen VAE in
    Models, the latent encoder, latent batches and the decoding sampler."""

    latent = True

    # -- planning ------------------------------------------------------------------------------------------------

    def pretrained_vae(self) -> Optional[Any]:
        """The frozen VAE to use, or None to train one in the VAE stage."""
        if self.cfg.vae.pretrained is None:
            return None
        return load_pretrained_vae(self.cfg.vae.pretrained)

    def plan_latent_space(self) -> None:
        """Load the pretrained VAE (if any) and derive the latent size and channels; before the network is planned."""
        self.vae = self.pretrained_vae()
        v = self.cfg.vae
        if self.vae is None:
            self.latent_channels, factor = v.latent_channels, 2 ** (len(v.block_out_channels) - 1)
        else:
            self.vae.requires_grad_(False).eval()
            self.latent_channels, factor = int(self.vae.config.latent_channels), downsample_factor(self.vae)
        if self.cfg.data.resolution % factor:
            raise ConfigError([f"'data.resolution' = {self.cfg.data.resolution} must divide by the VAE's downsampling "
                               f"factor {factor}"])
        self.latent_size = self.cfg.data.resolution // factor

    def geometry(self) -> tuple[int, int]:
        return self.latent_size, self.latent_channels

    def size_multiple(self) -> int:
        """The VAE's downsampling x the network's, from configs alone."""
        return self.vae_downsampling() * super().size_multiple()

    def vae_downsampling(self) -> int:
        """Pixels per latent cell of the VAE the run will use, from its config (no weights): vae.pretrained's, else
        the from-scratch VAE's vae.block_out_channels."""
        v = self.cfg.vae
        channels = v.block_out_channels if v.pretrained is None else load_vae_config(v.pretrained)["block_out_channels"]
        return 2 ** (len(channels) - 1)

    def prepare_after_data(self, run_folder: Any, processes: Any) -> None:
        """The VAE stage of a run without a pretrained VAE: train it, or reuse the one this run saved before."""
        if self.vae is not None:
            return
        from diffusers import AutoencoderKL

        vae_dir = run_folder.path / "vae"
        if not vae_is_complete(vae_dir):
            if processes.is_main_process:
                train_vae(self.cfg, self.dataset.images, run_folder.path, processes.device)
            processes.wait_for_everyone()
        else:
            logger.info("using the VAE this run trained before (%s)", vae_dir)
        self.vae = AutoencoderKL.from_pretrained(str(vae_dir)).requires_grad_(False).eval()

    # -- models --------------------------------------------------------------------------------------------------

    def build_models(self, mixed_precision: str) -> Models:
        if self.vae is None:
            raise VAENotTrainedYet("this latent run trains its VAE first (no vae.pretrained); the denoising "
                                   "network's step can be timed only with a VAE: run `difftrain train-vae` and pass "
                                   "vae.pretrained=DIR")
        models = super().build_models(mixed_precision)
        models.frozen.append(self.frozen_vae(mixed_precision))
        return models

    def frozen_vae(self, mixed_precision: str) -> torch.nn.Module:
        """The VAE in its dtype (vae.precision): fp32, or the mixed-precision dtype, with a warning for a VAE that
        says it must be upcast (SDXL's: NaN latents and black images in fp16)."""
        from difftrain.models.pretrained import weight_dtype

        dtype = weight_dtype(mixed_precision) if self.cfg.vae.precision == "mixed" else torch.float32
        if dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            logger.warning("vae.precision = 'mixed' runs a VAE whose config says force_upcast in fp16: it is known to "
                           "give NaN latents (SDXL's). Use vae.precision=fp32, or an fp16-safe VAE such as "
                           "vae.pretrained=madebyollin/sdxl-vae-fp16-fix")
        if dtype != torch.float32:
            logger.info("the frozen VAE runs in %s (vae.precision = 'mixed')", str(dtype).removeprefix("torch."))
        return self.vae.to(dtype)

    def export_vae(self) -> torch.nn.Module:
        """The VAE the export carries: fp32 weights, reloaded where vae.precision = 'mixed' cast the one in use."""
        if self.vae.dtype == torch.float32:
            return self.vae
        fresh = self.pretrained_vae()
        return fresh if fresh is not None else self.vae.to(torch.float32)

    def use_prepared(self, network: torch.nn.Module, trained: list[torch.nn.Module], accelerator: Any) -> None:
        super().use_prepared(network, trained, accelerator)
        if self.cfg.vae.scaling_factor is not None:  # saved with the VAE, so the exported pipeline decodes alike
            self.vae.register_to_config(scaling_factor=self.cfg.vae.scaling_factor)
        buckets = getattr(self.dataset, "bucket_images", None)  # data.buckets: latents per bucket
        images = self.dataset.images if buckets is None else buckets
        index = None if buckets is None else (self.dataset.row_bucket, self.dataset.row_slot)
        self.latents = LatentEncoder(self.vae, float(self.vae.config.scaling_factor), images,
                                     self.cfg.data.random_flip, self.cfg.vae.cache_latents, index,
                                     disk=self.cfg.vae.cache_latents_to_disk)

    # -- the step ------------------------------------------------------------------------------------------------

    def batch(self, micro: MicroBatch, generator: torch.Generator, device: torch.device) -> Batch:
        x0, mask, _ = self.latents.draw_with_mask(micro, generator)  # flips and latent noise, from the generator
        return Batch(x0, self.condition(micro, generator, device), mask)

    # -- sampling ------------------------------------------------------------------------------------------------

    def sampler(self, network: torch.nn.Module) -> ImageSampler:
        """The pixel family's sampler, decoding its latents with the VAE."""
        sampler = super().sampler(network)
        sampler.vae = self.vae
        return sampler
