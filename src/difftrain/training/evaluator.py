"""Sample-quality evaluation during training (`train.eval_every_steps`) and the best-export bookkeeping
(`train.keep_best_by`). The reference set (features, classifier) is prepared once per run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from difftrain.evaluation.evaluate import _test_split, conditioning_for, reference_from_dataset, score_samples
from difftrain.pipeline import generate, generate_from_text
from difftrain.sampling.schedulers import make_scheduler

logger = logging.getLogger(__name__)

# Evaluation seeds are disjoint from preview-grid seeds, and the same at every evaluation.
_EVAL_SEED_OFFSET = 1_000_000
HIGHER_IS_BETTER = {"accuracy"}


class TrainingEvaluator:
    def __init__(self, plan, output_dir: Path, device: torch.device):
        cfg, t = plan.cfg, plan.cfg.train
        self.cfg = cfg
        labelled = plan.dataset.labels is not None
        test = _test_split(cfg.data, True) if labelled and cfg.data.instance_dir is None else None
        self.ref = reference_from_dataset(plan.dataset, t.eval_num_reference, t.eval_inception, labelled, device, test)
        self.best_dir = output_dir / "best"
        self.device = device

    @torch.no_grad()
    def evaluate(self, plan, parts, unet) -> dict:
        cfg, s, n = self.cfg, self.cfg.sample, self.cfg.train.eval_num_samples
        captions = [c for c in plan.text.vocab if c] if plan.text is not None else ()
        labels, prompts = conditioning_for(cfg, self.ref.class_names, n, captions)
        seeds = [s.seed + _EVAL_SEED_OFFSET + i for i in range(n)]
        scheduler = make_scheduler(s.scheduler, parts.noise_scheduler.config)
        if plan.text is not None:
            encoder = parts.text_encoder
            was_training = encoder.training
            encoder.eval()
            samples = generate_from_text(unet, scheduler, plan.text.tokenizer, encoder, prompts, seeds,
                                         num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
                                         batch_size=s.batch_size, vae=parts.latents.vae if parts.latents else None)
            encoder.train(was_training)
        else:
            samples = generate(unet, scheduler, seeds, num_inference_steps=s.num_inference_steps,
                               class_labels=labels, guidance_scale=s.guidance_scale, batch_size=s.batch_size)
        report = score_samples(self.ref, samples, labels)
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
        tmp = path.with_name(".best.json.tmp")
        tmp.write_text(json.dumps({"step": step, "keep_best_by": self.cfg.train.keep_best_by, "metrics": report},
                                  indent=2) + "\n")
        tmp.replace(path)
        logger.info("best so far by %s at step %d: %s -> %s", self.cfg.train.keep_best_by, step,
                    report[self.cfg.train.keep_best_by], self.best_dir)
