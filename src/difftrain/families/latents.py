"""Latent inputs of latent-diffusion training: the frozen VAE, its scale, and the optional latent cache."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from diffusers import AutoencoderKL

from difftrain.data.batches import MicroBatch
from difftrain.data.transforms import to_model_range
from difftrain.models.vae import encode_distribution_params, sample_latents

logger = logging.getLogger(__name__)


class LatentEncoder:
    """Maps dataset indices to scaled latent samples x0 for one training batch.

    With `cache`, every image is encoded once (and once flipped when flips are on) and each step samples
    from the cached Gaussians; otherwise each batch is encoded on the fly. Both draw the flips and the
    latent noise from the step's generator in the same order, so they train on the same distribution.
    """

    def __init__(self, vae: AutoencoderKL, scaling_factor: float, images_uint8: torch.Tensor, random_flip: bool,
                 cache: bool):
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.random_flip = random_flip
        self.num_images = int(images_uint8.shape[0])
        self.params: Optional[torch.Tensor] = None
        if cache:
            parts = [encode_distribution_params(vae, images_uint8)]
            if random_flip:
                parts.append(encode_distribution_params(vae, images_uint8, flip=True))
            self.params = torch.cat(parts)
            logger.info("cached latent distributions of %d images%s (%.1f MiB); the VAE encoder is not run per step",
                        self.num_images, " x 2 flips" if random_flip else "",
                        self.params.numel() * 4 / 2**20)

    def draw(self, micro: MicroBatch, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of a gathered micro-batch: from the cache by its rows, or encoded from its images."""
        device = self.vae.device
        flip = None
        if self.random_flip:
            flip = torch.rand(micro.rows.shape[0], generator=generator, device=device) < 0.5
        if self.params is not None:
            rows = micro.rows.to(device)
            if flip is not None:
                rows = rows + flip.long() * self.num_images
            params = self.params[rows]
        else:
            x = to_model_range(micro.images.to(device))
            if flip is not None:
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            with torch.no_grad():
                params = self.vae.encode(x.to(self.vae.dtype)).latent_dist.parameters.float()
        return sample_latents(params, generator) * self.scaling_factor
