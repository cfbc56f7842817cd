"""The objective classes by `diffusion.objective`: the one place that lists them (objective.py defines the interface
and DDPM, flow.py flow matching; neither imports the other's module back)."""

from __future__ import annotations

from difftrain.diffusion.flow import FlowMatchingObjective
from difftrain.diffusion.objective import DDPMObjective, Objective

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (DDPMObjective, FlowMatchingObjective)}
