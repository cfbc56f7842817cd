"""Inference schedulers by short name, built from the training scheduler's config."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SCHEDULERS: dict[str, type] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
}


def make_scheduler(name: str, base_config: Any) -> SchedulerMixin:
    """A fresh scheduler of kind `name` sharing the training schedule (betas, prediction type)."""
    key = name.lower()
    if key in ("dpmpp", "dpm", "dpmsolver"):
        key = "dpm++"
    if key not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r}: expected one of {', '.join(SCHEDULERS)}")
    if key == "ddim":
        # diffusers' DDIM clips the predicted x0 but steps with the epsilon of the unclipped output,
        # and the mismatch compounds with the number of steps (measured on the digits preset, 50
        # steps: classifier FID 8.06 clipped vs 1.17 unclipped; BENCHMARKS.md, sampler study).
        return DDIMScheduler.from_config(base_config, clip_sample=False)
    return SCHEDULERS[key].from_config(base_config)
