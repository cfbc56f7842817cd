"""The run's training state on disk: write a checkpoint of a step, resume from the newest one that reads back,
and the clean stop on SIGTERM/Ctrl-C that checkpoints the step just finished."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import difftrain
from difftrain.training import checkpoint as ckpt
from difftrain.training import distributed
from difftrain.training.numerics import NonFiniteGuard
from difftrain.training.progress import ProgressRecord, read_progress
from difftrain.training.resume_check import load_newest_checkpoint
from difftrain.training.setup import TrainingRun
from difftrain.training.stop import StopRequested, signal_name

logger = logging.getLogger(__name__)


def save_training_state(run: TrainingRun, output_dir: Path, step: int, numerics: Optional[dict] = None,
                        state_bytes: int = 0) -> None:
    """Write checkpoints/step-N atomically, after checking there is room for it.

    Args:
        numerics: the non-finite policy's state (remedies taken), restored on resume.
        state_bytes: size estimate of the first checkpoint (model, optimizer, EMA); later ones use the previous size.
    """
    plan, accelerator = run.plan, run.accelerator
    record = ProgressRecord(
        step=step,
        images_seen=step * plan.global_batch_size,
        epoch=step * plan.global_batch_size / plan.num_train_images,
        num_processes=accelerator.num_processes,
        difftrain_version=difftrain.__version__,
        config=plan.cfg.to_dict(),
        numerics=numerics or {},
    )
    checkpoints_dir = output_dir / "checkpoints"
    needed = ckpt.estimate_checkpoint_bytes(checkpoints_dir, state_bytes) if accelerator.is_main_process else 0
    ckpt.save_checkpoint(accelerator, checkpoints_dir, step, record, needed, plan.cfg.train.checkpoints_total_limit)


def resume(run: TrainingRun, output_dir: Path, guard: Optional[NonFiniteGuard] = None) -> int:
    """Load the newest checkpoint that reads back whole (older ones if it does not); returns the step to continue
    from. `guard` receives the non-finite policy's state saved with it; the LR schedule is moved to the current
    process count when the checkpoint was written by another."""
    accelerator, parts = run.accelerator, run.parts
    checkpoints_dir = output_dir / "checkpoints"
    if accelerator.is_main_process:
        ckpt.remove_stale_temporaries(checkpoints_dir)
    accelerator.wait_for_everyone()
    # Partial checkpoints (LoRA) hold only the trained parameters; the frozen base comes from the base model.
    _, latest = load_newest_checkpoint(accelerator, checkpoints_dir, parts.partial_checkpoints)
    if latest is None:
        return 0
    progress = read_progress(latest)
    if guard is not None:
        guard.load_state(progress.numerics)
    distributed.note_process_count(progress, accelerator, parts.lr_scheduler)
    logger.info("resumed from %s (step %d)", latest, progress.step)
    return progress.step


def stop_on_signal(run: TrainingRun, output_dir: Path, done: int, saved_step: Optional[int], guard: NonFiniteGuard,
                   state_bytes: int, signum: int) -> None:
    """After a step, on SIGTERM/Ctrl-C: checkpoint that step (unless told not to) and raise StopRequested."""
    name = signal_name(signum)
    if run.cfg.train.checkpoint_on_signal:
        if saved_step != done:
            save_training_state(run, output_dir, done, guard.state_dict(), state_bytes)
        kept = f"checkpoint {ckpt.checkpoint_name(done)} holds every step so far"
    else:
        kept = "no checkpoint written (train.checkpoint_on_signal is false): the last periodic one is kept"
    message = (f"stopped by {name} after step {done} of {run.plan.max_steps}: {kept}; "
               f"the same command resumes (exit code {128 + signum})")
    logger.warning("%s", message)
    raise StopRequested(signum, message, logged=True)
