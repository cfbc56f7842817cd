"""The one rule for every path the UI serves or writes: it lies under RUNS_DIR once symlinks are followed."""

from __future__ import annotations

from pathlib import Path, PurePosixPath


class OutsideRunsDir(PermissionError):
    """A requested path that would leave RUNS_DIR (answered 403)."""


def inside_runs_dir(runs_dir: Path, rel_path: str) -> Path:
    """`runs_dir / rel_path`, resolved; raises OutsideRunsDir for an absolute path, `..`, or a link leading out.

    `runs_dir` must already be resolved. The path need not exist.
    """
    if "\x00" in rel_path or "\\" in rel_path:
        raise OutsideRunsDir(f"path {rel_path!r} refused: only plain '/'-separated paths under RUNS_DIR are served")
    pure = PurePosixPath(rel_path)
    if pure.is_absolute() or ".." in pure.parts:
        raise OutsideRunsDir(f"path {rel_path!r} refused: it must be relative to RUNS_DIR, without '..'")
    resolved = (runs_dir / pure).resolve()
    if resolved != runs_dir and not resolved.is_relative_to(runs_dir):
        raise OutsideRunsDir(f"path {rel_path!r} refused: it leads outside RUNS_DIR ({runs_dir})")
    return resolved
