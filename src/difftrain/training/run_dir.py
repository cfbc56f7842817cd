"""Which folders difftrain may write into, and one training process tree per folder.

A run folder is recognised by difftrain's own marker, `OUTPUT_DIR/.difftrain/run.json`, written
atomically when a run starts: never by the presence of a `config.yaml`, which any project may hold. A
non-empty folder without the marker is refused before anything is written, whatever it holds. Runs made
before markers existed are recognised by what only difftrain writes (a checkpoint whose progress.json
names a difftrain version) and marked on their next start.

`.difftrain/lock` carries an OS file lock (flock) held for the life of the run, so a second trainer on
the same folder exits at once naming the holder, and a lock left by a killed process never blocks: the
kernel drops it with the process. Read-only commands (`sample`, `evaluate`) take no lock.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional

from difftrain.training import checkpoint as ckpt
from difftrain.training.progress import read_progress
from difftrain.writes import atomic_write_text

logger = logging.getLogger(__name__)

MARKER_DIR = ".difftrain"
MARKER_FILE = "run.json"
LOCK_FILE = "lock"
# The layout version of a run folder. A difftrain that reads format N resumes folders of format <= N;
# a folder written by a newer format is refused rather than half-understood.
RUN_FORMAT = 1


class RunDirError(ValueError):
    """The output folder cannot be used for this run (not difftrain's, incompatible, or in use)."""


def marker_path(output_dir: Path) -> Path:
    return output_dir / MARKER_DIR / MARKER_FILE


def read_marker(output_dir: Path) -> Optional[dict[str, Any]]:
    """The run record, or None when the folder has none. Raises RunDirError when it exists but cannot be read."""
    path = marker_path(output_dir)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"run record {path} could not be read ({exc}); it is written atomically, so the folder "
                          "was changed by something other than difftrain. Choose another --output-dir") from exc
    if not isinstance(record, dict) or not isinstance(record.get("format"), int):
        raise RunDirError(f"run record {path} is not a difftrain run record (no integer 'format'); "
                          "choose another --output-dir")
    return record


def legacy_run_version(output_dir: Path) -> Optional[str]:
    """The difftrain version of a run made before run records, recognised by its checkpoints; else None.

    Only difftrain writes `checkpoints/step-N/progress.json` with a `difftrain_version` and a `config`;
    every run of that era wrote one at its last step at the latest, and rotation always keeps one.
    """
    for _, path in reversed(ckpt.list_checkpoints(output_dir / "checkpoints")):
        try:
            return read_progress(path).difftrain_version
        except (OSError, ValueError):  # ValueError: damaged, or not a progress file difftrain wrote
            continue
    return None


def _contents(output_dir: Path) -> list[str]:
    try:
        return sorted(p.name for p in output_dir.iterdir())
    except FileNotFoundError:
        return []
    except NotADirectoryError as exc:
        raise RunDirError(f"output_dir {output_dir} is a file, not a folder; choose another --output-dir") from exc


def check_run_dir(output_dir: Path) -> str:
    """Whether difftrain may train in `output_dir`; writes nothing.

    Returns 'new' (missing or empty), 'run' (a marked difftrain run) or 'legacy' (a run made before run
    records). Raises RunDirError for a non-empty folder that is not difftrain's, or a run record this
    difftrain cannot read.
    """
    entries = _contents(output_dir)
    record = read_marker(output_dir) if MARKER_DIR in entries else None
    if record is not None:
        if record["format"] > RUN_FORMAT:
            from difftrain import __version__

            raise RunDirError(
                f"output_dir {output_dir} holds a run written by difftrain {record.get('difftrain_version', '?')} "
                f"(run format {record['format']}); this difftrain {__version__} reads run format {RUN_FORMAT} or "
                "older. Resume it with that difftrain version, or choose another --output-dir"
            )
        return "run"
    # A bare .difftrain/ (a start killed between taking the lock and writing the record) is difftrain's own.
    others = [name for name in entries if name != MARKER_DIR]
    if not others:
        return "new"
    if legacy_run_version(output_dir) is not None:
        return "legacy"
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    raise RunDirError(
        f"output_dir {output_dir} is not empty ({shown}) and is not a difftrain run (no {MARKER_DIR}/{MARKER_FILE}); "
        "difftrain never writes into a folder it did not create. Choose a new or empty --output-dir "
        "(a run folder is created for you)"
    )


def write_marker(output_dir: Path, config: Optional[dict] = None, migrated_from: Optional[str] = None) -> Path:
    """Write (or update) the run record atomically: format, versions, start times and the resolved config."""
    from difftrain.versions import library_versions

    path = marker_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        previous = read_marker(output_dir) or {}
    except RunDirError:
        previous = {}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    versions = library_versions()
    record = {
        "format": RUN_FORMAT,
        "difftrain_version": versions["difftrain"],
        "created": previous.get("created", now),
        "last_started": now,
        "versions": versions,
        "config": config if config is not None else previous.get("config"),
    }
    if migrated_from or previous.get("migrated_from"):
        record["migrated_from"] = migrated_from or previous.get("migrated_from")
    return atomic_write_text(path, json.dumps(record, indent=2), "the run record")


@dataclasses.dataclass
class RunLock:
    """An flock on OUTPUT_DIR/.difftrain/lock, held until `release` (or the process ends)."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (its details were not written yet)"
    command = f", command: {info['command']}" if info.get("command") else ""
    return (f"difftrain {info.get('what', 'train')} with pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
            f"started {info.get('started', '?')}{command}")


def _in_use(output_dir: Path, path: Path) -> RunDirError:
    return RunDirError(f"output_dir {output_dir} is in use by another difftrain process: {_holder(path)}. "
                       "Wait for it to finish (or stop it), or choose another --output-dir")


def ensure_not_in_use(output_dir: Path) -> None:
    """Raise RunDirError when another process holds the folder's lock; writes nothing.

    The CLI asks this before importing torch, so a second trainer on a busy folder exits at once.
    """
    path = output_dir / MARKER_DIR / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody has ever trained here (or the folder is unreadable, reported later)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts with the trainer's exclusive lock
    except BlockingIOError:
        raise _in_use(output_dir, path) from None
    except OSError:
        pass  # no locks on this file system: acquire_lock says so
    finally:
        os.close(fd)


def check_before_claim(output_dir: Path) -> None:
    """The checks of `claim_run_dir` that write nothing: the folder is difftrain's, and not in use."""
    check_run_dir(output_dir)
    ensure_not_in_use(output_dir)


def acquire_lock(output_dir: Path, what: str = "train") -> RunLock:
    """Take the folder's lock or raise RunDirError naming the process that holds it."""
    path = output_dir / MARKER_DIR / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # close-on-exec: child processes do not keep it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _in_use(output_dir, path) from None
    except OSError as exc:  # a file system without locks (some network mounts)
        os.close(fd)
        raise RunDirError(f"could not lock {path} ({exc}); difftrain needs file locks on the output folder's "
                          "file system to keep two runs apart. Choose an --output-dir on a local disk") from exc
    info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["difftrain", *sys.argv[1:]]) if sys.argv and sys.argv[0] else ""}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, and a second process names its holder less precisely
    return RunLock(path, fd)


def claim_run_dir(output_dir: Path, what: str = "train") -> RunLock:
    """Check, create and lock `output_dir` for a run; returns the held lock.

    Order matters: the folder is checked before anything is written, the lock is taken before the run
    record, and a legacy run is marked only once it is locked.
    """
    kind = check_run_dir(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(output_dir, what)
    try:
        kind = check_run_dir(output_dir)  # again under the lock: another process may have just started
        if kind == "legacy":
            version = legacy_run_version(output_dir)
            write_marker(output_dir, migrated_from=version)
            logger.info("%s: a run made by difftrain %s before run records; marked it as a difftrain run",
                        output_dir, version)
        else:
            write_marker(output_dir)
    except BaseException:
        lock.release()
        raise
    return lock
