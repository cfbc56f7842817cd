"""Training-state checkpoints: atomic writes, discovery of the newest one, rotation.

A checkpoint is a directory `checkpoints/step-000500/` holding accelerate's `save_state` output
(model, optimizer, LR schedule, EMA, grad scaler) plus `progress.json`. It is written under a
temporary name and renamed only when complete, and `progress.json` is written last, so a crash
mid-write never leaves a directory that looks valid.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from difftrain.errors import DiskSpaceError  # noqa: F401 - raised by ensure_free_space; importable from here
from difftrain.writes import check_writable, state_bytes, writing

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
PROGRESS_FILE = "progress.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with progress.json), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for entry in checkpoints_dir.iterdir():
        match = CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir() and (entry / PROGRESS_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path) -> Optional[Path]:
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def read_progress(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / PROGRESS_FILE).read_text())


def _fsync_dir(path: Path) -> None:
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


def begin_checkpoint(checkpoints_dir: Path, step: int) -> Path:
    """Create the empty temporary directory a checkpoint is saved into."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints_dir / f".tmp-{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def finish_checkpoint(checkpoints_dir: Path, step: int, tmp: Path, progress: dict[str, Any]) -> Path:
    """Add progress.json to a saved temporary checkpoint and rename it into place."""
    final = checkpoints_dir / checkpoint_name(step)
    with writing(f"checkpoint {checkpoint_name(step)}", checkpoints_dir, [tmp]):
        progress_tmp = tmp / f".{PROGRESS_FILE}.tmp"
        with open(progress_tmp, "w") as f:
            json.dump(progress, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        progress_tmp.replace(tmp / PROGRESS_FILE)
        _fsync_dir(tmp)
    if final.exists():
        # Re-saving the same step (e.g. the final step after a resume): swap atomically-ish.
        old = checkpoints_dir / f".old-{checkpoint_name(step)}"
        if old.exists():
            shutil.rmtree(old)
        final.replace(old)
        tmp.replace(final)
        shutil.rmtree(old)
    else:
        tmp.replace(final)
    _fsync_dir(checkpoints_dir)
    return final


def write_checkpoint(checkpoints_dir: Path, step: int, save_state: Callable[[Path], None], progress: dict[str, Any]) -> Path:
    """Write a checkpoint atomically: save into a temp dir, add progress.json, then rename.

    Args:
        save_state: writes the training state into the given (existing, empty) directory.
        progress: JSON-serialisable bookkeeping (step, images seen, config, version...).
    """
    tmp = begin_checkpoint(checkpoints_dir, step)
    with writing(f"checkpoint {checkpoint_name(step)}", checkpoints_dir, [tmp]):  # a failure removes tmp
        save_state(tmp)
    return finish_checkpoint(checkpoints_dir, step, tmp, progress)


def rotate_checkpoints(checkpoints_dir: Path, keep: Optional[int]) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (None keeps all); returns what was deleted."""
    if keep is None:
        return []
    found = list_checkpoints(checkpoints_dir)
    doomed = [path for _, path in found[: max(0, len(found) - keep)]]
    for path in doomed:
        shutil.rmtree(path)
        logger.info("removed old checkpoint %s (checkpoints_total_limit=%d)", path.name, keep)
    return doomed


def remove_stale_temporaries(checkpoints_dir: Path) -> None:
    """Clear half-written checkpoints left by a crash."""
    if not checkpoints_dir.is_dir():
        return
    for entry in checkpoints_dir.iterdir():
        if entry.name.startswith(".old-"):
            restored = checkpoints_dir / entry.name[len(".old-"):]
            if not restored.exists():
                # A crash between the two renames of a re-save: the old copy is the valid one.
                entry.replace(restored)
                continue
        if entry.name.startswith((".tmp-", ".old-")):
            logger.warning("removing incomplete checkpoint %s left by an interrupted run", entry.name)
            shutil.rmtree(entry, ignore_errors=True)


def directory_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def estimate_checkpoint_bytes(checkpoints_dir: Path, state_bytes: int) -> int:
    """Expected size of the next checkpoint: the newest complete one, or `state_bytes` before the first."""
    latest = latest_checkpoint(checkpoints_dir)
    return directory_bytes(latest) if latest is not None else state_bytes


def training_state_bytes(models: Iterable[Any]) -> int:
    """Size estimate of a first checkpoint: each trained parameter four times (weights, two AdamW moments,
    the EMA copy), each frozen one once."""
    return sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for m in models for p in m.parameters())


def ensure_room_for_run(output_dir: Path, models: Iterable[Any]) -> None:
    """Before a run writes anything: `output_dir` takes files and has room for the next checkpoint and the export.

    Without it a run on a full or read-only disk would train until its first checkpoint and lose those steps.
    """
    models = list(models)
    needed = estimate_checkpoint_bytes(output_dir / "checkpoints", training_state_bytes(models)) + state_bytes(models)
    check_writable(output_dir, needed, "the run's next checkpoint and its export", hint=(
        "Free some space or choose an --output-dir on another disk. (The estimate is the previous checkpoint's "
        "size, or the model and optimizer size before the first, plus the exported weights.)"))


def ensure_free_space(directory: Path, needed_bytes: int, what: str) -> None:
    """Raise DiskSpaceError (or WriteError when `directory` cannot be written) before a checkpoint write, then
    create `directory`; the space asked for is `needed_bytes` plus a margin (difftrain.writes.required_bytes)."""
    check_writable(directory, needed_bytes, what, hint=(
        "Free some space (or lower train.checkpoints_total_limit) and run the same command again; it resumes "
        "from the last complete checkpoint. (The estimate is the previous checkpoint's size, or before the first "
        "the model and optimizer size.)"))
    directory.mkdir(parents=True, exist_ok=True)


def verify_checkpoint(checkpoint: Path) -> None:
    """Read every file of a checkpoint without executing anything; raise ValueError naming the first bad one.

    Tensors come from safetensors and pickles only through `torch.load(weights_only=True)`, so a
    truncated file or one holding arbitrary objects is refused before `accelerator.load_state` (which
    reads custom state with weights_only=False) ever sees it.
    """
    import torch
    from accelerate.utils import load as accelerate_load  # weights_only=True plus numpy's RNG types
    from safetensors.torch import load_file

    try:
        progress = read_progress(checkpoint)
        int(progress["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{checkpoint / PROGRESS_FILE}: unreadable ({type(exc).__name__}: {exc})") from exc
    for path in sorted(checkpoint.rglob("*")):
        if not path.is_file() or path.name == PROGRESS_FILE:
            continue
        try:
            if path.suffix == ".safetensors":
                load_file(path)
            elif path.name.startswith("random_states"):
                accelerate_load(path)
            elif path.suffix in (".bin", ".pkl", ".pt", ".pth"):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any reader failure means the file is not a usable checkpoint part
            raise ValueError(f"{path}: cannot be read safely ({type(exc).__name__}: {str(exc)[:200]})") from exc
