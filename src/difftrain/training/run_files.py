"""The run folder during training: claimed and locked once (training/run_dir.py holds the policy), then its
log files: train.log (the `difftrain` logger) and metrics.jsonl (one JSON row per logged step or evaluation).

Files that are replaced go through `writes.atomic_write_text`; metrics.jsonl is appended to, and rows of steps
that a resume redoes are trimmed first.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from difftrain.training.run_dir import RunLock, check_run_dir, claim_run_dir
from difftrain.writes import atomic_write_text

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RunFolder:
    """OUTPUT_DIR of a training run on this process. The main process refuses a folder that is not difftrain's
    and locks an existing one at once (so a second trainer exits within seconds); a new folder is created and
    locked by `start()`, once the config and data have been checked, or earlier by a family that must write
    before its data is read (DreamBooth class images)."""

    def __init__(self, path: Path, processes: Any, is_launch_main: bool):
        self.path = Path(path)
        self.processes = processes
        self.lock: Optional[RunLock] = None
        self.handler: Optional[logging.Handler] = None
        self.started = False
        if is_launch_main:
            check_run_dir(self.path)
            if self.path.is_dir():
                self.lock = claim_run_dir(self.path)

    def start(self) -> None:
        """Create and lock the folder (main process, unless locked already) and start train.log; idempotent."""
        if self.started:
            return
        if self.processes.is_main_process and self.lock is None:
            self.lock = claim_run_dir(self.path)
        self.processes.wait_for_everyone()
        if self.processes.is_main_process:
            self.handler = logging.FileHandler(self.path / "train.log")
            self.handler.setFormatter(logging.Formatter(LOG_FORMAT))
            logging.getLogger("difftrain").addHandler(self.handler)
        self.started = True

    def close(self) -> None:
        if self.handler is not None:
            logging.getLogger("difftrain").removeHandler(self.handler)
            self.handler.close()
            self.handler = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None


class MetricsLog:
    """OUTPUT_DIR/metrics.jsonl, written by the main process only."""

    def __init__(self, path: Path, writes: bool):
        self.path = path
        self.writes = writes

    def trim(self, step: int) -> None:
        """Drop rows logged after `step` (the checkpoint a run resumes from or rolls back to)."""
        if self.writes:
            trim_metrics(self.path, step)

    def append(self, row: dict) -> None:
        if self.writes:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def trim_metrics(metrics_path: Path, start: int) -> None:
    """Drop rows logged after the checkpoint being resumed from: those steps are about to be redone."""
    if not metrics_path.is_file():
        return
    lines = metrics_path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and _row_step(line) <= start]
    if len(kept) != len(lines):
        atomic_write_text(metrics_path, "".join(line + "\n" for line in kept), "the trimmed metrics log")


def _row_step(line: str) -> float:
    """Step of a metrics row; a row cut short by a crash counts as after every checkpoint (dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")
