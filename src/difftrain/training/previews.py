"""Preview grids during training: samples of the EMA weights from fixed seeds, written as PNG and to TensorBoard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difftrain.sampling.grid import make_grid, save_png_atomic
from difftrain.training.setup import TrainingRun


class EmaWeights:
    """Context manager: the unwrapped network carries the EMA weights inside the block (and is in eval mode)."""

    def __init__(self, run: TrainingRun):
        self.network = run.accelerator.unwrap_model(run.parts.network)
        self.ema = run.parts.ema
        self.params = run.parts.ema_parameters(run.accelerator)

    def __enter__(self) -> torch.nn.Module:
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        self.network.eval()
        return self.network

    def __exit__(self, *exc) -> None:
        if self.ema is not None:
            self.ema.restore(self.params)
        self.network.train()


def preview_grid(run: TrainingRun, network: torch.nn.Module) -> tuple[torch.Tensor, int, list[str] | None]:
    """Samples from fixed seeds: one row per class or prompt, or a square grid (the family's layout)."""
    s = run.cfg.sample
    layout = run.family.preview_conditions()
    images = run.family.sampler(network).generate(
        run.objective.inference_scheduler(s.scheduler), [s.seed + i for i in range(layout.count)],
        num_inference_steps=s.num_inference_steps, labels=layout.labels, prompts=layout.prompts,
        negative_prompt=s.negative_prompt, guidance_scale=s.guidance_scale, batch_size=s.batch_size)
    return images, layout.per_row, layout.row_names


def save_samples(run: TrainingRun, output_dir: Path, step: int) -> Path:
    with EmaWeights(run) as network, torch.no_grad():
        images, ncols, row_labels = preview_grid(run, network)
    grid = make_grid(images, ncols, row_labels=row_labels)
    path = output_dir / "samples" / f"step-{step:06d}.png"
    save_png_atomic(grid, path)
    tracker = run.accelerator.get_tracker("tensorboard", unwrap=True)
    if hasattr(tracker, "add_image"):
        tracker.add_image("samples", np.asarray(grid), global_step=step, dataformats="HWC")
    return path
