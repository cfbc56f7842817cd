"""Latent inputs of latent-diffusion training: the frozen VAE, its scale, and the optional latent cache."""

from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
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

    def __init__(self, vae: AutoencoderKL, scaling_factor: float,
                 images_uint8: Union[torch.Tensor, Sequence[torch.Tensor]], random_flip: bool, cache: bool,
                 bucket_index: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """`images_uint8`: (N, C, H, W), or with data.buckets one such tensor per bucket and `bucket_index` =
        (bucket of each row, its index in its bucket): each bucket's latents are cached in their own tensor."""
        self.vae = vae
        self.scaling_factor = float(scaling_factor)
        self.random_flip = random_flip
        self.bucket_index = bucket_index
        buckets = [images_uint8] if bucket_index is None else list(images_uint8)
        self.bucket_sizes = [int(images.shape[0]) for images in buckets]
        self.num_images = sum(self.bucket_sizes)
        self.bucket_params: Optional[list[torch.Tensor]] = None
        """Cached distribution parameters per bucket (one bucket without data.buckets), flipped copies after them."""
        if cache:
            self.bucket_params = []
            for images in buckets:
                parts = [encode_distribution_params(vae, images)]
                if random_flip:
                    parts.append(encode_distribution_params(vae, images, flip=True))
                self.bucket_params.append(torch.cat(parts))
            logger.info("cached latent distributions of %d images%s%s (%.1f MiB); the VAE encoder is not run per step",
                        self.num_images, " x 2 flips" if random_flip else "",
                        "" if bucket_index is None else f" in {len(buckets)} buckets",
                        sum(p.numel() for p in self.bucket_params) * 4 / 2**20)

    @property
    def params(self) -> Optional[torch.Tensor]:
        """The cache of data without buckets: (N or 2N with flips, 2 x latent channels, h, w)."""
        return None if self.bucket_params is None else self.bucket_params[0]

    def draw(self, micro: MicroBatch, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of a gathered micro-batch: from the cache by its rows, or encoded from its images."""
        return self.draw_with_mask(micro, generator)[0]

    def draw_with_mask(self, micro: MicroBatch, generator: torch.Generator,
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """`draw`, the micro-batch's loss masks flipped as its latents and area-downsampled to their size
        ((B, 1, h, w) float in [0, 1]; None without masks), and which images were flipped ((B,) bool, None without
        data.random_flip; SDXL mirrors their crop ids)."""
        device = self.vae.device
        flip = None
        if self.random_flip:
            flip = torch.rand(micro.rows.shape[0], generator=generator, device=device) < 0.5
        if self.bucket_params is not None:
            rows, bucket = micro.rows, 0
            if self.bucket_index is not None:
                bucket = int(self.bucket_index[0][rows[0]])
                rows = self.bucket_index[1][rows]
            rows = rows.to(device)
            if flip is not None:
                rows = rows + flip.long() * self.bucket_sizes[bucket]
            params = self.bucket_params[bucket][rows]
        else:
            x = to_model_range(micro.images.to(device))
            if flip is not None:
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            with torch.no_grad():
                params = self.vae.encode(x.to(self.vae.dtype)).latent_dist.parameters.float()
        x0 = sample_latents(params, generator) * self.scaling_factor
        mask = None
        if micro.masks is not None:
            mask = micro.masks.to(device).float() / 255.0
            if flip is not None:
                mask = torch.where(flip[:, None, None, None], mask.flip(-1), mask)
            mask = F.interpolate(mask, size=tuple(x0.shape[-2:]), mode="area")
        return x0, mask, flip
