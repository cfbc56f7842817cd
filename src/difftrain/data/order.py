"""Stateless data order and per-step randomness.

Everything random in a training step (which images, flips, condition dropout, noise, timesteps) is a
pure function of (seed, step, micro-step, rank). Ranks and micro-steps are numbered as one global
sequence of micro-batch slots, so the draws of a step depend on the global batch layout, not on how it
is split across processes. Resuming at step k therefore replays exactly what an uninterrupted run would
have done, with no RNG state to save, and nothing depends on DataLoader
workers or iterator position.
"""

from __future__ import annotations

from functools import lru_cache

import torch

_EPOCH_STREAM = 0x5EED_0001
_STEP_STREAM = 0x5EED_0002


def _mix(*values: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64-style), so nearby inputs give unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        x = x * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


@lru_cache(maxsize=4)  # consecutive steps reuse the same epoch's permutation
def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of all items for one epoch."""
    generator = torch.Generator().manual_seed(_mix(_EPOCH_STREAM, seed, epoch))
    return torch.randperm(num_items, generator=generator)


def sample_indices(num_items: int, seed: int, position: int, count: int) -> torch.Tensor:
    """Items at positions [position, position+count) of the endless stream of epoch permutations.

    Each epoch visits every item once; a batch that crosses an epoch boundary takes the end of one
    permutation and the start of the next.
    """
    out = []
    while count > 0:
        epoch, offset = divmod(position, num_items)
        take = min(count, num_items - offset)
        out.append(epoch_permutation(num_items, seed, epoch)[offset : offset + take])
        position += take
        count -= take
    return torch.cat(out)


def stream_position(step: int, micro_step: int, rank: int, grad_accum: int, world_size: int, batch_size: int) -> int:
    """Where rank `rank`'s micro-batch `micro_step` of optimizer step `step` starts in the stream."""
    return ((step * grad_accum + micro_step) * world_size + rank) * batch_size


def step_generator(seed: int, step: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator for the random draws of one micro-batch on one rank."""
    return torch.Generator(device=device).manual_seed(_mix(_STEP_STREAM, seed, step, micro_step, rank))


def micro_batch_generator(seed: int, step: int, micro_step: int, rank: int, world_size: int,
                          device: torch.device) -> torch.Generator:
    """The generator of one micro-batch, keyed by its slot in the step's global order of micro-batches.

    Slot `micro_step * world_size + rank` is the same slot `stream_position` reads images for, so N ranks
    with accumulation A draw the same images, flips, noise and timesteps as 1 rank with accumulation N*A
    (the multi-process test compares exactly that). With one process the slot is the micro-step and
    rank 0, i.e. the single-process draws are unchanged.
    """
    return step_generator(seed, step, micro_step * world_size + rank, 0, device)
