"""Inference schedulers by short name, built from the training scheduler's config."""

from __future__ import annotations

from typing import Any, Optional

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from difftrain.config.schema import FLOW_SCHEDULERS

SCHEDULERS: dict[str, type] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
}


# Schedulers that can clip their x0 estimate (diffusers' `thresholding` with a bound of 1 is plain
# clipping to [-1, 1]: the dynamic bound is clamped to [1, sample_max_value]).
_THRESHOLDING = ("dpm++", "unipc")


def clips_x0_by_default(base_config: Any) -> bool:
    """Whether a schedule is for pixels in [-1, 1], whose x0 estimate may be clipped to that range.

    DDPM clips unless told not to (its default clip_sample=True); latent schedules set
    clip_sample=False (build_noise_scheduler, Stable Diffusion's configs), and latents have no fixed range.
    """
    return base_config.get("clip_sample", True) is not False


def is_flow_schedule(base_config: Any) -> bool:
    """Whether a scheduler config is a flow-matching schedule (sigmas from 1 to 0 on x_t = (1 - s) x0 + s noise):
    a FlowMatch* scheduler's (a `shift`, no betas) or a multistep solver's with flow sigmas."""
    return (bool(base_config.get("use_flow_sigmas")) or base_config.get("prediction_type") == "flow_prediction"
            or ("shift" in base_config and "beta_start" not in base_config))


def flow_shift_of(base_config: Any) -> float:
    """The static sigma shift of a flow schedule (`shift` of FlowMatch*, `flow_shift` of the multistep solvers)."""
    if base_config.get("use_dynamic_shifting"):
        raise ValueError("this flow schedule shifts its sigmas by image size at sampling time (use_dynamic_shifting, "
                         "as Flux does); difftrain samples flow schedules with a static shift only")
    return float(base_config.get("shift", base_config.get("flow_shift", 1.0)))


def make_flow_scheduler(key: str, base_config: Any) -> SchedulerMixin:
    """A flow-matching sampler of kind `key` (one of FLOW_SCHEDULERS) on the schedule of `base_config`: the same
    train timesteps and static shift as training (diffusion/flow.py), so it steps through the σ's trained on.

    No sampler here clips the x0 estimate of a flow model: see FlowMatchingObjective.inference_scheduler.
    """
    if key not in FLOW_SCHEDULERS:
        raise ValueError(f"scheduler {key!r} cannot sample a flow-matching model; use one of "
                         f"{', '.join(FLOW_SCHEDULERS)}")
    steps, shift = int(base_config.get("num_train_timesteps", 1000)), flow_shift_of(base_config)
    if key == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=steps, shift=shift)
    if key == "heun":
        return FlowMatchHeunDiscreteScheduler(num_train_timesteps=steps, shift=shift)
    # DPM-Solver++ / UniPC in their flow form (as diffusers' Wan and SANA pipelines use them): x0 = x_t - sigma * v.
    solver = DPMSolverMultistepScheduler if key == "dpm++" else UniPCMultistepScheduler
    return solver(num_train_timesteps=steps, use_flow_sigmas=True, prediction_type="flow_prediction",
                  flow_shift=shift)


def make_scheduler(name: str, base_config: Any, clip_x0: Optional[bool] = None) -> SchedulerMixin:
    """A fresh scheduler of kind `name` sharing the training schedule (betas, prediction type; or a flow schedule's
    timesteps and shift, `make_flow_scheduler`).

    Args:
        clip_x0: clip the model's x0 estimate to [-1, 1] at every step (pixel models), for the
            schedulers that can (DDPM, DDIM, DPM++, UniPC). None: as `clips_x0_by_default(base_config)` says.
            Flow schedules never clip (FlowMatchingObjective.inference_scheduler says why).
    """
    key = name.lower()
    if key in ("dpmpp", "dpm", "dpmsolver"):
        key = "dpm++"
    if key not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r}: expected one of {', '.join(SCHEDULERS)}")
    if is_flow_schedule(base_config):
        return make_flow_scheduler(key, base_config)
    clip = clips_x0_by_default(base_config) if clip_x0 is None else clip_x0
    if key in ("ddim", "ddpm"):
        # DDIM clips like DDPM; the sampling loop then steps it with the noise implied by the clipped x0
        # (`use_clipped_model_output`), without which clipping made DDIM worse with every step.
        return SCHEDULERS[key].from_config(base_config, clip_sample=clip)
    # DDPM's clipping is part of why it samples pixel models well; DPM++ and UniPC left unclipped fell
    # far behind it on a linear-schedule epsilon model (digits, 20 steps: classifier FID 1.23 unclipped,
    # 0.66 clipped; BENCHMARKS.md, sampling at equal quality).
    threshold = {"thresholding": clip, "sample_max_value": 1.0} if key in _THRESHOLDING else {}
    if key == "dpm++":
        # Steps uniform in log-SNR (the spacing of Lu et al.'s DPM-Solver) rather than in t. Measured on the
        # digits preset, 20 steps, two draws of 300 seeds: classifier FID 0.665 / 0.658 against 0.704 /
        # 0.714 with diffusers' default spacing, and 0.629 / 0.706 for DDPM at 1,000 steps (BENCHMARKS.md).
        return DPMSolverMultistepScheduler.from_config(base_config, use_lu_lambdas=True, **threshold)
    return SCHEDULERS[key].from_config(base_config, **threshold)
