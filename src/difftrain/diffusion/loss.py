"""The denoising loss: noise the data, compute the target of the chosen parameterisation, weight it.

Returns per-example losses (B,) so callers decide how to reduce (prior preservation, masking, logging).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from diffusers import DDPMScheduler

from difftrain.diffusion.prediction import parameterisation
from difftrain.diffusion.schedule import min_snr_weights, snr


def sample_noise(shape: torch.Size, generator: torch.Generator, device: torch.device, offset_noise: float) -> torch.Tensor:
    """Gaussian noise, plus per-(example, channel) offset noise if `offset_noise` > 0.

    Offset noise (Guttenberg 2023) lets the model change an image's mean brightness.
    """
    noise = torch.randn(shape, generator=generator, device=device)
    if offset_noise > 0:
        noise = noise + offset_noise * torch.randn(shape[:2] + (1, 1), generator=generator, device=device)
    return noise


def per_example_error(prediction: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      ) -> torch.Tensor:
    """Per-example mean squared error (B,); with a loss `mask` (B, 1, H, W) in [0, 1], normalised by the mask's area:
    sum(mask * err) / (sum(mask) * channels). Written as the unmasked mean times numel / (sum(mask) * channels), so an
    all-ones mask gives exactly (bit for bit) the unmasked loss; an all-zero mask gives 0."""
    error = (prediction.float() - target.float()).pow(2)
    dims = tuple(range(1, error.ndim))
    if mask is None:
        return error.mean(dim=dims)
    mask = mask.float()
    per_example_numel = error[0].numel()
    area = mask.sum(dim=dims) * error.shape[1]
    return (error * mask).mean(dim=dims) * (per_example_numel / area.clamp_min(1e-12))


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network should output for `scheduler.config.prediction_type`."""
    return parameterisation(scheduler.config.prediction_type).target(scheduler, x0, noise, timesteps)


def denoising_loss(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    snr_gamma: Optional[float] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-example weighted MSE between `model(x_t, t)` and the target, shape (B,).

    Args:
        model: maps (x_t, timesteps) to a prediction shaped like x_t (conditioning bound in already).
        scheduler: the training DDPMScheduler (its prediction_type and alphas_cumprod are used).
        x0: clean data (B, C, H, W).
        noise: the noise to add, same shape.
        timesteps: integer timesteps (B,).
        snr_gamma: Min-SNR-gamma weighting if given.
        mask: (B, 1, H, W) loss mask in [0, 1], or None (see `per_example_error`).
    """
    x_t = scheduler.add_noise(x0, noise, timesteps)
    prediction = model(x_t, timesteps)
    if prediction.shape[1] == 2 * x0.shape[1]:
        # Models that also predict variance output twice the channels; the first half is the mean.
        prediction = prediction[:, : x0.shape[1]]
    target = training_target(scheduler, x0, noise, timesteps)
    per_example = per_example_error(prediction, target, mask)
    if snr_gamma is not None:
        weights = min_snr_weights(snr(scheduler.alphas_cumprod, timesteps), snr_gamma, scheduler.config.prediction_type)
        per_example = per_example * weights
    return per_example


def prior_preservation_loss(per_example: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """DreamBooth: the batch is instance examples then as many class examples;
    loss = mean(instance) + prior_loss_weight * mean(class)."""
    instance, prior = torch.chunk(per_example, 2, dim=0)
    return instance.mean() + prior_loss_weight * prior.mean()
