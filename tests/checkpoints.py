"""A real single-process accelerate Accelerator with a tiny prepared model, for the checkpoint writer's tests.

accelerate keeps its process state in singletons; they are cleared before and after, so neither these
tests nor a training run in the same pytest process sees the other's settings (cpu=True here).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from difftrain.training.checkpoint import save_checkpoint
from difftrain.training.progress import ProgressRecord


def _reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@contextmanager
def tiny_accelerator(features: int = 8) -> Iterator[Accelerator]:
    """An Accelerator(cpu=True) that has prepared a Linear(features, features) and its AdamW, after one step
    (so the optimizer holds state); the model is `accelerator._models[0]`."""
    _reset_accelerate()
    try:
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = torch.nn.Linear(features, features)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, optimizer = accelerator.prepare(model, optimizer)
        model(torch.ones(2, features)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        yield accelerator
    finally:
        _reset_accelerate()


def record(step: int, **changes: Any) -> ProgressRecord:
    """A progress record as training writes it, for a global batch of 8 and 64 training images."""
    values: dict[str, Any] = dict(step=step, images_seen=step * 8, epoch=step * 8 / 64, num_processes=1,
                                  difftrain_version="0.0.test", config={"train": {"batch_size": 8}}, numerics={})
    values.update(changes)
    return ProgressRecord(**values)


def save(accelerator: Accelerator, checkpoints_dir: Path, step: int, keep: Optional[int] = None,
         needed_bytes: int = 0, **changes: Any) -> Path:
    """The one checkpoint writer, as training calls it."""
    return save_checkpoint(accelerator, checkpoints_dir, step, record(step, **changes), needed_bytes, keep)
