"""Processes: what the launcher (torchrun, accelerate launch, mpirun) started, and work shared among them.

accelerate owns the process group; this module fills the gaps difftrain hits around it, for training and
for commands that need no Accelerator (`difftrain evaluate`) alike:

- torchrun (and `accelerate launch --multi_gpu`, which is torchrun) on a machine without CUDA: accelerate
  starts a process group only for CPU when asked (`cpu=True`), so without this every rank works alone.
- `accelerate launch --cpu --num_processes N` starts one process (accelerate's multi-CPU path is mpirun
  with a hostfile); the child cannot see N, so it is named in the log instead of failing silently.

Imports nothing from difftrain, so every layer may use it.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object

logger = logging.getLogger(__name__)


def _launcher_env(kind: str, default: int) -> int:
    """An integer the launcher (torchrun/accelerate: RANK, WORLD_SIZE; MPI flavours: PMI_*, OMPI_COMM_WORLD_*,
    MV2_COMM_WORLD_*) put in the environment; `kind` is 'SIZE' or 'RANK'."""
    torchrun = "WORLD_SIZE" if kind == "SIZE" else "RANK"
    for name in (torchrun, f"PMI_{kind}", f"OMPI_COMM_WORLD_{kind}", f"MV2_COMM_WORLD_{kind}"):
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return default


def launched_world_size() -> int:
    """Processes the launcher (torchrun, accelerate launch, mpirun) started, from its environment."""
    return _launcher_env("SIZE", 1)


def launched_local_size(default: int) -> int:
    """Processes the launcher started on this machine (torchrun's and accelerate launch's LOCAL_WORLD_SIZE), or
    `default` when it did not say."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value and value.isdigit() else default


def launched_rank() -> int:
    """This process's global rank from the launcher's environment (0 when not launched as several)."""
    return _launcher_env("RANK", 0)


def wants_cpu_process_group() -> bool:
    """True when several processes were launched but accelerate would not join them into a group.

    accelerate maps a torchrun launch to NCCL when CUDA is present and to nothing otherwise unless
    told `cpu=True`; then it starts gloo (or MPI) itself.
    """
    return launched_world_size() > 1 and not torch.cuda.is_available()


def accelerator_kwargs() -> dict[str, Any]:
    """Extra Accelerator arguments for the current launch."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and launched_world_size() == 1 \
            and os.environ.get("MASTER_PORT"):
        # `accelerate launch --cpu --num_processes N` sets MASTER_PORT for N > 1 but starts one process.
        logger.warning(
            "accelerate launch --cpu started a single process (accelerate runs several CPU processes only "
            "with --mpirun_hostfile). For N CPU processes use `accelerate launch --multi_gpu --num_processes N` "
            "or `difftrain train --num-processes N`; see docs/distributed.md"
        )
    return {"cpu": True} if wants_cpu_process_group() else {}


def quiet_other_ranks(state: Accelerator | PartialState) -> None:
    """Only the main process reports progress; other ranks still print warnings and errors."""
    if not state.is_main_process:
        logging.getLogger("difftrain").setLevel(logging.WARNING)


def process_state() -> PartialState:
    """accelerate's process state, joining the launcher's process group (gloo on CPU) on first use.

    For commands that need no Accelerator (`difftrain evaluate`); inside training the Accelerator has
    already set it up and this returns the same state.
    """
    return PartialState(**accelerator_kwargs())


def leave_process_group(state: PartialState) -> None:
    """Every rank, once the group's last collective is done: wait for the others, then destroy the group.

    For commands without an Accelerator (whose `end_training` does this). A rank that exits with its gloo group
    alive aborts now and then ("terminate called without an active exception", pytorch/pytorch#190489): seen
    for `difftrain evaluate`'s other ranks, which leave while the main process scores.
    """
    state.wait_for_everyone()
    state.destroy_process_group()


def generate_sharded(generate_fn: Callable[[list[int]], torch.Tensor], count: int) -> torch.Tensor:
    """Items 0..count-1 from every rank, in order: rank r makes items r, r+N, r+2N, ... with `generate_fn`.

    Each item's seed is fixed by its index, so the result is the same for any number of processes.
    Every rank must call it; every rank gets the whole (count, C, H, W) result.
    """
    state = PartialState()
    if state.num_processes == 1:
        return generate_fn(list(range(count)))
    mine = list(range(state.process_index, count, state.num_processes))
    images = generate_fn(mine).cpu() if mine else None
    # CPU tensors in the pickles: gather_object sends objects, and CUDA tensors would land on rank 0's GPU.
    pairs = gather_object([(index, images[k]) for k, index in enumerate(mine)])
    pairs.sort(key=lambda pair: pair[0])
    return torch.stack([image for _, image in pairs])


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity (cpu_count off Linux), capped by a cgroup v2 CPU quota, so a
    container given 2 CPUs of a 64-core host counts 2."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2 quota file, or one this does not read
        pass
    return cpus


def total_memory_bytes() -> Optional[int]:
    """The machine's physical memory; None where sysconf cannot tell (not POSIX)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def seconds_since_process_start() -> Optional[float]:
    """How long this process has run (launch to now, imports included), from /proc on Linux; None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): start time after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - started)
