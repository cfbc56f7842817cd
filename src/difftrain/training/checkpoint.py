"""Training-state checkpoints: the one writer, discovery of the newest one, rotation, verification.

A checkpoint is a directory `checkpoints/step-000500/` holding accelerate's `save_state` output
(model, optimizer, LR schedule, EMA, grad scaler) plus `progress.json` (progress.py). It is written under a
temporary name and renamed only when complete, and `progress.json` is written last, so a crash
mid-write never leaves a directory that looks valid.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from difftrain.errors import DiskSpaceError  # noqa: F401 - raised by ensure_free_space; importable from here
from difftrain.training.progress import PROGRESS_FILE, ProgressRecord, read_progress, write_progress
from difftrain.writes import check_writable, fsync_dir, state_bytes, writing

if TYPE_CHECKING:  # accelerate imports torch; run_dir.py imports this module before torch is needed
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


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


def _begin(tmp: Path) -> None:
    """Create the empty temporary directory a checkpoint is saved into (a crash's leftover is replaced)."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()


def _finish(checkpoints_dir: Path, tmp: Path, final: Path, record: ProgressRecord) -> None:
    """Add progress.json, last, to a saved temporary checkpoint and rename it into place."""
    with writing(f"checkpoint {final.name}", checkpoints_dir, [tmp]):
        write_progress(tmp, record)
    if final.exists():
        # Re-saving the same step (e.g. the final step after a resume): swap atomically-ish.
        old = checkpoints_dir / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        final.replace(old)
        tmp.replace(final)
        shutil.rmtree(old)
    else:
        tmp.replace(final)
    fsync_dir(checkpoints_dir)


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, step: int, record: ProgressRecord,
                    needed_bytes: int, keep: Optional[int]) -> Path:
    """Write checkpoints/step-N atomically with `save_state` called on every rank; returns its path.

    FSDP and DeepSpeed write shards from every rank and DDP writes one RNG file per rank, so all ranks
    save into the main process's temporary directory; only the main process checks the free space
    (`needed_bytes`), creates, completes, renames and rotates it (keeping the newest `keep`, None: all).
    One process takes the same path. Every rank must call it.
    """
    # Imported here: distributed.py imports torch, which this module must not need at import time.
    from difftrain.training.distributed import signal_if_injected

    if record.step != step:
        raise ValueError(f"checkpoint step {step} with a progress record of step {record.step}: they must match")
    name = checkpoint_name(step)
    tmp = checkpoints_dir / f".tmp-{name}"
    final = checkpoints_dir / name
    if accelerator.is_main_process:
        ensure_free_space(checkpoints_dir, needed_bytes, f"checkpoint {name}")
        _begin(tmp)
    accelerator.wait_for_everyone()
    # A failure (ENOSPC mid-write, interrupt) removes the temporary; I/O failures become one WriteError line.
    with writing(f"checkpoint {name}", checkpoints_dir, [tmp] if accelerator.is_main_process else []):
        accelerator.save_state(str(tmp))
        signal_if_injected(step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish(checkpoints_dir, tmp, final, record)
        rotate_checkpoints(checkpoints_dir, keep)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


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
        read_progress(checkpoint)
    except OSError as exc:
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
