"""What training data hands the step: one micro-batch of uint8 images (with labels) by data set row.

Two kinds of training data implement `TrainingData`: an `ImageDataset` (decoded up front, in RAM or memory-mapped
from the disk cache) and a streamed set of shards (data/streaming.py). Both map a position of the data stream to
rows (`rows`) and rows to a `MicroBatch` (`gather`); the loader (data/loader.py) calls `gather` in worker processes
when the data is not a RAM tensor. Flips, normalisation and condition dropout stay in the family's `batch`, drawn
from the step's generator, so every path gives the same batches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Optional, Protocol, Sequence

import torch


@dataclass
class MicroBatch:
    """One micro-batch as read from the data, on the CPU."""

    rows: torch.Tensor
    """(B,) int64: data set rows (stream sample ids for streamed data); text and latent caches index by them."""
    images: torch.Tensor
    """(B, C, H, W) uint8 at the training resolution."""
    labels: Optional[torch.Tensor] = None
    """(B,) int64 class labels, or None for unlabelled data."""
    original_sizes: Optional[torch.Tensor] = None
    """(B, 2) int64: (height, width) of each source image as its header gives it, before any resize; None where the
    data does not record it (disk cache, streams)."""
    crops_top_left: Optional[torch.Tensor] = None
    """(B, 2) int64: (top, left) of each image's crop in its resized image, before any flip (SDXL's
    `crops_coords_top_left`, as diffusers' train_text_to_image_sdxl.py computes it); None where not recorded."""
    masks: Optional[torch.Tensor] = None
    """(B, 1, H, W) uint8 loss masks (255: trained, 0: ignored), resized and cropped as the images (not yet flipped:
    the family flips them with the images); None when the data has no masks."""

    def pin_memory(self) -> "MicroBatch":
        """Page-locked copies (DataLoader's pin_memory calls this), so the copy to an accelerator can overlap."""
        return MicroBatch(*(None if value is None else value.pin_memory()
                            for value in (getattr(self, f.name) for f in fields(self))))


class TrainingData(Protocol):
    """A training set as the step reads it."""

    description: str
    in_memory: bool
    """True when `gather` only indexes a tensor in RAM: the loader then reads in the training process."""
    class_names: list[str]
    skipped: list[tuple[str, str]]
    """(name, reason) of what start-up could not use (unreadable files, shards)."""

    def __len__(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    def write_skipped_to(self, handler: Optional[logging.Handler]) -> None:
        """Replay the start-up `skipped ...` warnings into `handler` alone (train.log, attached after loading)."""

    def rows(self, num_items: int, seed: int, position: int, count: int) -> torch.Tensor:
        """Rows of positions [position, position+count) of the endless data stream over the first `num_items`."""

    def gather(self, rows: torch.Tensor) -> MicroBatch:
        """Read these rows (in a loader worker or the training process)."""

    def row_names(self, rows: Sequence[int]) -> list[str]:
        """Names of rows for messages (file paths, or shard and sample key)."""
