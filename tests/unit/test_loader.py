"""The loader's worker processes hand out exactly the micro-batches the training process would gather itself,
in slot order, after a restart at any slot (resume, rollback), and the worker count follows the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difftrain.data.batches import MicroBatch
from difftrain.data.dataset import ImageDataset
from difftrain.data.loader import BatchLoader, loader_workers
from difftrain.data.order import stream_position

BATCH, ACCUMULATION, RANK, WORLD = 3, 2, 1, 2


def _memory_mapped(tmp_path: Path, count: int = 23) -> ImageDataset:
    pixels = np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="w+", shape=(count, 1, 4, 4))
    pixels[:] = np.arange(count, dtype=np.uint8)[:, None, None, None]
    pixels.flush()
    images = torch.from_numpy(np.memmap(tmp_path / "images.u8", dtype=np.uint8, mode="c", shape=(count, 1, 4, 4)))
    return ImageDataset(images, torch.arange(count) % 5, [str(i) for i in range(5)], "memory-mapped", in_memory=False)


def _loader(data: ImageDataset, workers: int, end_slot: int = 40) -> BatchLoader:
    def position_of(slot: int) -> int:
        step, micro = divmod(slot, ACCUMULATION)
        return stream_position(step, micro, RANK, ACCUMULATION, WORLD, BATCH)

    return BatchLoader(data, lambda position, size: data.rows(len(data), 7, position, size), position_of, BATCH,
                       end_slot=end_slot, workers=workers)


def _same(a: MicroBatch, b: MicroBatch) -> bool:
    return torch.equal(a.rows, b.rows) and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_workers_give_the_gathered_micro_batches_in_order_and_after_restarts(tmp_path: Path):
    data = _memory_mapped(tmp_path)
    direct, ahead = _loader(data, workers=0), _loader(data, workers=2)
    try:
        # In order, then back to an earlier slot (a rollback), then forward past a gap (a resume), then the end.
        for slot in [*range(0, 9), 4, 5, 6, 20, 21, 39, 40, 41]:
            expected = direct.get(slot)
            got = ahead.get(slot)
            assert _same(got, expected), slot
            assert torch.equal(got.images[:, 0, 0, 0], got.rows.to(torch.uint8))  # images are those rows' pixels
    finally:
        ahead.close()
    assert ahead._iterator is None


def test_worker_count_follows_where_the_data_is_and_the_device(tmp_path: Path):
    ram = ImageDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), None, [], "ram")
    disk = _memory_mapped(tmp_path)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loader_workers(None, ram, cuda, 1) == 0  # a RAM tensor is indexed in the training process
    assert loader_workers(None, disk, cpu, 1) == 1  # the step's threads use the cores; one worker reads ahead
    assert 1 <= loader_workers(None, disk, cuda, 1) <= 8
    assert loader_workers(3, disk, cpu, 1) == 3
