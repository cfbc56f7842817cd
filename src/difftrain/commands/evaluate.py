"""`difftrain evaluate`: sample from an exported run and score the samples against reference data."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from difftrain.config import ConfigError, RunConfig, config_from_dict
from difftrain.families import family_for
from difftrain.evaluation.evaluate import (
    ReferenceSet,
    format_table,
    prepare_reference,
    score_samples,
)
from difftrain.pipeline import load_pipeline, scheduler_for
from difftrain.processes import (generate_sharded, launched_world_size, leave_process_group, process_state,
                                 quiet_other_ranks)
from difftrain.sampling.args import count_problem, raise_problems, scale_problem
from difftrain.sampling.generate import ImageSampler
from difftrain.writes import atomic_write_text, check_file_writable

logger = logging.getLogger(__name__)

# A JSON report with per-class accuracies of up to a few thousand classes stays well under this.
_REPORT_BYTES = 1 << 20


def load_run_config(run_dir: Path) -> RunConfig:
    """The config.yaml a finished run saved, validated."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no config.yaml; evaluate needs a finished difftrain run")
    try:
        return config_from_dict(yaml.safe_load(config_path.read_text()) or {})
    except (ConfigError, yaml.YAMLError) as exc:
        raise ValueError(f"{config_path}: {exc}") from exc


def run_reference(cfg: RunConfig, reference: Optional[str] = None, reference_split: Optional[str] = None,
                  num_reference: int = 2000, use_inception: bool = True, device: str = "cpu") -> ReferenceSet:
    """The reference set of a run: its own training data unless `reference` names other data."""
    path = reference or cfg.data.instance_dir or cfg.data.path
    data = dataclasses.replace(cfg.data, path=path, split=reference_split or cfg.data.split, max_images=None,
                               source="auto" if reference else cfg.data.source)
    return prepare_reference(data, num_reference, cfg.uses_labels, use_inception=use_inception, device=device)


def evaluate_run(
    run_dir: Path,
    *,
    reference: Optional[str] = None,
    reference_split: Optional[str] = None,
    num_samples: int = 500,
    num_reference: int = 2000,
    scheduler: Optional[str] = None,
    num_inference_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    seed: int = 0,
    batch_size: int = 64,
    device: Optional[str] = None,
    use_inception: bool = True,
    out: Optional[Path] = None,
) -> dict:
    """Generate `num_samples` images, score them, write the JSON report; returns it.

    Under a launcher (`torchrun`, `accelerate launch`) every process samples its share of the seeds and
    the main process scores them and writes the report; the others return an empty dict.
    """
    # Arguments first, before the run or any model loads; None means the run's default, never 0.
    raise_problems(count_problem("--num-samples", num_samples, minimum=2),
                   count_problem("--num-reference", num_reference, minimum=2),
                   count_problem("--num-inference-steps", num_inference_steps),
                   count_problem("--batch-size", batch_size), scale_problem("--guidance-scale", guidance_scale))
    cfg = load_run_config(run_dir)
    start = time.perf_counter()
    state = process_state() if launched_world_size() > 1 else None
    main = state is None or state.is_main_process
    if state is not None:
        quiet_other_ranks(state)
    out = out or run_dir / "evaluation.json"
    if main:  # before the reference set and the samples, which take minutes
        check_file_writable(out, _REPORT_BYTES, "the evaluation report")
    if device is None:
        device = str(state.device) if state is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    # One process prepares (and caches) the reference set; the others only need its class names.
    ref = run_reference(cfg, reference, reference_split, num_reference, use_inception=use_inception,
                        device=device) if main else None
    class_names = ref.class_names if ref is not None else None
    if state is not None:
        from accelerate.utils import broadcast_object_list

        class_names = broadcast_object_list([class_names])[0]

    pipe = load_pipeline(run_dir, device=device)
    sched = scheduler_for(pipe, scheduler or cfg.sample.scheduler)
    steps = num_inference_steps if num_inference_steps is not None else cfg.sample.num_inference_steps
    guidance = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
    sampler = ImageSampler.from_pipeline(pipe)
    labels, prompts = family_for(cfg).evaluation_conditions(class_names, num_samples)
    logger.info("sampling %d images (%s, %d steps, guidance %.2f) on %s", num_samples, type(sched).__name__, steps,
                guidance, device)

    def make(indices: list[int]) -> torch.Tensor:
        return sampler.generate(sched, [seed + i for i in indices], num_inference_steps=steps,
                                labels=[labels[i] for i in indices] if labels is not None else None,
                                prompts=[prompts[i] for i in indices] if prompts is not None else None,
                                guidance_scale=guidance, batch_size=batch_size, device=device)

    samples = generate_sharded(make, num_samples)
    if state is not None:  # the last collective: the main process scores alone
        leave_process_group(state)
    if not main:
        return {}
    report = {
        "run": str(run_dir), "reference": ref.description, "scheduler": type(sched).__name__,
        "num_inference_steps": steps, "guidance_scale": guidance, "seed": seed,
    }
    report.update(score_samples(ref, samples, labels))  # main process alone: metrics.py does not sync ranks
    report["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n", "the evaluation report")
    print(format_table(report))
    return report
