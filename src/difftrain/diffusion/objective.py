"""Training objectives: what differs between ways of training a denoiser, behind one interface.

An objective draws the noise and the times of a batch, forms x_t, says what the network should predict
there and how each example's error is weighted, and gives the matching schedule for sampling and export.
The training loop and the model families only call this interface, so a second objective (flow matching)
is one more class listed in objectives.py's OBJECTIVES (FlowMatchingObjective, flow.py).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Optional

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from difftrain.config import DiffusionConfig
from difftrain.diffusion.loss import denoising_loss, sample_noise
from difftrain.diffusion.schedule import build_noise_scheduler
from difftrain.sampling.schedulers import make_scheduler

logger = logging.getLogger(__name__)

# A network bound to its condition: (x_t, times) -> prediction shaped like x_t.
Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Objective(ABC):
    name: ClassVar[str]
    """Its `diffusion.objective` value."""

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: DiffusionConfig, latent: bool = False, base_schedule: Optional[Any] = None,
                    sample_size: Optional[int] = None) -> "Objective":
        """The objective of `diffusion.*`; `latent`: x0 is a VAE latent (never clipped to [-1, 1] when sampling);
        `base_schedule`: a fine-tuned base model's own schedule, which wins over `diffusion.*` (and says so);
        `sample_size`: the side of x0 in pixels or latent cells (for schedules that follow the resolution)."""

    @abstractmethod
    def sample_noise(self, shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """The noise of a batch of x0 of `shape`, drawn from the step's generator."""

    @abstractmethod
    def sample_times(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """One training time per example, drawn from the step's generator (after the noise)."""

    @abstractmethod
    def loss(self, network: Network, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-example weighted loss (B,): forms x_t, calls `network(x_t, times)`, compares with the target; with a
        loss `mask` (B, 1, H, W) in [0, 1] at x0's resolution, the error is averaged over the mask's area
        (diffusion/loss.py per_example_error; an all-ones mask gives exactly the unmasked loss)."""

    @property
    @abstractmethod
    def scheduler_config(self) -> Any:
        """The training schedule as a diffusers scheduler config (what samplers and the export are built from)."""

    @abstractmethod
    def training_scheduler(self) -> SchedulerMixin:
        """The training schedule itself, for pipelines that sample with it (diffusers' DDPMPipeline)."""

    def inference_scheduler(self, name: str, clip_x0: Optional[bool] = None) -> SchedulerMixin:
        """A fresh sampler of kind `name` (sample.scheduler) on this objective's schedule."""
        return make_scheduler(name, self.scheduler_config, clip_x0=clip_x0)

    @abstractmethod
    def describe(self) -> str:
        """One line for the run log and the model card."""


class DDPMObjective(Objective):
    """DDPM (Ho et al. 2020) on a diffusers DDPMScheduler: discrete timesteps, epsilon / v / sample prediction,
    optional Min-SNR-gamma weighting and offset noise."""

    name = "ddpm"

    def __init__(self, noise_scheduler: DDPMScheduler, snr_gamma: Optional[float] = None, offset_noise: float = 0.0):
        self.noise_scheduler = noise_scheduler
        self.snr_gamma = snr_gamma
        self.offset_noise = offset_noise

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, latent: bool = False, base_schedule: Optional[Any] = None,
                    sample_size: Optional[int] = None) -> "DDPMObjective":
        """From `diffusion.*`, or from a fine-tuned base model's own schedule when `base_schedule` is given.

        A base model was trained on its schedule and prediction type; training it on others would undo what it
        learnt, so the base's win, and the log names every `diffusion.*` value that was not used.
        """
        if base_schedule is None:
            return cls(build_noise_scheduler(cfg, latent=latent), cfg.snr_gamma, cfg.offset_noise)
        base = base_schedule.config
        logger.info("noise schedule of the base model: %s betas, %s prediction", base.beta_schedule,
                    base.prediction_type)
        for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
            if getattr(cfg, key) != base.get(key):
                logger.info("diffusion.%s = %r is not used: the base model's schedule has %r", key, getattr(cfg, key),
                            base.get(key))
        return cls(base_schedule, cfg.snr_gamma, cfg.offset_noise)

    def sample_noise(self, shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return sample_noise(shape, generator, device, self.offset_noise)

    def sample_times(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        return torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator,
                             device=device)

    def loss(self, network: Network, x0: torch.Tensor, noise: torch.Tensor, times: torch.Tensor,
             mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return denoising_loss(network, self.noise_scheduler, x0, noise, times, self.snr_gamma, mask)

    @property
    def scheduler_config(self) -> Any:
        return self.noise_scheduler.config

    def training_scheduler(self) -> DDPMScheduler:
        return self.noise_scheduler

    def describe(self) -> str:
        c = self.noise_scheduler.config
        weighting = f", min-SNR-{self.snr_gamma:g} weighting" if self.snr_gamma else ""
        offset = f", offset noise {self.offset_noise:g}" if self.offset_noise else ""
        return (f"DDPM, {c.beta_schedule} betas, {c.num_train_timesteps} timesteps, {c.prediction_type} prediction"
                f"{weighting}{offset}")
