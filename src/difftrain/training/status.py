"""OUTPUT_DIR/.difftrain/status.json: what the last training process on a run folder is doing, or how it ended.

The main process writes it atomically when training starts (`training`) and when it ends: `finished` (the export
written), `interrupted` (a clean stop: SIGTERM/Ctrl-C, or `stop_at_step`) or `failed` (any other exception, with
its first line and type). Readers (the web UI, ui/runs.py) trust `training` only while the folder's lock is held:
a killed process cannot write its end, so it leaves `training` behind.

Every write is best effort: a status that cannot be written is logged and training goes on, and writing the end
of a failed run never replaces the error that failed it.

`trainer_holds_lock` tells a reader whether a trainer holds the folder's lock, from /proc/locks (Linux) or, where
that cannot be read, from the pid the lock file records (alive on this host).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Optional, Sequence

from difftrain.errors import StopRequested
from difftrain.training.run_dir import LOCK_FILE, MARKER_DIR
from difftrain.writes import atomic_write_text

logger = logging.getLogger(__name__)

STATUS_FILE = "status.json"
STATES = ("training", "finished", "failed", "interrupted")


def status_path(output_dir: Path) -> Path:
    return Path(output_dir) / MARKER_DIR / STATUS_FILE


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


class RunStatus:
    """The status record of one training process on `output_dir`; only the process with `writes` writes it.

    `start` begins the record; `end`/`end_by` finish it, and do nothing when `start` never ran (a run refused
    before it started leaves the folder's previous status as it was). `step` is the last completed step, kept
    up to date by the loop so a failure can name it.
    """

    def __init__(self, output_dir: Path, writes: bool, config_source: Optional[str] = None,
                 overrides: Sequence[str] = ()):
        self.path = status_path(output_dir)
        self.writes = writes
        self.config_source = config_source
        self.overrides = list(overrides)
        self.step: Optional[int] = None
        self.record: Optional[dict[str, Any]] = None

    def start(self, kind: str, max_steps: int) -> None:
        self.record = {
            "state": "training", "kind": kind, "config_source": self.config_source, "overrides": self.overrides,
            "max_steps": max_steps, "started": now_iso(), "pid": os.getpid(), "host": socket.gethostname(),
        }
        self._write()

    def end(self, state: str, exc: Optional[BaseException] = None) -> None:
        assert state in STATES and state != "training", state
        if self.record is None:
            return
        self.record.update(state=state, ended=now_iso(), step=self.step)
        if exc is not None and state == "failed":
            message = first_line(str(exc))
            self.record.update(error=message or type(exc).__name__, error_type=type(exc).__name__)
        self._write()

    def end_by(self, exc: BaseException) -> None:
        """The end for an exception leaving `train`: a clean stop is `interrupted`, anything else `failed`."""
        self.end("interrupted" if isinstance(exc, (StopRequested, KeyboardInterrupt)) else "failed", exc)

    def _write(self) -> None:
        if not self.writes or self.record is None:
            return
        try:
            atomic_write_text(self.path, json.dumps(self.record, indent=2) + "\n", "the run status")
        except Exception as exc:  # a full disk, a read-only folder: the run matters more than its status
            logger.warning("could not write the run status %s (%s); training goes on without it", self.path, exc)


# -- for readers: is the trainer that wrote `training` still alive? ------------------------------------------------
# Read without touching the lock: a reader's flock probe, even a shared one, could make a trainer starting at that
# moment fail to take it.


def read_proc_locks() -> Optional[list[tuple[int, int, int, int]]]:
    """(major, minor, inode, pid) of every exclusive flock on this machine; None where /proc/locks is unreadable."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    held = []
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 15549 fe:00:2449752 0 EOF"; a waiter's line has "->" after the number.
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK" or parts[3] != "WRITE":
            continue  # the trainer's lock is an exclusive flock; the CLI's brief shared probes are not trainers
        try:
            major, minor, inode = parts[5].split(":")
            held.append((int(major, 16), int(minor, 16), int(inode), int(parts[4])))
        except ValueError:
            continue
    return held


def _recorded_holder(lock: Path) -> dict[str, Any]:
    try:
        info = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    except OSError:
        return False
    return True


def trainer_holds_lock(output_dir: Path, locks: Optional[list[tuple[int, int, int, int]]]) -> bool:
    """Whether a trainer holds `output_dir`'s lock, given `read_proc_locks()` (None: judged by the pid the lock
    file records, which may have been reused by another process)."""
    lock = Path(output_dir) / MARKER_DIR / LOCK_FILE
    try:
        st = os.stat(lock)
    except OSError:
        return False
    if locks is None:
        info = _recorded_holder(lock)
        return info.get("host") == socket.gethostname() and _pid_alive(info.get("pid"))
    device = (os.major(st.st_dev), os.minor(st.st_dev))
    for major, minor, inode, pid in locks:
        if inode != st.st_ino:
            continue
        # Overlay file systems report another device to stat than the lock's; the holder's pid settles it.
        if (major, minor) == device or _recorded_holder(lock).get("pid") == pid:
            return True
    return False
