"""Trainers the UI did not start: found through a run folder's lock, and only signalled once proven to be
`difftrain train` on that folder.

The lock file (training/run_dir.py) names the pid and host of the process holding it. A pid alone proves
nothing (a stale file, a pid reused by another program), so before a signal is sent: the lock must be held
now, the host must be this one, and `/proc/PID/cmdline` must be a `difftrain train` whose `--output-dir` is the
folder (or, without one, the process must hold the folder's lock in `/proc/locks`). Linux only, as `/proc` is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
from pathlib import Path
from typing import Optional, Sequence

from difftrain.training.run_dir import LOCK_FILE, MARKER_DIR, RunDirError, ensure_not_in_use

PROC = Path("/proc")


@dataclasses.dataclass(frozen=True)
class TrainInvocation:
    """What a `difftrain train` command line says: its folder (None: from the config) and whether it launches
    several processes (`--num-processes`, torchrun in that process)."""

    output_dir: Optional[Path]
    launcher: bool


@dataclasses.dataclass(frozen=True)
class TrainerProcess:
    """The process to signal for a clean stop, and how to recognise it later."""

    pid: int
    start_time: int
    command: str


def process_argv(pid: int) -> Optional[list[str]]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    words = raw.split(b"\0")
    if words and words[-1] == b"":
        words.pop()
    return [word.decode("utf-8", "surrogateescape") for word in words] or None


def _stat_fields(pid: int) -> Optional[list[str]]:
    """/proc/PID/stat from field 3 (state) on; the command name before it may hold spaces and parentheses."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def process_start_time(pid: int) -> Optional[int]:
    """Clock ticks after boot when `pid` started (field 22 of /proc/PID/stat): with the pid, names one process."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def is_alive(pid: int, start_time: int) -> bool:
    """Whether the process `pid` that started at `start_time` still runs (a zombie has ended)."""
    fields = _stat_fields(pid)
    return bool(fields) and len(fields) > 19 and int(fields[19]) == start_time and fields[0] not in ("Z", "X")


def parent_pid(pid: int) -> Optional[int]:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields and len(fields) > 1 else None


def _process_cwd(pid: int) -> Optional[Path]:
    try:
        return Path(os.readlink(PROC / str(pid) / "cwd"))
    except OSError:
        return None


def train_invocation(argv: Sequence[str], cwd: Optional[Path]) -> Optional[TrainInvocation]:
    """The `difftrain train` in `argv` (`difftrain train ...`, `python -m difftrain train ...`, `python
    .../difftrain train ...`), else None. A relative --output-dir is resolved against `cwd` (None: unknown)."""
    rest = _difftrain_arguments(argv)
    if rest is None:
        return None
    words = [word for word in rest if word != "--debug"]  # the one option before the command
    if not words or words[0] != "train":
        return None
    output_dir: Optional[Path] = None
    launcher = False
    for i, word in enumerate(words):
        value = None
        if word == "--output-dir" and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith("--output-dir="):
            value = word.split("=", 1)[1]
        if word == "--num-processes" or word.startswith("--num-processes="):
            launcher = True
        if value is not None:
            path = Path(value)
            if not path.is_absolute():
                if cwd is None:
                    return TrainInvocation(None, launcher)  # a folder that cannot be placed proves nothing
                path = cwd / path
            output_dir = path.resolve()
    return TrainInvocation(output_dir, launcher)


def _is_difftrain_script(word: str) -> bool:
    return Path(word).name == "difftrain" or word.endswith("difftrain/__main__.py")


def _difftrain_arguments(argv: Sequence[str]) -> Optional[list[str]]:
    """The words after the program when `argv` runs difftrain: its console script, or a Python interpreter
    running `-m difftrain` or difftrain's script (interpreter options such as -u skipped); else None."""
    if not argv:
        return None
    if _is_difftrain_script(argv[0]):
        return list(argv[1:])
    if not Path(argv[0]).name.startswith("python"):
        return None
    i = 1
    while i < len(argv):
        word = argv[i]
        if word == "-m":
            return list(argv[i + 2:]) if argv[i + 1:i + 2] == ["difftrain"] else None
        if word in ("-c", "-"):
            return None
        if word in ("-X", "-W", "--check-hash-based-pycs"):
            i += 2  # options that take a value
            continue
        if word.startswith("-"):
            i += 1
            continue
        return list(argv[i + 1:]) if _is_difftrain_script(word) else None
    return None


def flock_holders(path: Path) -> Optional[set[int]]:
    """The pids /proc/locks lists holding a lock on the file `path` (empty when the file does not exist); None
    where /proc/locks cannot be read (not Linux). Only reads: probing by taking the lock could make the trainer
    that takes it at that moment refuse its folder as busy."""
    try:
        lines = (PROC / "locks").read_text().splitlines()
    except OSError:
        return None
    try:
        inode = str(os.stat(path).st_ino)
    except OSError:
        return set()
    holders = set()
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6:
            continue  # a process waiting for a lock, not holding one
        if fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == inode and fields[4].isdigit():
            holders.add(int(fields[4]))
    return holders


def holds_flock(pid: int, path: Path) -> bool:
    """Whether /proc/locks lists `pid` holding a lock on the file `path`."""
    return pid in (flock_holders(path) or set())


def read_lock_info(output_dir: Path) -> dict:
    try:
        info = json.loads((output_dir / MARKER_DIR / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def lock_held(output_dir: Path) -> bool:
    try:
        ensure_not_in_use(output_dir)
    except RunDirError:
        return True
    return False


def find_trainer(output_dir: Path, run_id: str) -> TrainerProcess:
    """The process whose SIGINT stops the trainer of `output_dir` cleanly, as Ctrl-C in its terminal would;
    ValueError says why there is none or why it may not be signalled.

    For `difftrain train --num-processes N` the lock is held by rank 0, a child of the launching process: the
    launcher is signalled, as Ctrl-C would, and passes the signal to every rank (training/distributed.py
    launch_local); a rank signalled alone would stop the others but leave the launcher reporting a failure.
    """
    if not lock_held(output_dir):
        raise ValueError(f"run {run_id!r} is not training (no process holds {output_dir / MARKER_DIR / LOCK_FILE})")
    info = read_lock_info(output_dir)
    pid, host = info.get("pid"), info.get("host")
    if not isinstance(pid, int) or pid <= 0:
        raise ValueError(f"run {run_id!r}: its lock file names no process id ({info!r}); stop it where it was started")
    if host != socket.gethostname():
        raise ValueError(f"run {run_id!r} is trained by pid {pid} on host {host!r}; only a trainer on this host "
                         f"({socket.gethostname()!r}) can be stopped from here")
    argv = process_argv(pid)
    invocation = train_invocation(argv, _process_cwd(pid)) if argv else None
    if invocation is None:
        shown = shlex.join(argv) if argv else "unreadable"
        raise ValueError(f"run {run_id!r}: its lock names pid {pid}, which is not a `difftrain train` process "
                         f"(command line: {shown}); not stopped")
    lock_path = output_dir / MARKER_DIR / LOCK_FILE
    if invocation.output_dir != output_dir.resolve() and not (invocation.output_dir is None
                                                             and holds_flock(pid, lock_path)):
        raise ValueError(f"run {run_id!r}: pid {pid} is a `difftrain train` on another folder "
                         f"({invocation.output_dir}); not stopped")
    target, command = pid, shlex.join(argv)
    parent = parent_pid(pid)
    parent_argv = process_argv(parent) if parent else None
    if parent and parent_argv:
        launch = train_invocation(parent_argv, _process_cwd(parent))
        if launch is not None and launch.launcher and launch.output_dir in (None, output_dir.resolve()):
            target, command = parent, shlex.join(parent_argv)
    start_time = process_start_time(target)
    if start_time is None:
        raise ValueError(f"run {run_id!r}: its trainer (pid {target}) has just ended")
    return TrainerProcess(target, start_time, command)
