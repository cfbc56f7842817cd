"""`difftrain check`: validate a config, scan its data, and time one real training step, writing nothing.

The step runs the training code itself (`plan_run`, `build_trainables`, `train_step`) in a temporary
directory, so a shape error, an out-of-memory batch or a broken text encoder shows up here rather than
minutes into a run.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from difftrain.config import RunConfig
from difftrain.data.check import Finding, ScanReport, scan_data

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepReport:
    seconds: float
    images_per_s: float
    peak_memory_bytes: int
    memory_kind: str
    loss: float
    device: str


def measure_step(cfg: RunConfig) -> StepReport:
    """Build the run in a temporary directory, as training does, and time one optimizer step after a warm-up step."""
    from difftrain.families import family_for
    from difftrain.processes import process_state
    from difftrain.training.precision import resolve_mixed_precision
    from difftrain.training.setup import TrainingRun, build_objective, build_trainables, make_accelerator, plan_run
    from difftrain.training.step import train_step

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
            cuda = accelerator.device.type == "cuda"
            train_step(run, 0).item()  # warm-up: allocator, kernels, lazy init
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            loss = train_step(run, 1).item()  # .item() waits for the device
            seconds = time.perf_counter() - start
            if cuda:
                peak, kind = torch.cuda.max_memory_allocated(), "GPU memory allocated"
            else:
                # ru_maxrss is KiB on Linux and bytes on macOS; it is the whole process's high-water mark.
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                peak, kind = rss if sys.platform == "darwin" else rss * 1024, "process resident memory"
            return StepReport(seconds, plan.global_batch_size / max(seconds, 1e-9), int(peak), kind, loss,
                              str(accelerator.device))
        finally:
            accelerator.end_training()


WARNINGS_PER_KIND = 20


def run_check(cfg: RunConfig, with_step: bool = True, show_all: bool = False, out=print) -> int:
    """The whole check; prints the findings and returns the exit status (1 when there are errors).

    Args:
        show_all: list every warning; by default each kind of warning is listed 20 times, then counted.
    """
    from difftrain.training.resume_check import check_before_resume
    from difftrain.training.run_dir import RunDirError, check_run_dir

    out("config: valid")
    findings: list[Finding] = []
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

    keep_labels, want_captions = family_for(cfg).data_wants()
    data_cfg = cfg.data
    if cfg.data.instance_dir is not None:  # DreamBooth: the instance images, all captioned by instance_prompt
        data_cfg = dataclasses.replace(cfg.data, path=cfg.data.instance_dir, source="folder", max_images=None)
        keep_labels = want_captions = False
    report: ScanReport = scan_data(data_cfg, want_labels=keep_labels, want_captions=want_captions)
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
                f"on {step.device} = {step.images_per_s:.1f} images/s; peak {step.memory_kind} "
                f"{step.peak_memory_bytes / 2**20:.1f} MiB; loss {step.loss:.4f}")
        except Exception as exc:  # noqa: BLE001 - any failure of the step is the finding itself
            errors.append(Finding("step", "error", "training step failed", f"{type(exc).__name__}: {exc}"))
            out(str(errors[-1]))
    out(f"check: {'FAILED' if errors else 'OK'} ({len(errors)} error(s), "
        f"{len([f for f in findings if f.level == 'warning'])} warning(s))")
    return 1 if errors else 0

