"""One sampling loop over any diffusers scheduler, with per-image seeds.

Image i starts from noise drawn by its own generator seeded with seeds[i], and stochastic schedulers
draw their step noise from the same per-image generators, so an image depends on its seed only, not
on the batch it was generated in. A caller may pass its own torch.Generator for an image instead of
a seed (the pipelines' `generator=`, as in diffusers).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence, Union

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from difftrain.sampling.guidance import Denoiser, guided_prediction

# What decides an image's noise: an int seed (a fresh generator on the sampling device is seeded with it)
# or a generator of the caller's, which is drawn from as it stands. One generator given for several images
# is drawn from image after image, so those images depend on the batch, as with diffusers' one generator.
Seed = Union[int, torch.Generator]


def sample(
    denoiser: Denoiser,
    scheduler: SchedulerMixin,
    shape: tuple[int, int, int],
    seeds: Sequence[Seed],
    *,
    num_inference_steps: int,
    cond: Optional[torch.Tensor] = None,
    null_cond: Optional[torch.Tensor] = None,
    guidance_scale: float = 1.0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    callback: Optional[Callable[[dict], None]] = None,
) -> torch.Tensor:
    """Generate len(seeds) samples of `shape` (C, H, W); returns float tensors in model space.

    Args:
        seeds: one per image, an int or a torch.Generator (`Seed`).
        denoiser: (x_t, t, cond) -> model output in the scheduler's prediction type.
        scheduler: a fresh diffusers scheduler (it is reset for every batch).
        cond: per-image conditioning, batch-first with len(seeds) rows, or None.
        null_cond: the unconditional conditioning, one row per image, for guidance.
        callback: called after every step with {'x', 'i', 't', 'batch'}.
    """
    device = torch.device(device)
    seeds = list(seeds)
    step_parameters = inspect.signature(scheduler.step).parameters
    step_options = {}
    clips = scheduler.config.get("clip_sample") or scheduler.config.get("thresholding")
    if clips and "use_clipped_model_output" in step_parameters:
        # DDIM: step with the noise implied by the clipped x0, not the model's raw output; clipping x0
        # alone and stepping with the raw output drifts further with every step (BENCHMARKS.md). Only
        # when it clips: otherwise the two are the same noise, and re-deriving it near t = 0 (a division
        # by sqrt(1 - alpha_bar), ~0.01) only loses precision.
        step_options["use_clipped_model_output"] = True
    outputs = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        generators = [s if isinstance(s, torch.Generator) else torch.Generator(device=device).manual_seed(int(s))
                      for s in chunk]
        x = randn_tensor((len(chunk), *shape), generator=generators, device=device)
        scheduler.set_timesteps(num_inference_steps, device=device)
        if hasattr(scheduler, "set_begin_index"):
            # Sampling always starts at the first timestep. Without this, diffusers locates the start by
            # value and, when the schedule repeats its first timestep (Karras sigmas on a cosine schedule),
            # starts one step late and indexes past the end of its sigmas.
            scheduler.set_begin_index(0)
        # FlowMatch* schedulers start from unit noise and take x_t as it is: they have neither attribute.
        x = x * getattr(scheduler, "init_noise_sigma", 1.0)
        c = None if cond is None else cond[start : start + len(chunk)]
        nc = None if null_cond is None else null_cond[start : start + len(chunk)]
        extra = {**step_options, "generator": generators} if "generator" in step_parameters else step_options
        for i, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            prediction = guided_prediction(denoiser, model_input, t, c, nc, guidance_scale)
            x = scheduler.step(prediction, t, x, **extra).prev_sample
            if callback is not None:
                callback({"x": x, "i": i, "t": t, "batch": start // batch_size})
        outputs.append(x)
    return torch.cat(outputs)


def parse_seeds(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7] (EDM's parse_int_list)."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ValueError(f"seeds {text!r}: {part!r} is not a number or range like '0-63'") from None
    if not seeds:
        raise ValueError(f"seeds {text!r}: expected a list like '0-63' or '1,5,9'")
    return seeds
