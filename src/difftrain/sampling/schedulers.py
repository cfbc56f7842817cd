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
    return SCHEDULERS[key].from_config(base_config)
