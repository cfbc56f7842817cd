"""The training loop: plan -> build -> resume -> for each step: train_step, then maintenance -> export.

One explicit loop (EDM / nanoGPT style). Maintenance (logging, sample grids, checkpoints) runs between
steps at fixed step intervals and is written as named functions so each can be tested alone.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

import difftrain
from difftrain.config import RunConfig, dump_config
from difftrain.data.transforms import random_hflip, to_model_range
from difftrain.diffusion.loss import denoising_loss, prior_preservation_loss, sample_noise
from difftrain.models.conditioning import drop_captions
from difftrain.processes import launched_rank
from difftrain.sampling.generate import generate_conditioned
from difftrain.sampling.grid import make_grid, save_png_atomic
from difftrain.sampling.schedulers import make_scheduler
from difftrain.training import checkpoint as ckpt
from difftrain.training import distributed
from difftrain.training.data_order import micro_batch_generator, sample_indices, stream_position
from difftrain.training.export import RunSummary, export_pipeline, push_to_hub, write_model_card
from difftrain.training.class_images import ensure_class_images
from difftrain.training.export_latent import export_lora, export_stable_diffusion, write_latent_model_card
from difftrain.training.numerics import NonFiniteGuard
from difftrain.training.precision import resolve_plan_precision
from difftrain.training.resume_check import (check_before_resume, keep_resolved_precision, load_newest_checkpoint,
                                             read_saved_config, trim_metrics)
from difftrain.training.run_dir import RunLock, check_run_dir, claim_run_dir, write_marker
from difftrain.training.setup import RunPlan, Trainables, build_trainables, make_accelerator, plan_run, precheck
from difftrain.training.stop import StopRequested, StopSignals, signal_name
from difftrain.training.vae_train import train_vae, vae_is_complete
from difftrain.writes import atomic_write_text

logger = logging.getLogger(__name__)


# DreamBooth class images get their own shuffled stream, so instance and class batches are independent.
_PRIOR_SEED_OFFSET = 0x9A10


def batch_indices(plan: RunPlan, position: int) -> torch.Tensor:
    """Dataset rows of one micro-batch: batch_size instance/training images, then as many class images."""
    t = plan.cfg.train
    indices = sample_indices(plan.num_train_images, t.seed, position, t.batch_size)
    if plan.num_prior_images:
        prior = sample_indices(plan.num_prior_images, t.seed + _PRIOR_SEED_OFFSET, position, t.batch_size)
        indices = torch.cat([indices, prior + plan.num_train_images])
    return indices


def model_inputs(plan: RunPlan, parts: Trainables, indices: torch.Tensor, generator: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """x0 of a batch: pixels in [-1, 1], or scaled VAE latents."""
    if parts.latents is not None:
        return parts.latents.draw(plan.dataset.images, indices, generator)
    images = plan.dataset.images[indices].to(device, non_blocking=True)
    if plan.cfg.data.random_flip:
        images = random_hflip(images, generator)
    return to_model_range(images)


def batch_files(plan: RunPlan, accelerator: Accelerator, step: int) -> list[str]:
    """Names of the images of loop step `step` on this process (file paths where the source has them)."""
    t = plan.cfg.train
    names = plan.dataset.names
    rows = []
    for micro in range(t.gradient_accumulation_steps):
        position = stream_position(step, micro, accelerator.process_index, t.gradient_accumulation_steps,
                                   accelerator.num_processes, t.batch_size)
        rows += batch_indices(plan, position).tolist()
    return [names[r] if names else f"data set row {r}" for r in rows]


def train_step(plan: RunPlan, parts: Trainables, accelerator: Accelerator, step: int,
               guard: Optional[NonFiniteGuard] = None) -> torch.Tensor:
    """One optimizer step (gradient_accumulation_steps micro-batches); returns the mean loss, on device.

    With a `guard`, a step whose loss or gradient is not finite is not applied (see training/numerics.py).
    """
    cfg, t = plan.cfg, plan.cfg.train
    dataset, device = plan.dataset, accelerator.device
    unet = parts.unet
    trained = [unet]
    if parts.conditioner is not None and parts.conditioner.trainable:
        trained.append(parts.text_encoder)
    for model in trained:
        model.train()
    params = [p for model in trained for p in model.parameters() if p.requires_grad]
    total = torch.zeros((), device=device)
    applied = True
    for micro in range(t.gradient_accumulation_steps):
        position = stream_position(step, micro, accelerator.process_index, t.gradient_accumulation_steps,
                                   accelerator.num_processes, t.batch_size)
        indices = batch_indices(plan, position)
        generator = micro_batch_generator(t.seed, step, micro, accelerator.process_index, accelerator.num_processes,
                                          device)
        x0 = model_inputs(plan, parts, indices, generator, device)
        cond: dict = {}
        caption_ids = None
        if plan.num_classes:
            labels = dataset.labels[indices].to(device)
            if t.condition_dropout > 0:
                drop = torch.rand(labels.shape, generator=generator, device=device) < t.condition_dropout
                labels = torch.where(drop, torch.full_like(labels, plan.num_classes), labels)
            cond["class_labels"] = labels
        elif parts.conditioner is not None:
            caption_ids = drop_captions(plan.text.caption_ids[indices].to(device), parts.conditioner.null_index,
                                        t.condition_dropout, generator)
        noise = sample_noise(x0.shape, generator, device, cfg.diffusion.offset_noise)
        timesteps = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps, (x0.shape[0],),
                                  generator=generator, device=device)
        with accelerator.accumulate(*trained):
            with (guard.autocast() if guard is not None else accelerator.autocast()):
                if caption_ids is not None:
                    cond["encoder_hidden_states"] = parts.conditioner(caption_ids)
                per_example = denoising_loss(
                    lambda x, ts: unet(x, ts, **cond).sample,
                    parts.noise_scheduler, x0, noise, timesteps, cfg.diffusion.snr_gamma,
                )
            if plan.num_prior_images:
                loss = prior_preservation_loss(per_example, t.prior_loss_weight)
            else:
                loss = per_example.mean()
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


class _EmaWeights:
    """Context manager: the unwrapped UNet carries the EMA weights inside the block."""

    def __init__(self, parts: Trainables, accelerator: Accelerator):
        self.unet = accelerator.unwrap_model(parts.unet)
        self.ema = parts.ema
        self.params = parts.ema_parameters(accelerator)

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        self.unet.eval()
        return self.unet

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)
        self.unet.train()


def preview_grid(plan: RunPlan, parts: Trainables, unet, noise_config) -> tuple[torch.Tensor, int, Optional[list[str]]]:
    """Samples from fixed seeds: one row per class (conditional) or a square grid."""
    s = plan.cfg.sample
    text = plan.text is not None
    labels = prompts = names = None
    if text:
        names = list(s.prompts) or plan.text.vocab[:-1][:10]
        prompts = [p for p in names for _ in range(s.images_per_class)]
        count, per_row = len(prompts), s.images_per_class
    elif plan.num_classes:
        classes = list(range(min(plan.num_classes, 16)))
        labels = [c for c in classes for _ in range(s.images_per_class)]
        names = [plan.dataset.class_names[c] for c in classes]
        count, per_row = len(labels), s.images_per_class
    else:
        count = s.num_images
        per_row = max(1, int(round(count ** 0.5)))
    images = generate_conditioned(
        unet, make_scheduler(s.scheduler, noise_config), [s.seed + i for i in range(count)],
        num_inference_steps=s.num_inference_steps, labels=labels, prompts=prompts,
        tokenizer=plan.text.tokenizer if text else None, text_encoder=parts.text_encoder if text else None,
        vae=parts.latents.vae if text and parts.latents else None, negative_prompt=s.negative_prompt,
        guidance_scale=s.guidance_scale, batch_size=s.batch_size)
    return images, per_row, names


def save_samples(plan: RunPlan, parts: Trainables, accelerator: Accelerator, output_dir: Path, step: int) -> Path:
    with _EmaWeights(parts, accelerator) as unet, torch.no_grad():
        images, ncols, row_labels = preview_grid(plan, parts, unet, parts.noise_scheduler.config)
    grid = make_grid(images, ncols, row_labels=row_labels)
    path = output_dir / "samples" / f"step-{step:06d}.png"
    save_png_atomic(grid, path)
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    if hasattr(tracker, "add_image"):
        import numpy as np

        tracker.add_image("samples", np.asarray(grid), global_step=step, dataformats="HWC")
    return path


def save_training_state(plan: RunPlan, accelerator: Accelerator, output_dir: Path, step: int,
                        numerics: Optional[dict] = None, state_bytes: int = 0) -> None:
    """Write checkpoints/step-N atomically, after checking there is room for it.

    Args:
        numerics: the non-finite policy's state (remedies taken), restored on resume.
        state_bytes: size estimate of the first checkpoint (model, optimizer, EMA); later ones use the previous size.
    """
    progress = {
        "step": step,
        "images_seen": step * plan.global_batch_size,
        "epoch": step * plan.global_batch_size / plan.num_train_images,
        "num_processes": accelerator.num_processes,
        "difftrain_version": difftrain.__version__,
        "config": plan.cfg.to_dict(),
        "numerics": numerics or {},
    }
    checkpoints_dir = output_dir / "checkpoints"
    needed = ckpt.estimate_checkpoint_bytes(checkpoints_dir, state_bytes) if accelerator.is_main_process else 0
    distributed.save_checkpoint(accelerator, checkpoints_dir, step, progress, needed,
                                plan.cfg.train.checkpoints_total_limit)


def resume(accelerator: Accelerator, output_dir: Path, partial: bool = False,
           guard: Optional[NonFiniteGuard] = None,
           lr_scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None) -> int:
    """Load the newest checkpoint that reads back whole (older ones if it does not); returns the step to continue from.

    Args:
        partial: checkpoints hold only trained parameters (LoRA); the frozen base comes from the base model.
        guard: receives the non-finite policy's state saved with the checkpoint.
        lr_scheduler: moved to the current process count when the checkpoint was written by another.
    """
    checkpoints_dir = output_dir / "checkpoints"
    if accelerator.is_main_process:
        ckpt.remove_stale_temporaries(checkpoints_dir)
    accelerator.wait_for_everyone()
    _, latest = load_newest_checkpoint(accelerator, checkpoints_dir, partial)
    if latest is None:
        return 0
    progress = ckpt.read_progress(latest)
    step = int(progress["step"])
    if guard is not None:
        guard.load_state(progress.get("numerics"))
    distributed.note_process_count(progress, accelerator, lr_scheduler)
    logger.info("resumed from %s (step %d)", latest, step)
    return step


def _evaluate(plan: RunPlan, parts: Trainables, accelerator: Accelerator, evaluator, output_dir: Path,
              step: int) -> None:
    """Score EMA samples, log them, and keep the best export when they beat it."""
    start = time.perf_counter()
    with _EmaWeights(parts, accelerator) as unet:
        report = evaluator.evaluate(plan, parts, unet)  # every rank samples a share; the main one scores
        if report is None:
            return
        numbers = {k: v for k, v in report.items() if isinstance(v, float)}
        accelerator.get_tracker("tensorboard", unwrap=False).log({f"eval/{k}": v for k, v in numbers.items()}, step=step)
        with open(output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "eval": report}) + "\n")
        logger.info("eval at step %d (%.0f s): %s", step, time.perf_counter() - start,
                    ", ".join(f"{k} {v:.4f}" for k, v in numbers.items()))
        if evaluator.improves(report):
            _export(plan, parts, accelerator, unet, evaluator.best_dir)
            evaluator.record_best(report, step)


def _export(plan: RunPlan, parts: Trainables, accelerator: Accelerator, unet, output_dir: Path) -> None:
    cfg = plan.cfg
    text_encoder = accelerator.unwrap_model(parts.text_encoder) if parts.text_encoder is not None else None
    if plan.base is not None and cfg.model.finetune == "lora":
        lora_text = text_encoder if cfg.lora.train_text_encoder else None
        path = export_lora(unet, lora_text, cfg, plan.base, output_dir)
        logger.info("LoRA weights: %s (load with pipe.load_lora_weights(%r))", path, str(output_dir))
    elif plan.latent:
        export_stable_diffusion(unet, parts.latents.vae, text_encoder, plan.text.tokenizer, parts.noise_scheduler,
                                cfg, output_dir)
    else:
        text = (text_encoder, plan.text.tokenizer) if plan.text is not None else None
        export_pipeline(unet, parts.noise_scheduler, cfg, plan.dataset.class_names, output_dir, text)


def _add_file_logging(output_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(output_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("difftrain").addHandler(handler)
    return handler


def train(cfg: RunConfig, stop_at_step: Optional[int] = None) -> Path:
    """Train (or resume) the run described by `cfg`; returns the output directory.

    Raises StopRequested after a clean stop on SIGTERM/Ctrl-C (see training/stop.py).

    Args:
        stop_at_step: stop after this step without exporting, as if interrupted (used by resume tests).
    """
    output_dir = Path(cfg.output_dir)
    run_lock: Optional[RunLock] = None
    if launched_rank() == 0:
        # Before anything is read or written: refuse a folder that is not difftrain's. A folder that exists is
        # locked now, so a second trainer exits within seconds instead of after decoding the data; a new one
        # is created (and locked) only once the config and data have been checked.
        check_run_dir(output_dir)
        if output_dir.is_dir():
            run_lock = claim_run_dir(output_dir)
    handler = None
    accelerator = None
    try:
        with StopSignals() as stop:
            saved = read_saved_config(output_dir)
            cfg = keep_resolved_precision(cfg, output_dir, saved)
            accelerator = make_accelerator(cfg, output_dir)  # writes nothing until trackers start
            # Refuses unsafe changes before anything is decoded or written.
            changes = check_before_resume(cfg, output_dir, saved)
            if cfg.train.prior_preservation:
                # Class images must exist before the data is planned; check everything cheap first.
                precheck(cfg)
                handler, run_lock = _start_output_dir(accelerator, output_dir, run_lock)
                ensure_class_images(cfg, accelerator.device, accelerator.process_index, accelerator.num_processes,
                                    accelerator.wait_for_everyone)
                accelerator.wait_for_everyone()
            plan = plan_run(cfg, world_size=accelerator.num_processes)
            if handler is None:
                handler, run_lock = _start_output_dir(accelerator, output_dir, run_lock)
                plan.dataset.write_skipped_to(handler)  # decoded before train.log existed
            if plan.latent and plan.vae is None:
                plan.vae = _from_scratch_vae(plan, accelerator, output_dir)
            for key, old, new in changes:
                logger.info("config change on resume: %s: %r -> %r", key, old, new)
            if cfg.train.mixed_precision == "auto":
                plan, accelerator = resolve_plan_precision(plan, accelerator,
                                                           lambda c: make_accelerator(c, output_dir))
            return _train(plan, accelerator, output_dir, stop_at_step, stop)
    except StopRequested as exc:
        if not exc.logged:
            logger.warning("%s before training completed; nothing was left half-written, and the same command "
                           "resumes from the last complete checkpoint", exc)
        raise
    finally:
        if accelerator is not None:
            accelerator.end_training()
        if handler is not None:
            logging.getLogger("difftrain").removeHandler(handler)
            handler.close()
        if run_lock is not None:
            run_lock.release()


def _start_output_dir(accelerator: Accelerator, output_dir: Path, run_lock: Optional[RunLock],
                      ) -> tuple[Optional[logging.Handler], Optional[RunLock]]:
    """Create and lock the run folder on the main process (unless locked already); start train.log there."""
    if accelerator.is_main_process and run_lock is None:
        run_lock = claim_run_dir(output_dir)
    accelerator.wait_for_everyone()
    handler = _add_file_logging(output_dir) if accelerator.is_main_process else None
    return handler, run_lock


def _from_scratch_vae(plan: RunPlan, accelerator: Accelerator, output_dir: Path):
    """The first stage of a latent run without a pretrained VAE: train it, or reuse the one already saved."""
    from diffusers import AutoencoderKL

    vae_dir = output_dir / "vae"
    if not vae_is_complete(vae_dir):
        if accelerator.is_main_process:
            train_vae(plan.cfg, plan.dataset.images, output_dir, accelerator.device)
        accelerator.wait_for_everyone()
    else:
        logger.info("using the VAE this run trained before (%s)", vae_dir)
    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    return vae.requires_grad_(False).eval()


def _stop_on_signal(plan: RunPlan, accelerator: Accelerator, output_dir: Path, done: int, saved_step: Optional[int],
                    guard: NonFiniteGuard, state_bytes: int, signum: int) -> None:
    """After a step, on SIGTERM/Ctrl-C: checkpoint that step (unless told not to) and raise StopRequested."""
    name = signal_name(signum)
    if plan.cfg.train.checkpoint_on_signal:
        if saved_step != done:
            save_training_state(plan, accelerator, output_dir, done, guard.state_dict(), state_bytes)
        kept = f"checkpoint {ckpt.checkpoint_name(done)} holds every step so far"
    else:
        kept = "no checkpoint written (train.checkpoint_on_signal is false): the last periodic one is kept"
    message = (f"stopped by {name} after step {done} of {plan.max_steps}: {kept}; "
               f"the same command resumes (exit code {128 + signum})")
    logger.warning("%s", message)
    raise StopRequested(signum, message, logged=True)


def _train(plan: RunPlan, accelerator: Accelerator, output_dir: Path, stop_at_step: Optional[int],
           stop: StopSignals) -> Path:
    cfg, t = plan.cfg, plan.cfg.train
    parts = build_trainables(plan, accelerator)
    if accelerator.is_main_process:
        # Room for the first checkpoint and the export, before the first write: a run that cannot checkpoint
        # fails now, not after the steps it would lose.
        ckpt.ensure_room_for_run(output_dir, [m for m in (parts.unet, parts.text_encoder) if m is not None])
        atomic_write_text(output_dir / "config.yaml", dump_config(cfg), "the run's config")
        write_marker(output_dir, cfg.to_dict())
    accelerator.init_trackers("tensorboard")
    trained_models = [parts.unet] + ([parts.text_encoder] if parts.conditioner is not None and parts.conditioner.trainable else [])
    guard = NonFiniteGuard(t, accelerator, trained_models, lambda step: batch_files(plan, accelerator, step))
    start = resume(accelerator, output_dir, parts.partial_checkpoints, guard, parts.lr_scheduler)
    logger.info("%s", guard.describe())
    num_params = sum(p.numel() for p in accelerator.unwrap_model(parts.unet).parameters())
    num_trained = sum(p.numel() for p in parts.ema_parameters(accelerator))
    state_bytes = ckpt.training_state_bytes(trained_models)
    logger.info(
        "data: %s, %d images (%d skipped); model: %.2fM parameters (%.2fM trained); global batch %d (%d x %d accumulation x %d processes); "
        "%d steps (%.1f epochs) from step %d; device %s, mixed precision %s",
        plan.dataset.description, len(plan.dataset), len(plan.dataset.skipped), num_params / 1e6, num_trained / 1e6,
        plan.global_batch_size, t.batch_size, t.gradient_accumulation_steps, accelerator.num_processes,
        plan.max_steps, plan.max_steps / plan.steps_per_epoch, start, accelerator.device, t.mixed_precision,
    )
    end = plan.max_steps if stop_at_step is None else min(plan.max_steps, stop_at_step)
    progress = tqdm(total=plan.max_steps, initial=start, desc="train", disable=not accelerator.is_main_process,
                    dynamic_ncols=True, mininterval=1.0)
    loss_sum = torch.zeros((), device=accelerator.device)
    losses_since_log, applied_since_log, last_loss = 0, 0, None
    metrics_path = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        trim_metrics(metrics_path, start)
    evaluator = None
    if t.eval_every_steps:
        from difftrain.training.evaluator import TrainingEvaluator

        evaluator = TrainingEvaluator(plan, output_dir, accelerator.device, scores=accelerator.is_main_process)
    tick, train_start = time.perf_counter(), time.perf_counter()
    last_sample: Optional[Path] = None
    step = start
    saved_step = None  # the step of the last checkpoint this process wrote
    with stop.deferred():  # a signal in here stops cleanly after the step under way
        while step < end:
            distributed.fail_if_injected(accelerator.process_index, step + 1)
            loss = train_step(plan, parts, accelerator, step, guard)
            if guard.after_step(step, guard.last_applied) == "rollback":
                step = guard.rollback(step, lambda: load_newest_checkpoint(accelerator, output_dir / "checkpoints",
                                                                           parts.partial_checkpoints),
                                      parts.optimizer, parts.lr_scheduler)
                if accelerator.is_main_process:
                    trim_metrics(metrics_path, step)
                progress.n = step
                loss_sum.zero_()
                losses_since_log, applied_since_log, tick = 0, 0, time.perf_counter()
                continue
            if guard.last_applied:  # a skipped step's loss is not finite and would poison the logged mean
                loss_sum += loss
                applied_since_log += 1
            losses_since_log += 1
            done = step + 1
            step += 1
            progress.update(1)
            if done % t.log_every_steps == 0 or done == end:
                # The only host sync of the loop: reading the loss at log intervals.
                last_loss = (distributed.global_mean(accelerator, loss_sum) / applied_since_log).item() \
                    if applied_since_log else float("nan")
                now = time.perf_counter()
                images_per_s = losses_since_log * plan.global_batch_size / max(now - tick, 1e-9)
                lr = parts.lr_scheduler.get_last_lr()[0]
                metrics = {"loss": last_loss, "lr": lr, "images_per_s": images_per_s,
                           "epoch": done * plan.global_batch_size / plan.num_train_images}
                if guard.state.skipped_steps:
                    metrics["skipped_steps"] = guard.state.skipped_steps
                accelerator.log(metrics, step=done)
                progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
                if accelerator.is_main_process:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": done, **metrics}) + "\n")
                loss_sum.zero_()
                losses_since_log, applied_since_log, tick = 0, 0, now
            maintenance_start = time.perf_counter()
            if plan.sample_every_steps and done % plan.sample_every_steps == 0 and accelerator.is_main_process:
                last_sample = save_samples(plan, parts, accelerator, output_dir, done)
            if t.eval_every_steps and done % t.eval_every_steps == 0:
                if evaluator is not None:
                    _evaluate(plan, parts, accelerator, evaluator, output_dir, done)
                accelerator.wait_for_everyone()
            # No periodic checkpoint inside a run of skipped steps, so a rollback goes back to before it.
            periodic = plan.checkpoint_every_steps and done % plan.checkpoint_every_steps == 0 and not guard.consecutive
            if periodic or done == end:
                save_training_state(plan, accelerator, output_dir, done, guard.state_dict(), state_bytes)
                saved_step = done
            tick += time.perf_counter() - maintenance_start  # images/s counts training time only
            signum = stop.agreed_signal(accelerator.num_processes, accelerator.device)
            if signum is not None:
                progress.close()
                _stop_on_signal(plan, accelerator, output_dir, done, saved_step, guard, state_bytes, signum)
    progress.close()
    if end < plan.max_steps:
        return output_dir
    if accelerator.is_main_process:
        if last_sample is None or last_sample.name != f"step-{plan.max_steps:06d}.png":
            last_sample = save_samples(plan, parts, accelerator, output_dir, plan.max_steps)
        with _EmaWeights(parts, accelerator) as unet:
            _export(plan, parts, accelerator, unet, output_dir)
        summary = RunSummary(
            data_description=plan.dataset.description, num_images=len(plan.dataset),
            num_skipped=len(plan.dataset.skipped), steps=plan.max_steps,
            images_seen=plan.max_steps * plan.global_batch_size,
            epochs=plan.max_steps * plan.global_batch_size / plan.num_train_images, num_parameters=num_params,
            train_seconds=time.perf_counter() - train_start, final_loss=last_loss,
            sample_grid=str(last_sample.relative_to(output_dir)),
        )
        if plan.latent:
            write_latent_model_card(cfg, summary, output_dir, plan.base)
        else:
            write_model_card(cfg, summary, plan.dataset.class_names, output_dir)
        logger.info("exported pipeline to %s; samples: %s", output_dir, last_sample)
        from difftrain.training.plots import write_plots

        plots = write_plots(metrics_path, output_dir / "plots")
        logger.info("plots: %s", ", ".join(str(p) for p in plots))
    accelerator.wait_for_everyone()
    if t.push_to_hub and accelerator.is_main_process:
        url = push_to_hub(output_dir, t.hub_model_id, t.hub_private)
        logger.info("pushed to %s", url)
    return output_dir
