"""Evaluate generated samples against reference data: FID/KID on Inception features, and for labelled
data the reference classifier's conditional accuracy and FID in its feature space.

`ReferenceSet` is built once (reference images, their cached Inception features, the classifier) and
then scores any number of sample batches: `difftrain evaluate` uses it once, training uses it at every
`train.eval_every_steps`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from difftrain.config import DataConfig
from difftrain.data.batches import TrainingData
from difftrain.data.dataset import ImageDataset, load_image_dataset
from difftrain.cache import cache_root
from difftrain.evaluation.classifier import TrainedClassifier, get_classifier
from difftrain.evaluation.inception import InceptionFeatures, InceptionUnavailable
from difftrain.evaluation.metrics import frechet_distance, kernel_distance
from difftrain.writes import best_effort, replace_file

logger = logging.getLogger(__name__)

# Real images whose classifier features form the classifier-FID reference (cheap, so many).
CLASSIFIER_REFERENCE = 10000


def _images_key(images: torch.Tensor, extra: str) -> str:
    digest = hashlib.sha256(f"{extra}-{tuple(images.shape)}".encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


@dataclass
class ReferenceSet:
    """Reference data prepared for scoring samples."""

    description: str
    images: torch.Tensor
    labels: Optional[torch.Tensor]
    class_names: list[str]
    inception: Optional[InceptionFeatures] = None
    inception_error: Optional[str] = None
    inception_features: Optional[torch.Tensor] = None
    classifier: Optional[TrainedClassifier] = None
    classifier_features: Optional[torch.Tensor] = None
    timings: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _inception_features(model: InceptionFeatures, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch_size]).cpu() for i in range(0, images.shape[0], batch_size)])


def _cached_reference_features(model: InceptionFeatures, images: torch.Tensor) -> torch.Tensor:
    """Inception features of reference images, cached per exact image set (so per data set and resolution)."""
    path = cache_root() / "reference" / f"{_images_key(images, model.source)}.pt"
    if path.is_file():
        logger.info("reference Inception features from cache %s", path)
        return torch.load(path, weights_only=True)
    start = time.perf_counter()
    features = _inception_features(model, images)
    with best_effort("the reference-feature cache", path):  # a cache: an unwritable one costs time only
        replace_file(path, lambda tmp: torch.save(features, tmp), "the reference-feature cache")
    logger.info("reference Inception features of %d images in %.0f s%s", images.shape[0],
                time.perf_counter() - start, f", cached at {path}" if path.is_file() else "")
    return features


def held_out_test_split(data: DataConfig, want_labels: bool) -> Optional[ImageDataset]:
    """MNIST's own test split for the classifier's accuracy; other sources hold out 10% instead."""
    from difftrain.data.sources import is_mnist_folder

    path = Path(data.path).expanduser()
    if data.source in ("auto", "mnist") and path.is_dir() and is_mnist_folder(path) and data.split != "test":
        return load_image_dataset(dataclasses.replace(data, split="test", max_images=None), want_labels=want_labels)
    return None


def prepare_reference(data: DataConfig, num_reference: int, labelled: bool, use_inception: bool = True,
                      use_classifier: bool = True, device: torch.device | str = "cpu") -> ReferenceSet:
    """Load reference data (anything data.path accepts) and prepare it with `reference_from_dataset`."""
    from difftrain.data.streaming import open_streaming_set

    stream = open_streaming_set(data, want_labels=labelled)
    dataset = sample_into_memory(stream, num_reference) if stream is not None else \
        load_image_dataset(data, want_labels=labelled)
    test = held_out_test_split(data, labelled) if labelled and use_classifier else None
    return reference_from_dataset(dataset, num_reference, use_inception, use_classifier, device, test)


def sample_into_memory(data: TrainingData, count: int) -> ImageDataset:
    """Up to `count` images of a streamed set, in RAM: the first of its epoch-0 order at seed 0, so they come from
    every part of the set and are the same at every evaluation and resume."""
    count = min(count, len(data))
    micro = data.gather(data.rows(len(data), 0, 0, count))
    return ImageDataset(micro.images, micro.labels, list(data.class_names), f"{count} images of {data.description}",
                        names=data.row_names(micro.rows.tolist()))


def reference_from_dataset(dataset: ImageDataset, num_reference: int, use_inception: bool = True,
                           use_classifier: bool = True, device: torch.device | str = "cpu",
                           test: Optional[ImageDataset] = None) -> ReferenceSet:
    """Inception features of the first `num_reference` images of a seeded shuffle (cached), and the
    reference classifier when the data has labels (accuracy on `test`, else on a 10% hold-out)."""
    ref = ReferenceSet(dataset.description, dataset.images, dataset.labels, list(dataset.class_names))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    if use_inception:
        try:
            ref.inception = InceptionFeatures(device=device)
            ref.inception_features = _cached_reference_features(ref.inception, dataset.images[order[:num_reference]])
        except InceptionUnavailable as exc:
            ref.inception_error = str(exc)
            logger.warning("FID/KID skipped: %s", exc)
    if use_classifier and dataset.labels is not None:
        num_classes = max(ref.num_classes, int(dataset.labels.max()) + 1)
        ref.classifier = get_classifier(dataset.images, dataset.labels, num_classes,
                                        test=(test.images, test.labels) if test is not None else None)
        ref.classifier_features = ref.classifier.features(dataset.images[order[:CLASSIFIER_REFERENCE]])
    return ref


def score_samples(ref: ReferenceSet, samples: torch.Tensor, sample_labels: Optional[Sequence[int]]) -> dict:
    """Every metric that applies to uint8 samples (N, C, H, W) generated for `sample_labels`."""
    report: dict = {"num_samples": int(samples.shape[0])}
    if samples.shape[-2:] != ref.images.shape[-2:] or samples.shape[1] != ref.images.shape[1]:
        raise ValueError(f"samples are {tuple(samples.shape[1:])} but the reference images are "
                         f"{tuple(ref.images.shape[1:])}; evaluate at the run's data.resolution and data.channels")
    if ref.inception_features is not None:
        fake = _inception_features(ref.inception, samples)
        report["fid"] = frechet_distance(ref.inception_features, fake)
        report["kid"], report["kid_std"] = kernel_distance(ref.inception_features, fake)
        report["num_reference"] = int(ref.inception_features.shape[0])
        report["inception"] = ref.inception.source
    elif ref.inception_error:
        report["inception_error"] = ref.inception_error
    if ref.classifier is not None:
        report["classifier_test_accuracy"] = ref.classifier.test_accuracy
        report["classifier_num_test"] = ref.classifier.num_test
        report["classifier_fid"] = frechet_distance(ref.classifier_features, ref.classifier.features(samples))
        if sample_labels is not None:
            wanted = torch.tensor(list(sample_labels))
            hit = (ref.classifier.predict(samples) == wanted).float()
            report["accuracy"] = float(hit.mean())
            report["per_class_accuracy"] = {
                ref.class_names[k] if k < len(ref.class_names) else str(k): float(hit[wanted == k].mean())
                for k in sorted(set(wanted.tolist()))
            }
    return report


def format_table(report: dict) -> str:
    rows = [("metric", "value")]
    for key in ("fid", "kid", "kid_std", "classifier_fid", "accuracy", "classifier_test_accuracy", "num_samples",
                "num_reference"):
        if key in report:
            value = report[key]
            rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    if "inception_error" in report:
        rows.append(("fid/kid", "unavailable: " + report["inception_error"]))
    for name, acc in (report.get("per_class_accuracy") or {}).items():
        rows.append((f"accuracy[{name}]", f"{acc:.3f}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


SampleFn = Callable[[Optional[list[int]], Optional[list[str]], list[int]], torch.Tensor]
