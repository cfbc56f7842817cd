"""Aspect-ratio buckets (`data.buckets`): training images keep their shape, resized to the bucket of nearest aspect
ratio at about the target area data.resolution^2 (minimal crop), and every micro-batch comes from one bucket.

The order stays a pure function of (seed, position), as data/order.py's: epoch e shuffles each bucket's rows with a
generator seeded by (seed, e, bucket), cuts them into micro-batches of batch_size (a short last one is filled from
the start of the same bucket's shuffled rows, so a bucket smaller than a batch repeats its images), then shuffles the
list of all the epoch's micro-batches with (seed, e). Position p (a multiple of batch_size: `stream_position`) reads
micro-batch p // batch_size of that endless stream, so resume is exact and N processes read what one process with N
times the accumulation reads. Every image is in exactly one micro-batch of each epoch (the fill repeats a few).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch

from difftrain.data.order import _mix

_BUCKET_STREAM = 0x5EED_00B0
_BATCH_STREAM = 0x5EED_00B1
MAX_ASPECT = 4.0
"""auto buckets span aspect ratios 1:4 to 4:1 (kohya sd-scripts and SimpleTuner use about the same range)."""
BUCKET_PATTERN = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")

Size = tuple[int, int]
"""(width, height) in pixels."""


def parse_bucket(text: str) -> Optional[Size]:
    """'WxH' -> (W, H), None when it is not two positive integers."""
    match = BUCKET_PATTERN.match(str(text))
    if not match:
        return None
    w, h = int(match.group(1)), int(match.group(2))
    return (w, h) if w > 0 and h > 0 else None


def format_bucket(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def auto_buckets(resolution: int, multiple: int, max_aspect: float = MAX_ASPECT) -> list[Size]:
    """Buckets of about resolution^2 pixels (never more), sides multiples of `multiple`, aspect ratios from
    1:max_aspect to max_aspect:1, as kohya sd-scripts' make_bucket_resolutions builds them: for each width, the
    largest height that keeps the area, and the transposed bucket. Sorted by aspect ratio (width / height)."""
    area = resolution * resolution
    sizes: set[Size] = set()
    width = multiple
    while width * multiple <= area:
        height = (area // width) // multiple * multiple
        if height >= multiple and max(width, height) / min(width, height) <= max_aspect:
            sizes.update({(width, height), (height, width)})
        width += multiple
    if not sizes:  # the target area is below one multiple^2: the one square bucket that holds it
        side = max(multiple, math.ceil(resolution / multiple) * multiple)
        sizes.add((side, side))
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def resolve_buckets(value: Union[str, Sequence[str], None], resolution: int, multiple: int) -> Optional[list[Size]]:
    """The bucket sizes of `data.buckets` ('off' / None: no buckets; 'auto'; a list of 'WxH'), checked against the
    network's size multiple: ValueError naming data.buckets, the size and the multiple."""
    if value in (None, "off", False):
        return None
    if value == "auto":
        return auto_buckets(resolution, multiple)
    sizes = []
    for entry in value:
        size = parse_bucket(entry)
        if size is None:
            raise ValueError(f"data.buckets entry {entry!r} is not WIDTHxHEIGHT in pixels (e.g. '512x768')")
        bad = [side for side in size if side % multiple]
        if bad:
            raise ValueError(f"data.buckets entry {entry!r}: the network takes sides that are multiples of {multiple} "
                             f"(VAE and UNet downsampling), {bad[0]} is not; e.g. "
                             f"{format_bucket(tuple(max(multiple, round(s / multiple) * multiple) for s in size))}")
        sizes.append(size)
    return sorted(set(sizes), key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> int:
    """Index of the bucket whose aspect ratio is nearest `size`'s (width, height), in log ratio; ties go to the first."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), i))


class BucketOrder:
    """The bucketed data order over rows whose bucket is `row_bucket` (N,) (see the module docstring)."""

    def __init__(self, row_bucket: torch.Tensor, num_buckets: int):
        self.row_bucket = row_bucket.long()
        self.bucket_rows = [torch.nonzero(self.row_bucket == b).flatten() for b in range(num_buckets)]
        self._epochs: OrderedDict[tuple[int, int, int], torch.Tensor] = OrderedDict()

    def batches_per_epoch(self, batch_size: int) -> int:
        return sum(math.ceil(len(rows) / batch_size) for rows in self.bucket_rows)

    def epoch_batches(self, seed: int, epoch: int, batch_size: int) -> torch.Tensor:
        """(batches, batch_size) rows of one epoch's micro-batches, in their shuffled order."""
        key = (seed, epoch, batch_size)
        if key in self._epochs:
            self._epochs.move_to_end(key)
            return self._epochs[key]
        parts = []
        for b, rows in enumerate(self.bucket_rows):
            if not len(rows):
                continue
            generator = torch.Generator().manual_seed(_mix(_BUCKET_STREAM, seed, epoch, b))
            shuffled = rows[torch.randperm(len(rows), generator=generator)]
            batches = math.ceil(len(rows) / batch_size)
            filled = shuffled.repeat(math.ceil(batches * batch_size / len(rows)))[:batches * batch_size]
            parts.append(filled.reshape(batches, batch_size))
        table = torch.cat(parts)
        generator = torch.Generator().manual_seed(_mix(_BATCH_STREAM, seed, epoch))
        table = table[torch.randperm(len(table), generator=generator)]
        self._epochs[key] = table
        while len(self._epochs) > 4:  # consecutive steps reuse the same epoch's table
            self._epochs.popitem(last=False)
        return table

    def rows(self, seed: int, position: int, batch_size: int) -> torch.Tensor:
        """Rows of the micro-batch at `position` (a multiple of batch_size) of the endless bucketed stream."""
        if position % batch_size:
            raise ValueError(f"bucketed data is read a whole micro-batch at a time: position {position} is not a "
                             f"multiple of the batch size {batch_size}")
        epoch, index = divmod(position // batch_size, self.batches_per_epoch(batch_size))
        return self.epoch_batches(seed, epoch, batch_size)[index].clone()
