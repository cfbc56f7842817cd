"""The training loop, top to bottom: set up, resume, step, log, preview, checkpoint, evaluate, finish.

One explicit function (EDM's training_loop.py is the model). What differs between kinds of model is the family's
(families/), what differs between training objectives is the objective's (diffusion/objective.py); nothing here
branches on the kind of run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from difftrain.config import RunConfig, dump_config
from difftrain.families import family_for
from difftrain.processes import launched_rank, process_state, quiet_other_ranks, seconds_since_process_start
from difftrain.training import checkpoint as ckpt
from difftrain.training import distributed
from difftrain.training.finish import finish_run
from difftrain.training.numerics import NonFiniteGuard
from difftrain.training.precision import resolve_mixed_precision
from difftrain.training.previews import save_samples
from difftrain.training.resume_check import check_before_resume, load_newest_checkpoint, read_saved_config
from difftrain.training.run_dir import write_marker
from difftrain.training.run_files import MetricsLog, RunFolder
from difftrain.training.setup import (TrainingRun, build_objective, build_trainables, check_mixed_precision,
                                      make_accelerator, plan_run)
from difftrain.training.state import resume, save_training_state, stop_on_signal
from difftrain.training.status import RunStatus
from difftrain.training.step import batch_files, train_step
from difftrain.training.stop import StopRequested, StopSignals
from difftrain.writes import atomic_write_text

logger = logging.getLogger(__name__)


def train(cfg: RunConfig, stop_at_step: Optional[int] = None, config_source: Optional[str] = None,
          overrides: Sequence[str] = ()) -> Path:
    """Train (or resume) the run described by `cfg`; returns the output directory.

    Raises StopRequested after a clean stop on SIGTERM/Ctrl-C (see training/stop.py).

    Args:
        stop_at_step: stop after this step without exporting, as if interrupted (used by resume tests).
        config_source, overrides: the preset name or YAML path and the overrides `cfg` was made from, recorded in
            .difftrain/status.json (training/status.py) so the run can be shown and started again as it was.
    """
    output_dir = Path(cfg.output_dir)
    check_mixed_precision(cfg)
    processes = process_state()
    quiet_other_ranks(processes)
    # Before anything is read or written: a folder that is not difftrain's is refused, an existing one locked.
    folder = RunFolder(output_dir, processes, is_launch_main=launched_rank() == 0)
    status = RunStatus(output_dir, processes.is_main_process, config_source, overrides)
    accelerator = None
    try:
        with StopSignals() as stop:
            saved = read_saved_config(output_dir)
            changes = check_before_resume(cfg, output_dir, saved)  # unsafe changes refused before any decoding
            family = family_for(cfg)
            family.check_files()
            family.prepare_before_data(folder, processes)  # e.g. DreamBooth class images (starts the folder)
            started_before = folder.started
            plan = plan_run(cfg, family, world_size=processes.num_processes)
            folder.start()
            status.start(family.name, plan.max_steps)
            if not started_before:
                plan.dataset.write_skipped_to(folder.handler)  # decoded before train.log existed
            family.prepare_after_data(folder, processes)  # e.g. a latent run's VAE stage
            for key, old, new in changes:
                logger.info("config change on resume: %s: %r -> %r", key, old, new)
            cfg = resolve_mixed_precision(cfg, family, processes, saved)  # once, before the Accelerator exists
            plan = dataclasses.replace(plan, cfg=cfg)
            accelerator = make_accelerator(cfg, output_dir)
            objective = build_objective(cfg, family)
            parts = build_trainables(cfg, family, plan.max_steps, accelerator)
            run = TrainingRun(plan, family, objective, accelerator, parts)
            try:
                result = _train(run, output_dir, stop_at_step, stop, status)
            finally:
                run.close()
            status.end("finished" if stop_at_step is None or stop_at_step >= plan.max_steps else "interrupted")
            if processes.num_processes > 1:
                distributed.exit_if_teardown_hangs()
            return result
    except StopRequested as exc:
        status.end_by(exc)
        if not exc.logged:
            logger.warning("%s before training completed; nothing was left half-written, and the same command "
                           "resumes from the last complete checkpoint", exc)
        raise
    except BaseException as exc:
        status.end_by(exc)  # best effort, then the error itself
        raise
    finally:
        if accelerator is not None:
            accelerator.end_training()
        folder.close()


def _train(run: TrainingRun, output_dir: Path, stop_at_step: Optional[int], stop: StopSignals,
           status: RunStatus) -> Path:
    cfg, plan, accelerator, parts = run.cfg, run.plan, run.accelerator, run.parts
    t, main = cfg.train, accelerator.is_main_process
    if main:
        # Room for the first checkpoint and the export, before the first write: a run that cannot checkpoint
        # fails now, not after the steps it would lose.
        ckpt.ensure_room_for_run(output_dir, parts.trained + parts.frozen)
        atomic_write_text(output_dir / "config.yaml", dump_config(cfg), "the run's config")
        write_marker(output_dir, cfg.to_dict())
    accelerator.init_trackers("tensorboard")
    guard = NonFiniteGuard(t, accelerator, parts.trained, lambda step: batch_files(run, step))
    start = resume(run, output_dir, guard)
    status.step = start
    logger.info("%s", guard.describe())
    num_params = sum(p.numel() for p in accelerator.unwrap_model(parts.network).parameters())
    num_trained = sum(p.numel() for p in parts.ema_parameters(accelerator))
    state_bytes = ckpt.training_state_bytes(parts.trained)
    logger.info(
        "data: %s, %d images (%d skipped); model: %s family, %.2fM parameters (%.2fM trained); objective: %s; "
        "global batch %d (%d x %d accumulation x %d processes); %d steps (%.1f epochs) from step %d; device %s, "
        "mixed precision %s", plan.dataset.description, len(plan.dataset), len(plan.dataset.skipped),
        run.family.name, num_params / 1e6, num_trained / 1e6, run.objective.describe(), plan.global_batch_size,
        t.batch_size, t.gradient_accumulation_steps, accelerator.num_processes, plan.max_steps,
        plan.max_steps / plan.steps_per_epoch, start, accelerator.device, t.mixed_precision,
    )
    end = plan.max_steps if stop_at_step is None else min(plan.max_steps, stop_at_step)
    progress = tqdm(total=plan.max_steps, initial=start, desc="train", disable=not main, dynamic_ncols=True,
                    mininterval=1.0)
    metrics = MetricsLog(output_dir / "metrics.jsonl", writes=main)
    metrics.trim(start)
    evaluator = None
    if t.eval_every_steps:
        from difftrain.training.evaluator import TrainingEvaluator, evaluate_during_training

        evaluator = TrainingEvaluator(run, output_dir, scores=main)
    loss_sum = torch.zeros((), device=accelerator.device)
    losses_since_log, applied_since_log, last_loss = 0, 0, None
    tick, train_start = time.perf_counter(), time.perf_counter()
    last_sample: Optional[Path] = None
    step = start
    since_launch = seconds_since_process_start()
    if since_launch is not None:  # data decoding or cache reuse, models, resume: what a user waits for
        logger.info("first step starts %.1f s after launch", since_launch)
    saved_step = None  # the step of the last checkpoint this process wrote
    with stop.deferred():  # a signal in here stops cleanly after the step under way
        while step < end:
            distributed.fail_if_injected(accelerator.process_index, step + 1)
            loss = train_step(run, step, guard)
            if guard.after_step(step, guard.last_applied) == "rollback":
                step = guard.rollback(step, lambda: load_newest_checkpoint(accelerator, output_dir / "checkpoints",
                                                                           parts.partial_checkpoints),
                                      parts.optimizer, parts.lr_scheduler)
                metrics.trim(step)
                progress.n = step
                loss_sum.zero_()
                losses_since_log, applied_since_log, tick = 0, 0, time.perf_counter()
                continue
            if guard.last_applied:  # a skipped step's loss is not finite and would poison the logged mean
                loss_sum += loss
                applied_since_log += 1
            losses_since_log += 1
            step += 1
            done = step
            status.step = done
            progress.update(1)
            if done % t.log_every_steps == 0 or done == end:
                # The only host sync of the loop: reading the loss at log intervals.
                last_loss = (distributed.global_mean(accelerator, loss_sum) / applied_since_log).item() \
                    if applied_since_log else float("nan")
                now = time.perf_counter()
                images_per_s = losses_since_log * plan.global_batch_size / max(now - tick, 1e-9)
                lr = parts.lr_scheduler.get_last_lr()[0]
                row = {"loss": last_loss, "lr": lr, "images_per_s": images_per_s,
                       "epoch": done * plan.global_batch_size / plan.num_train_images}
                if guard.state.skipped_steps:
                    row["skipped_steps"] = guard.state.skipped_steps
                accelerator.log(row, step=done)
                progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
                metrics.append({"step": done, **row})
                loss_sum.zero_()
                losses_since_log, applied_since_log, tick = 0, 0, now
            maintenance_start = time.perf_counter()
            if plan.sample_every_steps and done % plan.sample_every_steps == 0 and main:
                last_sample = save_samples(run, output_dir, done)
            if t.eval_every_steps and done % t.eval_every_steps == 0:
                if evaluator is not None:
                    evaluate_during_training(run, evaluator, output_dir, metrics, done)
                accelerator.wait_for_everyone()
            # No periodic checkpoint inside a run of skipped steps, so a rollback goes back to before it.
            periodic = plan.checkpoint_every_steps and done % plan.checkpoint_every_steps == 0 and not guard.consecutive
            if periodic or done == end:
                save_training_state(run, output_dir, done, guard.state_dict(), state_bytes)
                saved_step = done
            tick += time.perf_counter() - maintenance_start  # images/s counts training time only
            signum = stop.agreed_signal(accelerator.num_processes, accelerator.device)
            if signum is not None:
                progress.close()
                stop_on_signal(run, output_dir, done, saved_step, guard, state_bytes, signum)
    progress.close()
    if end == plan.max_steps:
        finish_run(run, output_dir, last_sample, last_loss, train_start, num_params)
    return output_dir
