"""The step's micro-batches, read ahead by DataLoader worker processes when the data is not a tensor in RAM.

Which rows a micro-batch holds is a pure function of (seed, step, micro-step, rank) (data/order.py), so the
loader knows every future micro-batch: it walks the slots `step * accumulation + micro_step` from where the run
(re)starts, and its workers gather them ahead of the step (memory-mapped cache pages, or shards decoded from a
stream). Nothing about the order lives in the loader, so resume, rollback and a different worker count give the
same batches; a request for another slot than the next one (a resume or a rollback) restarts the workers there.

Data that is already a RAM tensor is gathered in the training process: indexing it costs less than passing it
between processes.
"""

from __future__ import annotations

import logging
import multiprocessing
from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from difftrain.data.batches import MicroBatch, TrainingData
from difftrain.processes import usable_cpus

logger = logging.getLogger(__name__)

PREFETCH_MICRO_BATCHES_PER_WORKER = 2
# Workers are forked: they inherit the family's `rows` and the data's open state (memory maps, the disk cache's
# repair source) instead of pickling them, which spawn (macOS' and Windows' default) would have to do.
_FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def loader_workers(requested: Optional[int], data: TrainingData, device: torch.device, local_processes: int) -> int:
    """Worker processes for `data.loader_workers` (None: chosen here).

    RAM tensors need none. On CPU the step's own threads use every core, so one worker (one thread) reads ahead:
    its share of a core is small next to the step, and more would take cores from the step. With an accelerator
    the CPU is free for data: up to 8 workers per process from the cores this process may use.
    """
    if data.in_memory:
        return 0
    if requested is not None:
        return requested
    if device.type == "cpu":
        return 1
    return max(1, min(8, usable_cpus() // max(local_processes, 1) - 1))


class _Slots(Dataset):
    """Micro-batch slot -> MicroBatch; a pure function, so any worker can read any slot."""

    def __init__(self, data: TrainingData, rows_at: Callable[[int, int], torch.Tensor],
                 position_of: Callable[[int], int], batch_size: int):
        self.data, self.rows_at, self.position_of, self.batch_size = data, rows_at, position_of, batch_size

    def rows(self, slot: int) -> torch.Tensor:
        return self.rows_at(self.position_of(slot), self.batch_size)

    def __getitem__(self, slot: int) -> MicroBatch:
        return self.data.gather(self.rows(slot))

    def __len__(self) -> int:  # DataLoader asks; the sampler decides which slots are read
        return 2**62


def _as_is(item: MicroBatch) -> MicroBatch:
    return item


class BatchLoader:
    """Gives the MicroBatch of each slot in turn, read ahead by `workers` processes (0: read on request)."""

    def __init__(self, data: TrainingData, rows_at: Callable[[int, int], torch.Tensor],
                 position_of: Callable[[int], int], batch_size: int, end_slot: int, workers: int,
                 pin_memory: bool = False):
        self.slots = _Slots(data, rows_at, position_of, batch_size)
        self.end_slot, self.workers, self.pin_memory = end_slot, workers, pin_memory
        self._iterator: Optional[Iterator[MicroBatch]] = None
        self._next_slot: Optional[int] = None

    def rows(self, slot: int) -> torch.Tensor:
        """The data set rows of a slot, without reading them (for messages that name a step's files)."""
        return self.slots.rows(slot)

    def get(self, slot: int) -> MicroBatch:
        if self.workers == 0 or slot >= self.end_slot:
            return self.slots[slot]
        if self._iterator is None or slot != self._next_slot:
            self._restart(slot)
        self._next_slot = slot + 1
        return next(self._iterator)

    def _restart(self, slot: int) -> None:
        self.close()
        loader = DataLoader(self.slots, batch_size=None, sampler=range(slot, self.end_slot), num_workers=self.workers,
                            collate_fn=_as_is, prefetch_factor=PREFETCH_MICRO_BATCHES_PER_WORKER,
                            pin_memory=self.pin_memory, multiprocessing_context=_FORK)
        self._iterator = iter(loader)

    def close(self) -> None:
        """Stop the workers (the iterator's shutdown joins them)."""
        if self._iterator is not None:
            shutdown = getattr(self._iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iterator = None
