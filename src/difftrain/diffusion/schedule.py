"""The training noise schedule (a diffusers DDPMScheduler) and SNR helpers over its alphas_cumprod."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from difftrain.config import DiffusionConfig
from difftrain.diffusion.prediction import parameterisation


def build_noise_scheduler(cfg: DiffusionConfig, latent: bool = False) -> DDPMScheduler:
    """The scheduler used to noise training data; its config is exported with the model.

    Latent models get Stable Diffusion's inference settings: no clipping of predicted x0 to [-1, 1]
    (meant for pixels, wrong for latents) and steps_offset=1 (which StableDiffusionPipeline expects).
    Pixel models leave both unset, so each inference scheduler built from this config keeps its own
    default for them.
    """
    latent_settings = {"clip_sample": False, "steps_offset": 1} if latent else {}
    return DDPMScheduler(
        **latent_settings,
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
    )


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at integer timesteps, shape (B,)."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

    The paper's weight on the x0 loss is min(SNR, gamma). Expressed on each parameterisation's own MSE:
    epsilon: min(SNR, gamma) / SNR; v: min(SNR, gamma) / (SNR + 1); sample (x0): min(SNR, gamma).
    """
    divisor = parameterisation(prediction_type).snr_divisor
    clipped = torch.clamp(snr_t, max=gamma)
    return clipped if divisor is None else clipped / divisor(snr_t)
