"""FID and KID between two feature sets, with torchmetrics doing the Fréchet and kernel math.

Features are computed once (and cached for reference data) by whatever network applies (Inception or
the reference classifier); torchmetrics receives them through a pass-through "feature extractor".
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class _Precomputed(torch.nn.Module):
    """Lets torchmetrics accept features instead of images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between feature sets (N, D) and (M, D) (Gaussian fits, Fréchet distance)."""
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples per side (got {real.shape[0]} and {fake.shape[0]})")
    # sync_on_compute=False: features are already gathered; scoring runs on one process of a launch.
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=False,
                                      sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subset_size: int = 1000, subsets: int = 100,
                    seed: int = 0) -> tuple[float, float]:
    """KID (polynomial-kernel MMD^2, unbiased) averaged over random subsets: (mean, std).

    Subsets hold `subset_size` features per side, or half the smaller set when that is less: subsets of
    the whole set would all be identical and report a std of 0 that says nothing about the spread.
    """
    size = min(subset_size, min(real.shape[0], fake.shape[0]) // 2)
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per side (got {real.shape[0]} and {fake.shape[0]})")
    with warnings.catch_warnings():  # its "features are kept in memory" notice: they are ours already
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subset_size=size, subsets=subsets,
                                         sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global RNG
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
