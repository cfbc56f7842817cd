"""Sample-quality evaluation during training (`train.eval_every_steps`) and the best-export bookkeeping
(`train.keep_best_by`). The reference set (features, classifier) is prepared once per run."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from difftrain.data.dataset import ImageDataset
from difftrain.evaluation.evaluate import (held_out_test_split, reference_from_dataset, sample_into_memory,
                                           score_samples)
from difftrain.processes import generate_sharded
from difftrain.training.previews import EmaWeights
from difftrain.training.run_files import MetricsLog
from difftrain.training.setup import TrainingRun
from difftrain.writes import atomic_write_text

logger = logging.getLogger(__name__)

# Evaluation seeds are disjoint from preview-grid seeds, and the same at every evaluation.
_EVAL_SEED_OFFSET = 1_000_000
HIGHER_IS_BETTER = {"accuracy"}


class TrainingEvaluator:
    """Every rank samples its share of the evaluation seeds; the main process (`scores=True`) scores them.

    Only the scoring process builds the reference set, so its caches have one writer.
    """

    def __init__(self, run: TrainingRun, output_dir: Path, scores: bool = True):
        cfg, t, dataset = run.cfg, run.cfg.train, run.plan.dataset
        self.cfg = cfg
        if not isinstance(dataset, ImageDataset):  # streamed: a sample of it in RAM (reference and classifier data)
            dataset = sample_into_memory(dataset, t.eval_num_reference)
        labelled = dataset.labels is not None
        test = held_out_test_split(cfg.data, True) if labelled and cfg.data.instance_dir is None else None
        self.ref = None
        if scores:
            self.ref = reference_from_dataset(dataset, t.eval_num_reference, t.eval_inception, labelled,
                                              run.accelerator.device, test)
        self.best_dir = output_dir / "best"

    @torch.no_grad()
    def evaluate(self, run: TrainingRun, network: torch.nn.Module) -> Optional[dict]:
        """Sample (sharded over the processes; every rank must call this) and score; None on non-scoring ranks."""
        s, n = self.cfg.sample, self.cfg.train.eval_num_samples
        # The reference set is built from the training data, so its class names are the data set's on every rank.
        class_names = self.ref.class_names if self.ref is not None else list(run.plan.dataset.class_names or [])
        labels, prompts = run.family.evaluation_conditions(class_names, n)
        scheduler = run.objective.inference_scheduler(s.scheduler)
        sampler = run.family.sampler(network)

        def make(indices: list[int]) -> torch.Tensor:
            return sampler.generate(
                scheduler, [s.seed + _EVAL_SEED_OFFSET + i for i in indices],
                num_inference_steps=s.num_inference_steps,
                labels=[labels[i] for i in indices] if labels is not None else None,
                prompts=[prompts[i] for i in indices] if prompts is not None else None,
                guidance_scale=s.guidance_scale, batch_size=s.batch_size)

        samples = generate_sharded(make, n)
        if self.ref is None:
            return None
        report = score_samples(self.ref, samples, labels)  # this process alone: metrics.py does not sync ranks
        report.pop("per_class_accuracy", None)
        return report

    def best(self) -> Optional[dict]:
        path = self.best_dir / "best.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def improves(self, report: dict) -> bool:
        key = self.cfg.train.keep_best_by
        if key is None or key not in report:
            return False
        previous = self.best()
        if previous is None:
            return True
        old = previous["metrics"][key]
        return report[key] > old if key in HIGHER_IS_BETTER else report[key] < old

    def record_best(self, report: dict, step: int) -> None:
        path = self.best_dir / "best.json"
        atomic_write_text(path, json.dumps({"step": step, "keep_best_by": self.cfg.train.keep_best_by,
                                            "metrics": report}, indent=2) + "\n", "the best-export record")
        logger.info("best so far by %s at step %d: %s -> %s", self.cfg.train.keep_best_by, step,
                    report[self.cfg.train.keep_best_by], self.best_dir)


def evaluate_during_training(run: TrainingRun, evaluator: TrainingEvaluator, output_dir: Path, metrics: MetricsLog,
                             step: int) -> None:
    """Score EMA samples, log them, and keep the best export when they beat it."""
    start = time.perf_counter()
    with EmaWeights(run) as network:
        report = evaluator.evaluate(run, network)  # every rank samples a share; the main one scores
        if report is None:
            return
        numbers = {k: v for k, v in report.items() if isinstance(v, float)}
        run.accelerator.get_tracker("tensorboard", unwrap=False).log({f"eval/{k}": v for k, v in numbers.items()},
                                                                     step=step)
        metrics.append({"step": step, "eval": report})
        logger.info("eval at step %d (%.0f s): %s", step, time.perf_counter() - start,
                    ", ".join(f"{k} {v:.4f}" for k, v in numbers.items()))
        if evaluator.improves(report):
            run.family.export(network, run.objective, evaluator.best_dir)
            evaluator.record_best(report, step)
