"""Clean stops on SIGTERM (what Slurm, Kubernetes and cloud schedulers send on preemption) and Ctrl-C.

Inside the training loop a signal is a request: the step under way finishes, a checkpoint of it is
written (`train.checkpoint_on_signal`), and the run ends with exit code 128 + the signal number (143 for
SIGTERM, 130 for Ctrl-C). A second signal, or one outside the loop (start-up, export), stops at once
by raising `StopRequested` where the program is, so `finally` blocks remove temporaries. With several
processes every rank receives the signal from its launcher; they agree on the step to stop after, so no
rank waits in a collective that another one left.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator, Optional

import torch

from difftrain.errors import StopRequested, signal_name

__all__ = ["StopRequested", "StopSignals", "signal_name"]

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Handlers for SIGTERM and SIGINT while training; restores the previous handlers on exit.

    Python runs signal handlers in the main thread only; from another thread (e.g. a UI calling
    `train`) the handlers are not installed and signals keep their previous behaviour.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self._deferring and self.signum is None:
            self.signum = signum
            logger.warning("received %s: finishing the current step, then a checkpoint and a clean stop "
                           "(send it again to stop at once)", signal_name(signum))
            return
        raise StopRequested(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside the block a first signal is only recorded; the loop asks `agreed_signal` between steps."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def agreed_signal(self, num_processes: int, device: torch.device) -> Optional[int]:
        """The signal to stop on if any process received one, else None (every process must call it together).

        One small all-reduce per step on several processes: ranks get the launcher's signal at slightly
        different times, and all of them must stop after the same step.
        """
        if num_processes == 1:
            return self.signum
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        if value and self.signum is None:
            self.signum = value
        return value or None
