"""Checks before a write, and one error when a write cannot happen.

Every file difftrain writes for the user (checkpoints, exports, sample grids, evaluation reports,
plots, `difftrain sample` images, class images) goes through here:

- `check_writable` before anything is written (or computed for nothing): the nearest existing folder
  on the way to the target must accept a new file, and its file system must have room for an estimate.
- `writing` around the write itself: a failure that comes anyway (ENOSPC mid-write, a folder turned
  read-only) removes the write's temporary and becomes a `WriteError` naming the path.

Both raise `difftrain.errors.WriteError` (`DiskSpaceError` for too little room), which the CLI prints
as one line.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from difftrain.errors import DiskSpaceError, WriteError

logger = logging.getLogger(__name__)

# Room left on top of an estimate: file-system metadata, small side files, and the previous copy that an
# atomic replace keeps until the rename.
SPACE_MARGIN = 1.1
SPACE_SLACK_BYTES = 8 * 1024 * 1024

_PROBE_PREFIX = ".difftrain-write-probe-"


def free_bytes(path: Path) -> int:
    """Free bytes for this user on the file system holding `path` (which exists). Tests replace this probe."""
    return shutil.disk_usage(path).free


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest existing ancestor (where a mkdir would start)."""
    path = Path(path)
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def reason(exc: BaseException) -> str:
    """A short, path-free description of an OS or safetensors failure, e.g. 'No space left on device'."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    # safetensors reports I/O failures as `IoError(Os { code: 28, kind: StorageFull, message: "No space ..." })`.
    match = re.search(r'message: "([^"]+)"', str(exc))
    return match.group(1) if match else f"{type(exc).__name__}: {exc}"


def _probe(folder: Path) -> None:
    """Create and remove a file in `folder`; raises the OSError a real write would get.

    os.access is not enough: it answers yes for root on a read-only mount's permission bits, and knows
    nothing of quotas or full inode tables.
    """
    fd, name = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=folder)
    os.close(fd)
    os.unlink(name)


def required_bytes(estimate_bytes: int) -> int:
    """Free space asked for a write estimated at `estimate_bytes`."""
    return int(estimate_bytes * SPACE_MARGIN) + SPACE_SLACK_BYTES


def check_writable(directory: Path, estimate_bytes: int, what: str, hint: str = "",
                   target: Optional[Path] = None) -> None:
    """Raise WriteError unless `what` (about `estimate_bytes`) can be written into `directory`.

    `directory` need not exist yet: the check runs in its nearest existing ancestor, where it would be
    created. Nothing is left behind. The free space asked for is the estimate plus a margin
    (`required_bytes`).

    Args:
        what: what is being written, for the message ("the exported pipeline", "the sample grid").
        hint: appended to the disk-space message (what to do about it); a default one otherwise.
        target: the path the message names (a file in `directory`); `directory` itself by default.
    """
    directory = Path(directory)
    target = Path(target) if target is not None else directory
    existing = nearest_existing(directory)
    if not existing.is_dir():
        raise WriteError(f"cannot write {what} to {target}: {existing} is a file, not a folder")
    try:
        _probe(existing)
    except OSError as exc:
        raise WriteError(f"cannot write {what} to {target}: {existing} is not writable ({reason(exc)}); "
                         "choose another folder or fix its permissions") from exc
    free = free_bytes(existing)
    wanted = required_bytes(estimate_bytes)
    if free < wanted:
        raise DiskSpaceError(
            f"not enough disk space for {what} {'in' if target == directory else 'at'} {target}: "
            f"{free / 2**20:.1f} MiB free, about "
            f"{wanted / 2**20:.1f} MiB needed. " + (hint or "Free some space or choose a folder on another disk.")
        )


def check_file_writable(path: Path, estimate_bytes: int, what: str) -> None:
    """`check_writable` for a single file `path` (its folder is checked); also refuses a folder at `path`."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"cannot write {what} to {path}: it is a folder; give a file name")
    check_writable(path.parent, estimate_bytes, what, target=path)


def remove_path(path: Path) -> None:
    """Delete a file or folder if present, ignoring errors (cleanup of a temporary)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _is_io_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return False
    return isinstance(exc, SafetensorError)


@contextmanager
def writing(what: str, path: Path, temporaries: Iterable[Path] = ()) -> Iterator[None]:
    """Around a write of `what` to `path`: on any failure remove `temporaries`; I/O failures become WriteError.

    Ctrl-C and other exceptions are re-raised unchanged after the cleanup.
    """
    temporaries = [Path(t) for t in temporaries]
    try:
        yield
    except BaseException as exc:
        for temporary in temporaries:
            remove_path(temporary)
        if isinstance(exc, WriteError) or not _is_io_failure(exc):
            raise
        removed = "; its temporary files were removed" if temporaries else ""
        raise WriteError(f"writing {what} to {path} failed: {reason(exc)}{removed}. Free some space or fix the "
                         "folder's permissions and run the same command again") from exc


def save_folder_atomically(target: Path, tmp: Path, what: str, estimate_bytes: int,
                           save: Callable[[Path], None]) -> Path:
    """Write a folder through `save(tmp)`, then swap it in for `target`.

    Checked first (writable, room for `estimate_bytes`); a failure removes `tmp` and leaves `target` as it was.
    """
    check_writable(target.parent, estimate_bytes, what)
    with writing(what, target, [tmp]):
        if tmp.exists():
            shutil.rmtree(tmp)
        save(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.replace(target)
    return target


def replace_file(path: Path, write: Callable[[Path], None], what: str, durable: bool = False,
                 keep_suffix: bool = False) -> Path:
    """Replace the file `path` whole: `write(tmp)` fills a temporary beside it, which is then renamed over `path`,
    so a reader sees the old file or the new one, never half of one; a failure removes the temporary (and I/O
    failures become WriteError, see `writing`). The one way difftrain replaces a file.

    Args:
        durable: fsync the file and its folder, so the rename survives a power cut (checkpoint progress files).
        keep_suffix: name the temporary `.stem.tmp.suffix`, for writers that pick the format by extension.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = f".{path.stem}.tmp{path.suffix}" if keep_suffix else f".{path.name}.tmp"
    tmp = path.with_name(name)
    with writing(what, path, [tmp]):
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        tmp.replace(path)
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path, text: str, what: str, durable: bool = False) -> Path:
    """Write `text` to `path` through `replace_file`, after checking the folder takes it."""
    data = text.encode()
    check_file_writable(path, len(data), what)
    return replace_file(path, lambda tmp: tmp.write_bytes(data), what, durable=durable)


def state_bytes(modules: Iterable[object]) -> int:
    """Bytes of the tensors that saving these torch modules writes (parameters and buffers; others ignored)."""
    import torch

    total = 0
    for module in modules:
        if isinstance(module, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in module.state_dict().values() if torch.is_tensor(t))
    return total


@contextmanager
def best_effort(what: str, path: Path, temporaries: Iterable[Path] = ()) -> Iterator[None]:
    """Around an optional write (a cache): an I/O failure is logged as a warning and skipped, temporaries removed."""
    try:
        with writing(what, path, temporaries):
            yield
    except WriteError as exc:
        logger.warning("could not write %s to %s (%s); going on without it", what, path, reason(exc.__cause__ or exc))


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk where the OS allows it; errors are ignored."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
