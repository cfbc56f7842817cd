"""AutoencoderKL for latent diffusion: build from scratch, load pretrained, encode to (cached) distributions.

Latents are cached as the encoder's Gaussian parameters (mean and log-variance), not as samples, so each
step still draws a fresh latent sample (as on-the-fly encoding does) from the step's own generator.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from difftrain.config import VaeConfig
from difftrain.data.transforms import to_model_range
from difftrain.models.pretrained import looks_local, resolve

logger = logging.getLogger(__name__)


def _groups(channels: list[int]) -> int:
    """Largest GroupNorm group count <= 32 that divides every width."""
    g = 0
    for c in channels:
        g = math.gcd(g, int(c))
    return max(d for d in range(1, min(32, g) + 1) if g % d == 0)


def build_scratch_vae(cfg: VaeConfig, channels: int, resolution: int) -> AutoencoderKL:
    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=_groups(cfg.block_out_channels),
        sample_size=resolution,
    )


def _from_vae_location(load: Callable, path: str, key: str, what: str):
    """`load(source, subfolder=...)` (weights or config) of the AutoencoderKL at `path`: a local AutoencoderKL folder
    or pipeline folder with vae/ (its layout checked first), or a hub id tried as a pipeline's vae/, then as a VAE."""
    source = resolve(path)
    if looks_local(path):
        from pathlib import Path

        local = Path(source)
        if not local.is_dir():
            raise FileNotFoundError(f"{key} = {path!r}: no such directory")
        subfolder = "vae" if (local / "vae" / "config.json").is_file() else None
        if subfolder is None and not (local / "config.json").is_file():
            raise FileNotFoundError(f"{key} = {path!r}: neither an AutoencoderKL folder (config.json) nor a pipeline with vae/")
        return load(source, subfolder=subfolder)
    try:
        return load(source, subfolder="vae")
    except (OSError, ValueError):
        try:
            return load(source, subfolder=None)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"{key} = {path!r}: could not {what} ({exc})") from exc


def load_pretrained_vae(path: str, key: str = "vae.pretrained") -> AutoencoderKL:
    """An AutoencoderKL folder, or a pipeline folder / hub pipeline holding one in vae/."""
    return _from_vae_location(AutoencoderKL.from_pretrained, path, key, "load an AutoencoderKL")


def load_vae_config(path: str, key: str = "vae.pretrained") -> dict:
    """The config of the AutoencoderKL `load_pretrained_vae(path)` loads, without its weights."""
    return dict(_from_vae_location(AutoencoderKL.load_config, path, key, "read an AutoencoderKL config"))


def downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell along each side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_distribution_params(vae: AutoencoderKL, images_uint8: torch.Tensor, flip: bool = False,
                               batch_size: int = 64) -> torch.Tensor:
    """The encoder's Gaussian parameters (N, 2*latent_channels, h, w), float32, on the VAE's device."""
    out = []
    for start in range(0, images_uint8.shape[0], batch_size):
        x = to_model_range(images_uint8[start : start + batch_size].to(vae.device))
        if flip:
            x = x.flip(-1)
        out.append(vae.encode(x.to(vae.dtype)).latent_dist.parameters.float())
    return torch.cat(out)


def sample_latents(params: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Draw one latent per row of cached Gaussian parameters (unscaled)."""
    return DiagonalGaussianDistribution(params).sample(generator=generator)


def measure_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of the data's latents, so scaled latents have unit variance (the SD convention)."""
    return float(1.0 / latents.float().std().clamp_min(1e-6))
