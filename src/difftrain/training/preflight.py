"""`difftrain check`: validate a config, scan its data, and time one real training step, writing nothing.

The step runs the training code itself (`plan_run`, `build_trainables`, `train_step`) in a temporary
directory, so a shape error, an out-of-memory batch or a broken text encoder shows up here rather than
minutes into a run.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

from difftrain.config import RunConfig
from difftrain.data.check import Finding, ScanReport, scan_data
from difftrain.training.memory import PeakMemory, measure_peak

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepReport:
    seconds: float
    images_per_s: float
    memory: PeakMemory
    """The timed step's peak memory (training/memory.py)."""
    loss: float
    device: str
    loader_images_per_s: float = 0.0
    """What the data loader alone hands out (this process's micro-batches)."""
    loader_workers: int = 0


def measure_step(cfg: RunConfig) -> StepReport:
    """Build the run in a temporary directory, as training does, and time one optimizer step after a warm-up step."""
    from difftrain.families import family_for
    from difftrain.processes import process_state
    from difftrain.training.precision import resolve_mixed_precision
    from difftrain.training.setup import TrainingRun, build_objective, build_trainables, make_accelerator, plan_run
    from difftrain.training.resume_check import read_saved_config

    saved = read_saved_config(Path(cfg.output_dir))  # a run being resumed keeps its precision
    with tempfile.TemporaryDirectory(prefix="difftrain-check-") as tmp:
        cfg = dataclasses.replace(cfg, output_dir=tmp)
        processes = process_state()
        family = family_for(cfg)
        data_logger = logging.getLogger("difftrain.data")
        level = data_logger.level
        data_logger.setLevel(logging.ERROR)  # the scan already reported every skipped file
        try:
            family.check_files()
            plan = plan_run(cfg, family, world_size=processes.num_processes)
        finally:
            data_logger.setLevel(level)
        cfg = resolve_mixed_precision(cfg, family, processes, saved)  # time the precision the run would use
        plan = dataclasses.replace(plan, cfg=cfg)
        accelerator = make_accelerator(cfg, Path(tmp))
        try:
            parts = build_trainables(cfg, family, plan.max_steps, accelerator)
            run = TrainingRun(plan, family, build_objective(cfg, family), accelerator, parts)
            try:
                report = _time_steps(run, accelerator)
            finally:
                run.close()
            return report
        finally:
            accelerator.end_training()


def _time_steps(run, accelerator) -> StepReport:
    """One warm-up step, one timed step, then the loader alone over the next micro-batches."""
    from difftrain.training.step import train_step

    train_step(run, 0).item()  # warm-up: allocator, kernels, lazy init, the loader's workers

    def timed_step() -> tuple[float, float]:
        start = time.perf_counter()
        loss = train_step(run, 1).item()  # .item() waits for the device
        return loss, time.perf_counter() - start

    memory = measure_peak(timed_step, accelerator.device)
    loss, seconds = memory.result
    memory.result = None
    global_batch = run.plan.global_batch_size
    return StepReport(seconds, global_batch / max(seconds, 1e-9), memory, loss, str(accelerator.device),
                      *_loader_throughput(run))


LOADER_TIMED_SECONDS = 2.0


def _loader_throughput(run) -> tuple[float, int]:
    """(images/s the loader hands out, its worker count): the micro-batches after the two timed steps, read as
    fast as the loader gives them for about LOADER_TIMED_SECONDS (its workers start reading at the first)."""
    t = run.cfg.train
    slot = 2 * t.gradient_accumulation_steps
    end = run.loader.end_slot
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < LOADER_TIMED_SECONDS and slot < end:
        images += int(run.loader.get(slot).images.shape[0])
        slot += 1
    seconds = time.perf_counter() - start
    return images / max(seconds, 1e-9), run.loader.workers


WARNINGS_PER_KIND = 20


def run_check(cfg: RunConfig, with_step: bool = True, show_all: bool = False, out=print) -> int:
    """The whole check; prints the findings and returns the exit status (1 when there are errors).

    Args:
        show_all: list every warning; by default each kind of warning is listed 20 times, then counted.
    """
    from difftrain.training.resume_check import check_before_resume
    from difftrain.training.run_dir import RunDirError, check_run_dir

    from difftrain.config import ConfigError
    from difftrain.training.setup import check_mixed_precision

    out("config: valid")
    findings: list[Finding] = []
    try:
        check_mixed_precision(cfg)  # what this machine cannot run (fp16 or 8-bit AdamW without CUDA), as train refuses it
    except ConfigError as exc:
        findings.extend(Finding("config", "error", "not runnable on this machine", problem) for problem in exc.problems)
        with_step = False
    try:
        check_run_dir(Path(cfg.output_dir))
    except RunDirError as exc:
        findings.append(Finding(cfg.output_dir, "error", "output folder refused", str(exc)))
    try:
        changes = check_before_resume(cfg, Path(cfg.output_dir))
        for key, old, new in changes:
            out(f"resume: {cfg.output_dir} would resume with {key}: {old!r} -> {new!r} (allowed)")
    except ValueError as exc:
        findings.append(Finding(cfg.output_dir, "error", "resume refused", str(exc)))
    from difftrain.families import family_for
    from difftrain.families.latent_space import VAENotTrainedYet

    family = family_for(cfg)
    keep_labels, want_captions = family.data_wants()
    try:
        data_cfg = family.data_config()  # data.buckets resolved against the network (its configs only)
    except ValueError as exc:
        out(f"ERROR   data.buckets: {exc}")
        out("check: FAILED (1 error(s))")
        return 1
    if cfg.data.instance_dir is not None:  # DreamBooth: the instance images, all captioned by instance_prompt
        data_cfg = dataclasses.replace(data_cfg, path=cfg.data.instance_dir, source="folder", max_images=None)
        keep_labels = want_captions = False
    report: ScanReport = scan_data(data_cfg, want_labels=keep_labels, want_captions=want_captions)
    for line in report.bucket_lines():
        out(line)
    findings = report.findings + findings
    shown: dict[str, int] = {}
    for finding in findings:
        # Every error is listed; a warning shared by a whole data set (MNIST's 28 px at 32) would drown them.
        if finding.level == "warning" and not show_all:
            shown[finding.kind] = shown.get(finding.kind, 0) + 1
            if shown[finding.kind] > WARNINGS_PER_KIND:
                continue
        out(str(finding))
    for kind, count in shown.items():
        if count > WARNINGS_PER_KIND:
            out(f"WARNING ... {count - WARNINGS_PER_KIND} more '{kind}' warning(s) not listed (--all lists them)")
    out(f"data: {report.summary()}")
    errors = [f for f in findings if f.level == "error"]
    if with_step and report.usable:
        try:
            step = measure_step(cfg)
            out(f"step: one optimizer step of {step.images_per_s * step.seconds:.0f} images in {step.seconds:.3f} s "
                f"on {step.device} = {step.images_per_s:.1f} images/s; {step.memory.describe()}; loss {step.loss:.4f}")
            where = f"{step.loader_workers} worker process(es)" if step.loader_workers else "the training process"
            out(f"loader: {step.loader_images_per_s:.0f} images/s gathered by {where}, against the step's "
                f"{step.images_per_s:.1f} images/s (data.loader_workers)")
        except VAENotTrainedYet as exc:
            out(f"step: not timed: {exc}")
        except Exception as exc:  # noqa: BLE001 - any failure of the step is the finding itself
            errors.append(Finding("step", "error", "training step failed", f"{type(exc).__name__}: {exc}"))
            out(str(errors[-1]))
    out(f"check: {'FAILED' if errors else 'OK'} ({len(errors)} error(s), "
        f"{len([f for f in findings if f.level == 'warning'])} warning(s))")
    return 1 if errors else 0

