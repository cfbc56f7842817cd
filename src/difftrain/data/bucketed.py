"""An image data set in aspect-ratio buckets (data.buckets): each bucket's images in their own tensor, micro-batches
drawn bucket by bucket in the order of data/buckets.py's BucketOrder."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from difftrain.data.batches import MicroBatch
from difftrain.data.buckets import BucketOrder, format_bucket
from difftrain.data.image_dataset import ImageDataset


class BucketedImageDataset(ImageDataset):
    """An ImageDataset of aspect-ratio buckets (data.buckets; data/buckets.py): images of each bucket in their own
    (n, C, H, W) tensor, every micro-batch from one bucket. `images` is a square view at data.resolution (each image
    center-cropped to its short side and resized), made when first asked for: the reference set of evaluations and
    the VAE stage read it; training reads the buckets."""

    def __init__(self, base: ImageDataset, bucket_sizes: list[tuple[int, int]], bucket_images: list[torch.Tensor],
                 row_bucket: torch.Tensor, row_slot: torch.Tensor, resolution: int,
                 bucket_masks: Optional[list[torch.Tensor]] = None):
        self._square: Optional[torch.Tensor] = None
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(ImageDataset)}
        fields.update(images=None, masks=None)
        super().__init__(**fields)
        self.bucket_sizes, self.bucket_images, self.bucket_masks = bucket_sizes, bucket_images, bucket_masks
        self.row_bucket, self.row_slot, self.resolution = row_bucket, row_slot, resolution
        self.order = BucketOrder(row_bucket, len(bucket_sizes))

    @classmethod
    def from_arrays(cls, base: ImageDataset, arrays: list[np.ndarray], buckets: list[tuple[int, int]],
                    resolution: int, masks: Optional[list[np.ndarray]] = None) -> "BucketedImageDataset":
        """Group decoded arrays (each at its bucket's size) by bucket; buckets no image went to are dropped."""
        index = {size: b for b, size in enumerate(buckets)}
        row_bucket_all = [index[(a.shape[2], a.shape[1])] for a in arrays]
        used = sorted(set(row_bucket_all))
        renumber = {b: j for j, b in enumerate(used)}
        row_bucket = torch.tensor([renumber[b] for b in row_bucket_all], dtype=torch.long)
        row_slot = torch.zeros(len(arrays), dtype=torch.long)
        images, bucket_masks = [], [] if masks is not None else None
        for j, b in enumerate(used):
            rows = [r for r, rb in enumerate(row_bucket_all) if rb == b]
            row_slot[rows] = torch.arange(len(rows))
            images.append(torch.from_numpy(np.stack([arrays[r] for r in rows])))
            if masks is not None:
                bucket_masks.append(torch.from_numpy(np.stack([masks[r] for r in rows])))
        return cls(base, [buckets[b] for b in used], images, row_bucket, row_slot, resolution, bucket_masks)

    @property
    def images(self) -> torch.Tensor:  # type: ignore[override]
        if self._square is None:
            self._square = self._square_view()
        return self._square

    @images.setter
    def images(self, value: Optional[torch.Tensor]) -> None:
        self._square = value

    def _square_view(self) -> torch.Tensor:
        first = self.bucket_images[0]
        out = torch.empty((len(self), first.shape[1], self.resolution, self.resolution), dtype=torch.uint8)
        for b, images in enumerate(self.bucket_images):
            height, width = images.shape[-2:]
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            rows = torch.nonzero(self.row_bucket == b).flatten()  # ascending: row k of the bucket has slot k
            for at in range(0, len(images), 256):
                part = images[at:at + 256, :, top:top + side, left:left + side].float()
                if side != self.resolution:
                    part = F.interpolate(part, size=(self.resolution, self.resolution), mode="bilinear",
                                         antialias=True, align_corners=False)
                out[rows[at:at + len(part)]] = part.round().clamp(0, 255).to(torch.uint8)
        return out

    def __len__(self) -> int:
        return int(self.row_bucket.shape[0])

    def histogram(self) -> list[tuple[str, int]]:
        """('WxH', images) of each bucket."""
        return [(format_bucket(size), int((self.row_bucket == b).sum())) for b, size in enumerate(self.bucket_sizes)]

    def rows(self, num_items: int, seed: int, position: int, count: int) -> torch.Tensor:
        if num_items != len(self):
            raise ValueError(f"bucketed data reads all its {len(self)} rows, not the first {num_items}")
        return self.order.rows(seed, position, count)

    def gather(self, rows: torch.Tensor) -> MicroBatch:
        buckets = self.row_bucket[rows]
        bucket = int(buckets[0])
        if bool((buckets != bucket).any()):
            raise ValueError(f"rows {rows.tolist()} come from several buckets; a micro-batch holds one")
        slots = self.row_slot[rows]
        return MicroBatch(rows, self.bucket_images[bucket][slots], None if self.labels is None else self.labels[rows],
                          *self.geometry(rows),
                          None if self.bucket_masks is None else self.bucket_masks[bucket][slots])
