"""Flow matching (rectified flow; Lipman et al. 2023, Liu et al. 2023) as SD3 and Flux train it, on diffusers' pieces.

x_t = (1 - sigma) x0 + sigma noise, and the network predicts the velocity noise - x0. The sigmas of training are the
sigmas of the exported FlowMatchEulerDiscreteScheduler itself: a time u in [0, 1) from SD3's densities
(`compute_density_for_timestep_sampling`) picks one of that scheduler's N shifted sigmas, as diffusers'
train_dreambooth_sd3.py does, and the network sees sigma * N, the timestep the scheduler gives it when sampling.
So a plain diffusers load of the export samples what was trained.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from difftrain.config import DiffusionConfig
from difftrain.diffusion.loss import per_example_error, sample_noise
from difftrain.diffusion.objective import Network, Objective
from difftrain.sampling.schedulers import make_scheduler

# FlowMatchEulerDiscreteScheduler's defaults for Flux's resolution-dependent shift: mu goes linearly in the image
# token count from BASE_SHIFT at BASE_TOKENS to MAX_SHIFT at MAX_TOKENS.
BASE_TOKENS, MAX_TOKENS = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def resolution_mu(sample_size: int) -> float:
    """Flux's mu (diffusers' calculate_shift) for a square x0 of `sample_size` cells a side, counted as Flux's 2x2
    patches: (sample_size / 2)^2 tokens. Linear in the tokens on both sides of the two anchors, as diffusers has it."""
    tokens = (sample_size / 2) ** 2
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return BASE_SHIFT + slope * (tokens - BASE_TOKENS)


def resolution_shift(sample_size: int) -> float:
    """The static shift equal to Flux's exponential time shift at this size: exp(mu) / (exp(mu) + 1/s - 1) is
    exp(mu) s / (1 + (exp(mu) - 1) s), the static shift by exp(mu). Exported as that static `shift`, so plain
    diffusers pipelines sample it without being passed mu."""
    return math.exp(resolution_mu(sample_size))


class FlowMatchingObjective(Objective):
    """Flow matching with SD3's timestep densities (uniform, logit-normal, mode) and loss weightings (none,
    sigma_sqrt, cosmap), on a static or resolution-dependent sigma shift."""

    name = "flow_matching"

    def __init__(self, noise_scheduler: FlowMatchEulerDiscreteScheduler, timestep_sampling: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                 loss_weighting: str = "none", offset_noise: float = 0.0, shift_source: str = "static"):
        self.noise_scheduler = noise_scheduler
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.loss_weighting = loss_weighting
        self.offset_noise = offset_noise
        self.shift_source = shift_source
        # The training sigmas, highest first (index 0 is sigma = 1, pure noise).
        self.sigmas = noise_scheduler.sigmas.clone()

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, latent: bool = False, base_schedule: Optional[Any] = None,
                    sample_size: Optional[int] = None) -> "FlowMatchingObjective":
        """From `diffusion.*`; `sample_size`: x0's side in pixels or latent cells (needed by the shift by
        resolution). A base model's schedule is refused: config checks keep flow matching to runs from scratch."""
        if base_schedule is not None:
            raise ValueError("diffusion.objective = 'flow_matching' trains from scratch only, not on a base model's "
                             "DDPM schedule (model.pretrained)")
        if cfg.flow_shift_by_resolution:
            if sample_size is None:
                raise ValueError("diffusion.flow_shift_by_resolution needs the sample size of x0")
            shift, source = resolution_shift(sample_size), f"by resolution ({sample_size} px side)"
        else:
            shift, source = cfg.flow_shift, "static"
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=shift)
        return cls(scheduler, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                   cfg.loss_weighting, cfg.offset_noise, source)

    @property
    def shift(self) -> float:
        return float(self.noise_scheduler.config.shift)

    def sample_noise(self, shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return sample_noise(shape, generator, device, self.offset_noise)

    def sample_times(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Indices into the training sigmas (0 = sigma 1), from u drawn by the step's generator."""
        u = compute_density_for_timestep_sampling(self.timestep_sampling, batch_size, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                  device=device, generator=generator)
        # u reaches 1.0 (a float32 sigmoid of a large logit; 'mode' at a uniform draw of 0): that is the last index.
        n = self.noise_scheduler.config.num_train_timesteps
        return (u * n).long().clamp(0, n - 1)

    def sigmas_at(self, times: torch.Tensor) -> torch.Tensor:
        """The training sigmas of indices `times`, shape (B,), float32 on their device."""
        return self.sigmas.to(times.device)[times]

    def loss(self, network: Network, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        sigmas = self.sigmas_at(times)
        s = sigmas.view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1.0 - s) * x0 + s * noise
        # The network's timestep input is the scheduler's timestep for this sigma (sigma * N), as when sampling.
        prediction = network(x_t, sigmas * self.noise_scheduler.config.num_train_timesteps)
        target = noise - x0
        per_example = per_example_error(prediction, target, mask)
        return per_example * compute_loss_weighting_for_sd3(self.loss_weighting, sigmas).float()

    @property
    def scheduler_config(self) -> Any:
        return self.noise_scheduler.config

    def training_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return self.noise_scheduler

    def inference_scheduler(self, name: str, clip_x0: Optional[bool] = None) -> Any:
        """A flow sampler of kind `name` (euler, heun, dpm++, unipc) with the training shift; other names are refused
        with that list.

        `clip_x0` is not used: flow samplers never clip x0 to [-1, 1]. DDPM clips because its x0 estimate
        (x_t - sqrt(1 - a) eps) / sqrt(a) multiplies the network's error by up to 1 / sqrt(a) (~150 at t = T on a
        linear schedule); the flow estimate x_t - sigma v multiplies it by sigma <= 1, so the early estimates stay on
        the data's scale. And FlowMatchEuler / Heun have no clipping, so leaving it out of DPM++ / UniPC too keeps
        every flow sampler, and a plain diffusers load of the export, sampling the same model the same way.
        """
        return make_scheduler(name, self.scheduler_config)

    def describe(self) -> str:
        density = {"uniform": "uniform times",
                   "logit_normal": f"logit-normal times (mean {self.logit_mean:g}, std {self.logit_std:g})",
                   "mode": f"mode times (scale {self.mode_scale:g})"}[self.timestep_sampling]
        weighting = "" if self.loss_weighting == "none" else f", {self.loss_weighting} weighting"
        offset = f", offset noise {self.offset_noise:g}" if self.offset_noise else ""
        return (f"flow matching (velocity target), {self.noise_scheduler.config.num_train_timesteps} sigmas, "
                f"shift {self.shift:.3g} ({self.shift_source}), {density}{weighting}{offset}")

