"""The decoded image data set (`ImageDataset`: uint8 images in RAM with labels, captions, names, each image's
recorded geometry and loss mask) as the training step reads it (data/batches.py's TrainingData), and the log
lines of what decoding skipped. Decoding lives in data/dataset.py; the bucketed variant in data/bucketed.py."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from difftrain.data.batches import MicroBatch
from difftrain.data.order import sample_indices

logger = logging.getLogger("difftrain.data.dataset")  # the logger name users know from the decode messages


@dataclass
class ImageDataset:
    images: torch.Tensor
    """(N, C, H, W) uint8."""
    labels: Optional[torch.Tensor]
    """(N,) int64, or None for unlabelled data."""
    class_names: list[str]
    description: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(name, reason) of every item that could not be read or had no caption."""
    captions: Optional[list[str]] = None
    """One caption per image for text-conditioned models."""
    names: Optional[Sequence[str]] = None
    """One name per image: its file path, or 'source[index]' for sources without files."""
    in_memory: bool = True
    """False when `images` is memory-mapped from the disk cache (the loader then reads in worker processes)."""
    original_sizes: Optional[torch.Tensor] = None
    """(N, 2) int64: (height, width) of each source image from its header, before any resize (None: not recorded,
    as in the disk cache)."""
    crops_top_left: Optional[torch.Tensor] = None
    """(N, 2) int64: (top, left) of each image's crop in its resized image (SDXL's crops_coords_top_left)."""
    masks: Optional[torch.Tensor] = None
    """(N, 1, H, W) uint8 loss masks (255: trained), or None when no image has one."""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    # -- TrainingData (data/batches.py) ----------------------------------------------------------------------------

    def rows(self, num_items: int, seed: int, position: int, count: int) -> torch.Tensor:
        return sample_indices(num_items, seed, position, count)

    def gather(self, rows: torch.Tensor) -> MicroBatch:
        return MicroBatch(rows, self.images[rows], None if self.labels is None else self.labels[rows],
                          *self.geometry(rows), None if self.masks is None else self.masks[rows])

    def geometry(self, rows: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(original_sizes, crops_top_left) of `rows`, each None where not recorded."""
        return (None if self.original_sizes is None else self.original_sizes[rows],
                None if self.crops_top_left is None else self.crops_top_left[rows])

    def row_names(self, rows: Sequence[int]) -> list[str]:
        names = self.names
        return [names[r] if names else f"data set row {r}" for r in rows]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def write_skipped_to(self, handler: Optional[logging.Handler]) -> None:
        """Replay the `skipped PATH (reason)` lines into `handler` alone (train.log, attached after decoding)."""
        if handler is not None:
            log_skipped(self.skipped, len(self) + len(self.skipped), handler)



def log_skipped(skipped: list[tuple[str, str]], total: int, handler: Optional[logging.Handler] = None) -> None:
    """Warn `skipped PATH (reason)` for each skipped file, then the count; only to `handler` when given.

    Training decodes its data before train.log exists; it replays the lines into train.log's handler
    alone, so they reach the file without being printed twice.
    """
    lines = [("skipped %s (%s)", (name, reason)) for name, reason in skipped]
    if skipped:
        lines.append(("skipped %d of %d images (unreadable, too large, dangling links or without a caption)",
                      (len(skipped), total)))
    for message, args in lines:
        if handler is None:
            logger.warning(message, *args)
        else:
            handler.handle(logger.makeRecord(logger.name, logging.WARNING, __file__, 0, message, args, None))
