"""Classifier-free guidance as a wrapper around any conditional denoiser (never inside the backbone)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

# (x_t, t, cond) -> prediction; cond is a batch-first tensor (class labels or text embeddings) or None.
Denoiser = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def guided_prediction(
    denoiser: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Optional[torch.Tensor],
    null_cond: Optional[torch.Tensor],
    guidance_scale: float,
) -> torch.Tensor:
    """uncond + scale * (cond - uncond), with both branches in one batched forward.

    scale 1 is the plain conditional model, 0 the unconditional one (each in a single forward).
    """
    if cond is None or null_cond is None or guidance_scale == 1.0:
        return denoiser(x, t, cond)
    if guidance_scale == 0.0:
        return denoiser(x, t, null_cond)
    both = denoiser(torch.cat([x, x]), t, torch.cat([cond, null_cond]))
    pred_cond, pred_uncond = both.chunk(2)
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)
