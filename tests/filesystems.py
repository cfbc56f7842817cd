"""Real read-only and full folders for the write-path tests.

Tests run as root (CI too), where permission bits do not stop a write, so a read-only folder is a
read-only tmpfs mount; a full disk is a small tmpfs filled to the last byte. Where mounting is not
permitted (most unprivileged containers) the tests that need them skip; as a non-root user, a folder
with mode 0555 stands in for the read-only mount.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest


def mount_tmpfs(path: Path, options: str) -> Optional[str]:
    """Mount a tmpfs at `path`; the reason when that is not allowed here, else None."""
    if shutil.which("mount") is None:
        return "no mount command"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def read_only_folder(path: Path, fill_from: Optional[Path] = None) -> Iterator[Path]:
    """`path` as a folder nothing can be written into, holding a copy of `fill_from` if given."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        if fill_from is not None:
            shutil.copytree(fill_from, path, dirs_exist_ok=True)
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
        for folder in modes:
            folder.chmod(0o555)
        try:
            yield path
        finally:
            for folder, mode in modes.items():
                folder.chmod(mode)
        return
    why = mount_tmpfs(path, "size=64m")
    if why is not None:
        pytest.skip(f"needs a read-only folder: running as root and cannot mount a tmpfs here ({why})")
    try:
        if fill_from is not None:
            shutil.copytree(fill_from, path, dirs_exist_ok=True)
        done = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only ({done.stderr.strip()})")
        yield path
    finally:
        unmount(path)


@contextmanager
def full_folder(path: Path, fill_from: Optional[Path] = None, size: str = "16m") -> Iterator[Path]:
    """`path` on a small file system with no free byte left, holding a copy of `fill_from` if given."""
    path.mkdir(parents=True, exist_ok=True)
    why = mount_tmpfs(path, f"size={size}")
    if why is not None:
        pytest.skip(f"needs a full disk: cannot mount a small tmpfs here ({why})")
    try:
        if fill_from is not None:
            shutil.copytree(fill_from, path, dirs_exist_ok=True)
        fill(path / ".filler")
        yield path
    finally:
        unmount(path)


def fill(filler: Path) -> None:
    """Write `filler` until the file system says ENOSPC."""
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    assert shutil.disk_usage(filler.parent).free < len(chunk)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (to show a failed command changed nothing)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
