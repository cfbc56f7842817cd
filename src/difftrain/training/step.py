"""One optimizer step: gradient_accumulation_steps micro-batches, each drawn by the family, noised and weighted
by the objective, then clipping, the guarded optimizer update and the EMA update.

Every random draw of a micro-batch (rows, flips, condition dropout, noise, times) comes from a generator keyed by
(seed, step, slot) (data/order.py), so a step is a pure function of the weights, the seed and the step number.
"""

from __future__ import annotations

from typing import Optional

import torch

from difftrain.data.order import micro_batch_generator
from difftrain.training.numerics import NonFiniteGuard
from difftrain.training.setup import TrainingRun


def batch_files(run: TrainingRun, step: int) -> list[str]:
    """Names of the images of loop step `step` on this process (file paths where the source has them)."""
    accumulation = run.cfg.train.gradient_accumulation_steps
    rows: list[int] = []
    for micro in range(accumulation):
        rows += run.loader.rows(step * accumulation + micro).tolist()
    return run.family.row_names(rows)


def train_step(run: TrainingRun, step: int, guard: Optional[NonFiniteGuard] = None) -> torch.Tensor:
    """One optimizer step; returns the mean loss, on device.

    With a `guard`, a step whose loss or gradient is not finite is not applied (see training/numerics.py).
    """
    t, accelerator, parts, family = run.cfg.train, run.accelerator, run.parts, run.family
    device = accelerator.device
    for model in parts.trained:
        model.train()
    params = [p for model in parts.trained for p in model.parameters() if p.requires_grad]
    total = torch.zeros((), device=device)
    applied = True
    for micro in range(t.gradient_accumulation_steps):
        micro_batch = run.loader.get(step * t.gradient_accumulation_steps + micro)  # read ahead by its workers
        generator = micro_batch_generator(t.seed, step, micro, accelerator.process_index, accelerator.num_processes,
                                          device)
        batch = family.batch(micro_batch, generator, device)
        noise = run.objective.sample_noise(batch.x0.shape, generator, device)
        times = run.objective.sample_times(batch.x0.shape[0], generator, device)
        with accelerator.accumulate(*parts.trained):
            with (guard.autocast() if guard is not None else accelerator.autocast()):
                per_example = run.objective.loss(family.network(batch.condition), batch.x0, noise, times,
                                                 mask=batch.mask)
            loss = family.reduce_loss(per_example)
            if guard is not None:
                loss = guard.poison(step, loss)
            accelerator.backward(loss)
            norm = None
            if accelerator.sync_gradients and t.max_grad_norm is not None:
                norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
            if guard is not None and accelerator.sync_gradients:
                applied = guard.check(total + loss.detach(), norm, params)
            if applied:
                parts.optimizer.step()
                parts.lr_scheduler.step()
                applied = not getattr(parts.optimizer, "step_was_skipped", False)
            parts.optimizer.zero_grad(set_to_none=True)
        total += loss.detach()
    if parts.ema is not None and applied:
        parts.ema.step(parts.ema_parameters(accelerator))
    if guard is not None:
        guard.last_applied = applied
    return total / t.gradient_accumulation_steps
