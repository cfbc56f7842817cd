"""What the network predicts (diffusers' `prediction_type`): the one place that switches on it.

Each parameterisation says what the training target is and how Min-SNR-gamma's weight on the x0 loss
(min(SNR, gamma), Hang et al. 2023) is expressed on its own MSE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from diffusers import DDPMScheduler


@dataclass(frozen=True)
class Parameterisation:
    target: Callable[[DDPMScheduler, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """(scheduler, x0, noise, timesteps) -> what the network should output."""
    snr_divisor: Optional[Callable[[torch.Tensor], torch.Tensor]]
    """Min-SNR weight = min(SNR, gamma) / snr_divisor(SNR); None: the weight is min(SNR, gamma) itself."""


PREDICTION_TYPES: dict[str, Parameterisation] = {
    "epsilon": Parameterisation(lambda scheduler, x0, noise, t: noise, lambda snr_t: snr_t),
    "v_prediction": Parameterisation(lambda scheduler, x0, noise, t: scheduler.get_velocity(x0, noise, t),
                                     lambda snr_t: snr_t + 1.0),
    "sample": Parameterisation(lambda scheduler, x0, noise, t: x0, None),
}


def parameterisation(prediction_type: str) -> Parameterisation:
    try:
        return PREDICTION_TYPES[prediction_type]
    except KeyError:
        raise ValueError(f"prediction_type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}") from None
