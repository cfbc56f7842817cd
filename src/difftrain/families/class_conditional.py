"""Class-conditional pixel-space model from scratch: a UNet with a class embedding whose last row is the null class
(classifier-free guidance), or a DiT whose class table's null class is 1000 (diffusers' DiTPipeline convention),
exported as difftrain's ClassConditionalPipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from difftrain.config import ConfigError, RunConfig
from difftrain.data.batches import MicroBatch
from difftrain.diffusion.objective import Objective
from difftrain.families.base import PreviewLayout, RunSummary
from difftrain.families.export import save_pipeline_atomically, write_model_card
from difftrain.families.unconditional import UnconditionalPixelFamily
from difftrain.models.backbone import Conditioning, component_name
from difftrain.pipeline import ClassConditionalPipeline
from difftrain.sampling.generate import ImageSampler


class ClassConditionalPixelFamily(UnconditionalPixelFamily):
    name = "pixel-class"

    @classmethod
    def handles(cls, cfg: RunConfig) -> bool:
        return cfg.model.conditioning == "class" and cfg.model.space == "pixel" and cfg.model.pretrained is None

    def data_wants(self) -> tuple[bool, bool]:
        return True, False

    def plan(self) -> None:
        dataset = self.dataset
        self.num_classes = self.cfg.model.num_classes or dataset.num_classes
        labels = getattr(dataset, "labels", None)  # a streamed set's labels are read with its images
        highest = int(labels.max()) if labels is not None else dataset.num_classes - 1
        if highest >= self.num_classes:
            raise ConfigError([f"'model.num_classes' = {self.num_classes} but the data has labels up to {highest}"])
        if not dataset.class_names or len(dataset.class_names) != self.num_classes:
            dataset.class_names = [str(i) for i in range(self.num_classes)]
        super().plan()

    def conditioning(self) -> Conditioning:
        return Conditioning("class", num_classes=self.num_classes)

    def condition(self, micro: MicroBatch, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        labels = micro.labels.to(device)
        dropout = self.cfg.train.condition_dropout
        if dropout > 0:
            drop = torch.rand(labels.shape, generator=generator, device=device) < dropout
            labels = torch.where(drop, torch.full_like(labels, self.network_plan.null_class), labels)
        return labels

    def sampler(self, network: torch.nn.Module) -> ImageSampler:
        return ImageSampler(network, num_classes=self.num_classes)

    def preview_conditions(self) -> PreviewLayout:
        s = self.cfg.sample
        classes = list(range(min(self.num_classes, 16)))
        labels = [c for c in classes for _ in range(s.images_per_class)]
        return PreviewLayout(count=len(labels), per_row=s.images_per_class, labels=labels,
                             row_names=[self.dataset.class_names[c] for c in classes])

    def evaluation_conditions(self, class_names: Sequence[str], num_samples: int,
                              captions: Optional[Sequence[str]] = None,
                              ) -> tuple[Optional[list[int]], Optional[list[str]]]:
        if not class_names:
            return None, None
        return [i % len(class_names) for i in range(num_samples)], None

    def export(self, network: torch.nn.Module, objective: Objective, output_dir: Path) -> None:
        scheduler = objective.inference_scheduler(self.cfg.sample.scheduler)
        pipe = ClassConditionalPipeline(scheduler=scheduler, class_names=self.dataset.class_names,
                                        **{component_name(network): network})
        save_pipeline_atomically(pipe, output_dir)

    def write_model_card(self, summary: RunSummary, objective: Objective, output_dir: Path) -> None:
        write_model_card(self.cfg, summary, self.dataset.class_names, objective.describe(), output_dir)
