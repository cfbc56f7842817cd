"""Multi-process training through accelerate: supported engines, collective checkpoints, the failure hook.

accelerate owns the process group (DDP, FSDP, DeepSpeed); launch detection and work shared among the
processes, which evaluation needs as well, are in `difftrain.processes`. This module holds what only
training adds:

- `difftrain train --num-processes N`: a thin torchrun call on loopback.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from accelerate import Accelerator

from difftrain.processes import free_loopback_port, launched_world_size
from difftrain.training.progress import ProgressRecord

logger = logging.getLogger(__name__)

# Test hook, not a config key: the rank named here raises at the start of step DIFFTRAIN_FAIL_AT_STEP
# (1-based, default 1), so tests can check that one failing rank ends the whole launch.
FAIL_RANK_ENV = "DIFFTRAIN_FAIL_ON_RANK"
FAIL_STEP_ENV = "DIFFTRAIN_FAIL_AT_STEP"
# Test hook, not a config key: SIGTERM to this process in the middle of writing checkpoint step N.
SIGNAL_STEP_ENV = "DIFFTRAIN_SIGNAL_IN_CHECKPOINT"
SIGNAL_TIMES_ENV = "DIFFTRAIN_SIGNAL_TIMES"


class InjectedFailure(RuntimeError):
    """Raised by the DIFFTRAIN_FAIL_ON_RANK test hook."""


def check_supported(accelerator: Accelerator) -> None:
    """Refuse engines difftrain's loop cannot drive yet, before anything is written."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "accelerate distributed_type FSDP is not supported yet: sample grids, evaluation and the export run "
            "the UNet on the main process alone, which an FSDP-sharded UNet cannot do (it would hang). Use DDP "
            "(configs/accelerate/ddp.yaml) or DeepSpeed ZeRO-2 (configs/accelerate/deepspeed-zero2.yaml); "
            "see docs/distributed.md"
        )


def global_mean(accelerator: Accelerator, value: torch.Tensor) -> torch.Tensor:
    """Mean of `value` over all processes (every rank must call it)."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value.detach().clone(), reduction="mean")


def note_process_count(progress: ProgressRecord, accelerator: Accelerator, lr_scheduler: Any = None) -> None:
    """Say what a resume on a different number of processes keeps and what it changes.

    accelerate steps a prepared LR schedule once per process per optimizer step (setup.py scales the
    schedule's lengths to match), so a schedule saved by N_old processes sits at step x N_old; it is
    moved to step x N_new here, or the learning rate would jump.
    """
    saved = progress.num_processes
    if saved == accelerator.num_processes:
        return
    if lr_scheduler is not None:
        _move_schedule(lr_scheduler, progress.step * accelerator.num_processes)
    logger.warning(
        "resuming a checkpoint written by %s processes on %d: weights, optimizer, EMA and LR schedule load, but the "
        "global batch is now batch_size x accumulation x %d, so the data order and per-step noise from here on "
        "differ from a run that kept %s processes (not an exact resume)",
        saved, accelerator.num_processes, accelerator.num_processes, saved,
    )


def _move_schedule(lr_scheduler: Any, position: int) -> None:
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps it
    lambdas = getattr(inner, "lr_lambdas", None)
    if lambdas is None:
        logger.warning("LR schedule %s kept as saved (only LambdaLR schedules are moved)", type(inner).__name__)
        return
    inner.last_epoch = position
    lrs = [base * fn(position) for base, fn in zip(inner.base_lrs, lambdas)]
    for group, lr in zip(inner.optimizer.param_groups, lrs):
        group["lr"] = lr
    inner._last_lr = lrs


def fail_if_injected(rank: int, step_number: int) -> None:
    """Test hook: raise on rank DIFFTRAIN_FAIL_ON_RANK at step DIFFTRAIN_FAIL_AT_STEP (1-based)."""
    spec = os.environ.get(FAIL_RANK_ENV, "")
    if not spec:
        return
    try:
        fail_rank, fail_step = int(spec), int(os.environ.get(FAIL_STEP_ENV, "1"))
    except ValueError as exc:
        raise ValueError(f"{FAIL_RANK_ENV}={spec!r} / {FAIL_STEP_ENV}={os.environ.get(FAIL_STEP_ENV)!r}: "
                         "expected integers (a rank and a 1-based step)") from exc
    if rank == fail_rank and step_number == fail_step:
        raise InjectedFailure(f"injected failure on rank {rank} at step {step_number} ({FAIL_RANK_ENV})")


def signal_if_injected(step: int) -> None:
    """Test hook: send this process SIGTERM DIFFTRAIN_SIGNAL_TIMES times (default 1) between writing the state of
    checkpoint step DIFFTRAIN_SIGNAL_IN_CHECKPOINT and completing it."""
    spec = os.environ.get(SIGNAL_STEP_ENV, "")
    if not spec or int(spec) != step:
        return
    import signal

    for _ in range(int(os.environ.get(SIGNAL_TIMES_ENV, "1"))):
        os.kill(os.getpid(), signal.SIGTERM)


# How long a rank may take to tear down (process group, interpreter) after a completed run.
TEARDOWN_TIMEOUT_S = 120.0


def exit_if_teardown_hangs(timeout_s: float = TEARDOWN_TIMEOUT_S) -> None:
    """End this rank with status 0 if it is still alive `timeout_s` from now.

    Called once the run is complete on every rank (export written, final barrier passed). Tearing down a
    gloo process group and the interpreter occasionally never returns (pytorch/pytorch#75097); the CI saw a
    finished 2-process run whose launcher then waited until it was killed. Nothing is left to write, so
    leaving without the teardown loses nothing, and the launcher reports the run as it was: successful.
    """
    def leave() -> None:
        logger.warning("rank %d: tearing down took over %.0f s after the run completed; exiting without it",
                       int(os.environ.get("RANK", "0")), timeout_s)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(0)

    timer = threading.Timer(timeout_s, leave)
    timer.daemon = True  # never keeps a process alive by itself
    timer.start()


def launch_local(num_processes: int, argv: Sequence[str]) -> int:
    """Run `difftrain <argv>` as `num_processes` processes on this machine through torchrun; returns its exit code.

    torchrun's own entry point is called in this process (as `accelerate launch` does), so the launch
    is the one documented for torchrun: every rank ends when one fails, and each rank's error reaches stderr.
    """
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if num_processes < 1:
        raise ValueError(f"--num-processes {num_processes}: must be 1 or more")
    if launched_world_size() > 1:
        raise ValueError("--num-processes is for a plain `difftrain train`; this process was already started by a "
                         f"launcher with {launched_world_size()} processes")
    if torch.cuda.is_available() and num_processes > torch.cuda.device_count():
        # Otherwise every extra rank would ask NCCL for a GPU that is not there (or share one), and fail obscurely.
        count = torch.cuda.device_count()
        raise ValueError(f"--num-processes {num_processes}: this machine has {count} CUDA GPU(s) and each process "
                         f"needs its own; use --num-processes {count} or fewer, or hide the GPUs "
                         f"(CUDA_VISIBLE_DEVICES=) to run {num_processes} CPU processes")
    # The ranks inherit this environment. N processes x all cores each oversubscribes the CPU.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not torch.cuda.is_available() and Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: keep gloo's traffic on loopback
    args = ["--nnodes", "1", "--nproc_per_node", str(num_processes), "--master_addr", "127.0.0.1",
            "--master_port", str(free_loopback_port()), "-m", "difftrain", *argv]
    logger.info("launching %d processes: torchrun %s", num_processes, " ".join(args))
    try:
        run(parse_args(args))
    except ChildFailedError as exc:
        # The failing rank printed its error already; torchrun's summary says which rank it was.
        print(exc, file=sys.stderr)
        return 1
    except SignalException as exc:
        # torchrun passed the signal on to every rank and waited for them (30 s, then SIGKILL); each rank
        # checkpointed the same step and said so.
        print(f"difftrain train: the launcher received {exc.sigval.name}; the ranks were stopped, and the same "
              "command resumes from the last complete checkpoint", file=sys.stderr)
        return 128 + int(exc.sigval)
    return 0
