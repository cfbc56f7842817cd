"""A small reference classifier for labelled data: conditional accuracy of samples and FID in its
feature space (cheap on CPU).

It is trained once per data set on the real training images and cached under a hash of the exact
decoded images and labels (plus this recipe's version), so changed data means a new classifier.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from difftrain.cache import cache_root
from difftrain.data.transforms import to_model_range
from difftrain.writes import best_effort, replace_file

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1
DEFAULT_STEPS = 1500


def cache_dir() -> Path:
    return cache_root() / "classifiers"


class ReferenceClassifier(torch.nn.Module):
    """Three conv blocks and global pooling: `features` (N, 128) and `logits` (N, num_classes)."""

    num_features = 128

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.SiLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.GroupNorm(8, 64), torch.nn.SiLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.GroupNorm(8, 128), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(128, num_classes)

    def features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.body(to_model_range(images_uint8))

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images_uint8))


@dataclass
class TrainedClassifier:
    model: ReferenceClassifier
    test_accuracy: float
    num_test: int
    key: str

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return torch.cat([self.model(images_uint8[i : i + batch_size]).argmax(1)
                          for i in range(0, images_uint8.shape[0], batch_size)])

    @torch.no_grad()
    def features(self, images_uint8: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return torch.cat([self.model.features(images_uint8[i : i + batch_size])
                          for i in range(0, images_uint8.shape[0], batch_size)])


def data_key(images: torch.Tensor, labels: torch.Tensor, steps: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"v{RECIPE_VERSION}-{steps}-{tuple(images.shape)}".encode())
    digest.update(images.contiguous().numpy().tobytes())
    digest.update(labels.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:24]


def _split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    held = max(1, n // 10)
    return order[held:], order[:held]


def get_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   test: Optional[tuple[torch.Tensor, torch.Tensor]] = None, steps: int = DEFAULT_STEPS,
                   batch_size: int = 128) -> TrainedClassifier:
    """The cached classifier for this exact data, or train one (CPU, a minute or two).

    Args:
        test: held-out (images, labels) for the reported accuracy; None holds out 10% of `images`.
    """
    key = data_key(images, labels, steps)
    path = cache_dir() / f"{key}.safetensors"
    model = ReferenceClassifier(images.shape[1], num_classes)
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        meta = json.loads(path.with_suffix(".json").read_text())
        logger.info("reference classifier from cache %s (test accuracy %.4f)", path, meta["test_accuracy"])
        return TrainedClassifier(model.eval(), meta["test_accuracy"], meta["num_test"], key)
    if test is None:
        train_idx, test_idx = _split(images.shape[0])
        test = (images[test_idx], labels[test_idx])
        images, labels = images[train_idx], labels[train_idx]
    logger.info("training the reference classifier on %d images (%d steps; cached afterwards)", images.shape[0], steps)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        batch = images[idx]
        # Small random shifts: the classifier should judge shapes, not exact pixel positions.
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
        batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
        loss = F.cross_entropy(model(batch), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    trained = TrainedClassifier(model, 0.0, int(test[0].shape[0]), key)
    trained.test_accuracy = float((trained.predict(test[0]) == test[1]).float().mean())
    what = "the reference-classifier cache"
    with best_effort(what, path):  # a cache: an unwritable one costs time only
        # The .json first: the weights file is what marks a cache entry as complete.
        facts = json.dumps({"test_accuracy": trained.test_accuracy, "num_test": trained.num_test,
                            "num_classes": num_classes})
        replace_file(path.with_suffix(".json"), lambda tmp: tmp.write_text(facts), what)
        replace_file(path, lambda tmp: save_file(model.state_dict(), str(tmp)), what)
    logger.info("reference classifier: test accuracy %.4f on %d held-out images%s",
                trained.test_accuracy, trained.num_test, f"; cached at {path}" if path.is_file() else "")
    return trained
