"""A kept checkpoint as a pipeline folder: what the run's export would have been at that step.

`export_checkpoint(run_dir, "step-000200")` rebuilds the run's training setup from the config saved in the
checkpoint (the family, its data and models, the objective: `training/setup.py`, as training builds them), loads
the checkpoint's state into it, copies the EMA weights in when the run keeps an EMA, and calls the family's own
`export` into `RUN_DIR/.difftrain/exports/step-000200/`. The folder is written under a temporary name and renamed
(never half there), and reused while it was made from the checkpoint as it is now.

It reads the run folder and writes only under `.difftrain/exports/`: it takes no lock and never writes into
`checkpoints/`, so a trainer may be writing to the same folder meanwhile. A checkpoint the trainer rotates away
while it is read is one error naming the checkpoints kept now.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from difftrain.training import checkpoint as ckpt
from difftrain.training.progress import PROGRESS_FILE, read_progress
from difftrain.training.run_dir import MARKER_DIR
from difftrain.writes import save_folder_atomically, state_bytes

logger = logging.getLogger(__name__)

EXPORTS = "exports"
SOURCE_FILE = "exported_from.json"
"""Written last into each export: the checkpoint it came from and that checkpoint's progress.json time."""
LATEST = "latest"
# A temporary of an exporter that died is removed by the next export after this long (a live export is faster).
_STALE_TEMPORARY_S = 6 * 3600


def exports_dir(run_dir: Path) -> Path:
    return Path(run_dir) / MARKER_DIR / EXPORTS


def kept_checkpoints(run_dir: Path) -> list[str]:
    """Names of the run's complete checkpoints, oldest first."""
    return [path.name for _, path in ckpt.list_checkpoints(Path(run_dir) / "checkpoints")]


def _kept_text(run_dir: Path) -> str:
    kept = kept_checkpoints(run_dir)
    return f"kept: {', '.join(kept)} (or '{LATEST}')" if kept else "it keeps none"


def resolve_checkpoint(run_dir: Path, name: str) -> Path:
    """The checkpoint folder `name` names: a kept checkpoint's name (`step-000200`), its step (`200`) or `latest`.

    Raises ValueError naming the checkpoints kept, or FileNotFoundError when the run keeps none.
    """
    run_dir = Path(run_dir)
    found = ckpt.list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise FileNotFoundError(f"checkpoint {name!r}: {run_dir} keeps no checkpoints (no checkpoints/step-N/ "
                                "with a progress.json)")
    wanted = str(name).strip()
    if wanted == LATEST:
        return found[-1][1]
    if wanted.isdigit():
        wanted = ckpt.checkpoint_name(int(wanted))
    for _, path in found:
        if path.name == wanted:
            return path
    raise ValueError(f"checkpoint {name!r}: not a checkpoint {run_dir} keeps; {_kept_text(run_dir)}")


def _progress_time(checkpoint: Path) -> Optional[int]:
    try:
        return (checkpoint / PROGRESS_FILE).stat().st_mtime_ns
    except OSError:
        return None


def _is_fresh(export: Path, checkpoint_time: Optional[int]) -> bool:
    """Whether `export` was made from the checkpoint as it is now (a re-saved step has a newer progress.json)."""
    try:
        source = json.loads((export / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    made_from = source.get("progress_mtime_ns") if isinstance(source, dict) else None
    return checkpoint_time is not None and isinstance(made_from, int) and made_from >= checkpoint_time


def export_checkpoint(run_dir: Path, name: str) -> Path:
    """The pipeline folder (or LoRA weights) of checkpoint `name` of `run_dir`, exported now unless already there.

    `name` as `resolve_checkpoint` takes it. Raises ValueError/FileNotFoundError with one line: an unknown name, a
    checkpoint removed while it was read, a run whose setup cannot be rebuilt here (its data or base model moved).
    """
    run_dir = Path(run_dir)
    checkpoint = resolve_checkpoint(run_dir, name)
    target = exports_dir(run_dir) / checkpoint.name
    checkpoint_time = _progress_time(checkpoint)
    if _is_fresh(target, checkpoint_time):
        return target
    _remove_leftovers(run_dir)
    logger.info("exporting %s of %s into %s", checkpoint.name, run_dir, target)
    tmp = target.with_name(f".tmp-{checkpoint.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _export(run_dir, checkpoint, checkpoint_time, target, tmp)
    except OSError:
        if _is_fresh(target, checkpoint_time):  # another process installed the same export first
            return target
        raise
    return target


def _gone(run_dir: Path, checkpoint: Path, checkpoint_time: Optional[int]) -> Optional[str]:
    """Why the checkpoint read is no longer the one asked for (removed or re-saved meanwhile), else None."""
    now = _progress_time(checkpoint)
    if now is None:
        return (f"checkpoint {checkpoint.name} of {run_dir} was removed while it was read (the trainer keeps the "
                f"newest train.checkpoints_total_limit checkpoints); {_kept_text(run_dir)}")
    if now != checkpoint_time:
        return (f"checkpoint {checkpoint.name} of {run_dir} was written again while it was read; "
                "sample it again")
    return None


def _export(run_dir: Path, checkpoint: Path, checkpoint_time: Optional[int], target: Path, tmp: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="difftrain-export-") as scratch:
        try:
            built = _RebuiltRun(run_dir, checkpoint, Path(scratch))
        except Exception as exc:  # noqa: BLE001 - whatever fails, the reason is one line naming the checkpoint
            reason = _gone(run_dir, checkpoint, checkpoint_time)
            if reason is not None:
                raise FileNotFoundError(reason) from exc
            why = " ".join(str(exc).split())  # one line, as the CLI prints it (a ConfigError lists one per line)
            raise ValueError(f"cannot export {checkpoint.name} of {run_dir}: rebuilding its training setup from the "
                             f"checkpoint's config failed ({type(exc).__name__}: {why})") from exc
        try:
            reason = _gone(run_dir, checkpoint, checkpoint_time)
            if reason is not None:
                raise FileNotFoundError(reason)

            def save(folder: Path) -> None:
                built.export(folder)
                (folder / SOURCE_FILE).write_text(json.dumps({
                    "checkpoint": checkpoint.name, "step": built.step, "progress_mtime_ns": checkpoint_time,
                    "ema": built.uses_ema}, indent=2) + "\n")

            save_folder_atomically(target, tmp, f"the export of {checkpoint.name}", built.export_bytes(), save)
        finally:
            built.close()
    _prune(run_dir)


class _ReadOnlyRun:
    """Stands in for the run folder and the process state in `family.prepare_after_data`: the run's files are read
    (a latent run's trained VAE) and nothing is written, so a stage the run has not finished is not run from here
    (a process that is not the main one never trains the VAE stage; it only loads what the run saved)."""

    is_main_process = False

    def __init__(self, path: Path, device: Any):
        self.path = path
        self.device = device

    def start(self) -> None:
        raise ValueError(f"{self.path}: exporting a checkpoint never writes the run's own files")

    def wait_for_everyone(self) -> None:
        pass


class _RebuiltRun:
    """The run's family, objective and trainables as training builds them, with the checkpoint's state loaded."""

    def __init__(self, run_dir: Path, checkpoint: Path, scratch: Path):
        import dataclasses

        from difftrain.config import config_from_dict
        from difftrain.families import family_for
        from difftrain.processes import process_state
        from difftrain.training.setup import build_objective, build_trainables, make_accelerator, plan_run

        record = read_progress(checkpoint)
        self.step = record.step
        # The config the checkpoint was trained with, mixed precision as that run resolved it; the folder as it is
        # now (a run folder may have moved since).
        cfg = config_from_dict({**record.config, "output_dir": str(run_dir)})
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=False))  # nothing runs forward
        self.family = family = family_for(cfg)
        family.check_files()
        plan = plan_run(cfg, family)
        family.prepare_after_data(_ReadOnlyRun(run_dir, None), _ReadOnlyRun(run_dir, process_state().device))
        # The Accelerator's project folder is a scratch one: nothing of accelerate's lands in the run folder.
        self.accelerator = make_accelerator(cfg, scratch)
        try:
            self.objective = build_objective(cfg, family)
            self.parts = build_trainables(cfg, family, plan.max_steps, self.accelerator)
            # Every file read weights-only first, as a resume does: load_state unpickles custom state (the EMA).
            ckpt.verify_checkpoint(checkpoint)
            options = {"strict": False} if self.parts.partial_checkpoints else {}
            self.accelerator.load_state(str(checkpoint), **options)
        except BaseException:
            self.close()
            raise
        self.uses_ema = self.parts.ema is not None
        self.network = self.accelerator.unwrap_model(self.parts.network)
        if self.parts.ema is not None:  # the weights the export writes: the EMA's, as finish_run's EmaWeights
            self.parts.ema.copy_to(self.parts.ema_parameters(self.accelerator))
        self.network.eval()

    def export(self, folder: Path) -> None:
        self.family.export(self.network, self.objective, folder)

    def export_bytes(self) -> int:
        return state_bytes(self.parts.trained + self.parts.frozen)

    def close(self) -> None:
        self.accelerator.end_training()


def _remove_leftovers(run_dir: Path) -> None:
    """Temporaries of exporters that died long ago (a live one finishes well before)."""
    folder = exports_dir(run_dir)
    if not folder.is_dir():
        return
    now = time.time()
    for entry in folder.iterdir():
        try:
            old = now - entry.stat().st_mtime > _STALE_TEMPORARY_S
        except OSError:
            continue
        if entry.name.startswith(".tmp-") and old:
            shutil.rmtree(entry, ignore_errors=True)


def _prune(run_dir: Path) -> None:
    """Remove the exports of checkpoints the run no longer keeps: they can no longer be asked for."""
    folder = exports_dir(run_dir)
    kept = set(kept_checkpoints(run_dir))
    for entry in folder.iterdir() if folder.is_dir() else ():
        if ckpt.CHECKPOINT_RE.match(entry.name) and entry.name not in kept and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
