"""Sample-quality evaluation during training (`train.eval_every_steps`) and the best-export bookkeeping
(`train.keep_best_by`). The reference set (features, classifier) is prepared once per run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from difftrain.evaluation.evaluate import conditioning_for, held_out_test_split, reference_from_dataset, score_samples
from difftrain.sampling.generate import generate_conditioned
from difftrain.sampling.schedulers import make_scheduler
from difftrain.processes import generate_sharded
from difftrain.writes import atomic_write_text

logger = logging.getLogger(__name__)

# Evaluation seeds are disjoint from preview-grid seeds, and the same at every evaluation.
_EVAL_SEED_OFFSET = 1_000_000
HIGHER_IS_BETTER = {"accuracy"}


class TrainingEvaluator:
    """Every rank samples its share of the evaluation seeds; the main process (`scores=True`) scores them.

    Only the scoring process builds the reference set, so its caches have one writer.
    """

    def __init__(self, plan, output_dir: Path, device: torch.device, scores: bool = True):
        cfg, t = plan.cfg, plan.cfg.train
        self.cfg = cfg
        labelled = plan.dataset.labels is not None
        test = held_out_test_split(cfg.data, True) if labelled and cfg.data.instance_dir is None else None
        self.ref = None
        if scores:
            self.ref = reference_from_dataset(plan.dataset, t.eval_num_reference, t.eval_inception, labelled, device,
                                              test)
        self.best_dir = output_dir / "best"
        self.device = device

    @torch.no_grad()
    def evaluate(self, plan, parts, unet) -> Optional[dict]:
        """Sample (sharded over the processes; every rank must call this) and score; None on non-scoring ranks."""
        cfg, s, n = self.cfg, self.cfg.sample, self.cfg.train.eval_num_samples
        captions = [c for c in plan.text.vocab if c] if plan.text is not None else ()
        # The reference set is built from plan.dataset, so its class names are the data set's on every rank.
        class_names = self.ref.class_names if self.ref is not None else list(plan.dataset.class_names or [])
        labels, prompts = conditioning_for(cfg, class_names, n, captions)
        scheduler = make_scheduler(s.scheduler, parts.noise_scheduler.config)

        text = plan.text is not None

        def make(indices: list[int]) -> torch.Tensor:
            return generate_conditioned(
                unet, scheduler, [s.seed + _EVAL_SEED_OFFSET + i for i in indices],
                num_inference_steps=s.num_inference_steps,
                labels=[labels[i] for i in indices] if labels is not None else None,
                prompts=[prompts[i] for i in indices] if prompts is not None else None,
                tokenizer=plan.text.tokenizer if text else None, text_encoder=parts.text_encoder if text else None,
                vae=parts.latents.vae if text and parts.latents else None, guidance_scale=s.guidance_scale,
                batch_size=s.batch_size)

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
