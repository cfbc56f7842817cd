"""Which folders under RUNS_DIR are runs, each run's status and summary, and the run page's details (docs/ui.md).

Everything here only reads: the UI never writes into a run folder and never takes or probes its lock (an flock
probe, even a shared one, could make a trainer starting at that moment fail). Whether a trainer holds a folder's
lock is read from /proc/locks (Linux); elsewhere from the pid the lock file records.

A run's summary is cached under the identity of the files it was read from (inode, size, modification time), so
polling 50 runs every 2 s costs a few `stat` calls per run; a training run's metrics.jsonl is read from its tail
(the last train row) and, for the best eval value, incrementally.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import posixpath
import re
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import yaml

from difftrain.training import checkpoint as ckpt
from difftrain.training.run_dir import MARKER_DIR, RUN_FORMAT, legacy_run_version, marker_path
from difftrain.training.status import STATES, STATUS_FILE, read_proc_locks, trainer_holds_lock
from difftrain.ui.metrics import BestEval, GrowingFile, finite, last_train_row

try:  # libyaml's safe loader: a config in 1 ms, not 15 (50 runs are polled every 2 s)
    from yaml import CSafeLoader as SafeLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader

MAX_DEPTH = 3  # levels below RUNS_DIR searched for runs
NOT_SEARCHED = {"checkpoints", "samples", "best"}  # a run's own folders (hidden ones are skipped too)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# In train.log: the loop's start-up line "data: DESCRIPTION, N images (K skipped); model: ..." (INFO, so absent when
# only warnings are logged), and the data modules' warnings naming each file or shard (replayed on every start).
_START_RE = re.compile(rb", \d+ images \((\d+) skipped\); model: ")
_NAMED_RE = re.compile(rb" WARNING difftrain\.data\.[\w.]+: (skipped .*)$")
_TOTAL_RE = re.compile(rb"^skipped \d+ of \d+ images \(")
_GRID_RE = re.compile(r"^step-(\d+)\.png$")


@dataclasses.dataclass
class RunInfo:
    """One run of the runs list (the RunInfo of docs/ui.md)."""

    id: str  # the folder relative to RUNS_DIR, "." for RUNS_DIR itself
    name: str
    kind: Optional[str]  # the model family, e.g. "pixel-class" (from status.json)
    preset: Optional[str]  # the preset name or YAML path the run was started with
    status: str  # training | finished | failed | interrupted | broken
    step: Optional[int] = None
    max_steps: Optional[int] = None
    last_loss: Optional[float] = None
    best: Optional[dict[str, Any]] = None  # {"metric", "value", "step"}
    started: Optional[str] = None  # ISO time
    updated: Optional[float] = None  # unix seconds
    wall_seconds: Optional[float] = None
    error: Optional[str] = None  # the error of a failed run, the reason of a broken one

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_run(folder: Path) -> bool:
    if marker_path(folder).is_file():
        return True
    return (folder / "checkpoints").is_dir() and legacy_run_version(folder) is not None


def resolve_run(runs_dir: Path, run_id: str) -> Path:
    """The folder of run `run_id` (a path relative to RUNS_DIR, "." for RUNS_DIR itself).

    Raises ValueError for an id that is absolute, holds `..` or leads outside RUNS_DIR through a link, and
    FileNotFoundError when no run is there.
    """
    allowed = "a run folder relative to RUNS_DIR ('.' for RUNS_DIR itself), without '..'"
    if not isinstance(run_id, str) or not run_id or "\x00" in run_id or "\\" in run_id:
        raise ValueError(f"run id {run_id!r}: expected {allowed}")
    pure = PurePosixPath(run_id)
    if pure.is_absolute() or ".." in pure.parts:
        raise ValueError(f"run id {run_id!r}: expected {allowed}")
    root = Path(runs_dir).resolve()
    folder = root / pure
    resolved = folder.resolve()
    if resolved != root and not resolved.is_relative_to(root):
        raise ValueError(f"run id {run_id!r} leads outside RUNS_DIR {root} (through a link); expected {allowed}")
    if not resolved.is_dir() or not _is_run(resolved):
        raise FileNotFoundError(f"run id {run_id!r}: no run under {root} (a run folder holds "
                                f"{MARKER_DIR}/run.json, or checkpoints of an older difftrain)")
    return folder


def _walk(root: Path) -> list[tuple[str, Path]]:
    """(id, folder) of every run up to MAX_DEPTH levels below `root` (resolved), in path order."""
    found: list[tuple[str, Path]] = []
    seen: set[Path] = set()

    def visit(folder: Path, parts: tuple[str, ...]) -> None:
        resolved = folder.resolve()
        if resolved in seen or (resolved != root and not resolved.is_relative_to(root)):
            return  # a link out of RUNS_DIR (its files could not be served), or a folder already listed
        seen.add(resolved)
        if _is_run(folder):
            found.append(("/".join(parts) or ".", folder))
            return  # a run's own folders hold no runs
        if len(parts) == MAX_DEPTH:
            return
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") or entry.name in NOT_SEARCHED:
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue
            if is_dir:
                visit(Path(entry.path), (*parts, entry.name))

    visit(root, ())
    return found


# -- reading a run's files -----------------------------------------------------------------------------------------


def _stat_key(path: Path, follow: bool = True) -> Optional[tuple[int, int, int]]:
    """(inode, size, mtime_ns) of `path`, None when it cannot be read."""
    try:
        st = os.stat(path, follow_symlinks=follow)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _json_object(path: Path, shown: str) -> Optional[dict]:
    """The JSON object in `path`, None when absent; ValueError naming it as `shown` otherwise."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{shown} could not be read ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{shown} is not a JSON object (got {type(value).__name__})")
    return value


def _read_marker(folder: Path) -> Optional[dict]:
    record = _json_object(marker_path(folder), f"{MARKER_DIR}/run.json")
    if record is not None and not isinstance(record.get("format"), int):
        raise ValueError(f"{MARKER_DIR}/run.json is not a difftrain run record (no integer 'format')")
    if record is not None and record["format"] > RUN_FORMAT:
        raise ValueError(f"{MARKER_DIR}/run.json has run format {record['format']}; this difftrain reads "
                         f"{RUN_FORMAT} or older")
    return record


def _read_config(folder: Path) -> Optional[dict]:
    path = folder / "config.yaml"
    key = _stat_key(path)
    return None if key is None else _parsed_config(str(path), key)


@functools.lru_cache(maxsize=256)
def _parsed_config(path: str, key: tuple[int, int, int]) -> dict:
    """config.yaml parsed once per version (`key`): YAML is slow enough to matter when 50 runs are polled.
    Callers must not change the dict."""
    try:
        config = yaml.load(Path(path).read_text(), Loader=SafeLoader)
    except yaml.YAMLError as exc:
        raise ValueError(f"config.yaml is not valid YAML ({' '.join(str(exc).split())})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"config.yaml is not a mapping of sections (got {type(config).__name__})")
    return config


def _read_status(folder: Path) -> Optional[dict]:
    record = _json_object(folder / MARKER_DIR / STATUS_FILE, f"{MARKER_DIR}/{STATUS_FILE}")
    if record is not None and record.get("state") not in STATES:
        raise ValueError(f"{MARKER_DIR}/{STATUS_FILE} has no state among {', '.join(STATES)} "
                         f"(got {record.get('state')!r})")
    return record


def _iso_seconds(text: Any) -> Optional[float]:
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def _exported(folder: Path) -> Optional[Path]:
    """The file that marks an export in `folder` (a pipeline's model_index.json or LoRA weights), else None."""
    for name in ("model_index.json", LORA_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    return None


def _derived_status(folder: Path) -> str:
    """A run without status.json (older difftrain): finished when its export is newer than its last checkpoint."""
    export = _exported(folder)
    if export is None:
        return "interrupted"
    kept = ckpt.list_checkpoints(folder / "checkpoints")
    if not kept:
        return "finished"
    return "finished" if export.stat().st_mtime_ns >= (kept[-1][1] / "progress.json").stat().st_mtime_ns \
        else "interrupted"


def _summary(run_id: str, folder: Path, held: bool, scan: BestEval) -> RunInfo:
    name = folder.resolve().name if run_id == "." else PurePosixPath(run_id).name
    info = RunInfo(id=run_id, name=name, kind=None, preset=None, status="interrupted")
    try:
        marker = _read_marker(folder)
        config = _read_config(folder)
        status = _read_status(folder)
    except ValueError as exc:
        info.status, info.error = "broken", str(exc)
        return info
    config = config or (marker or {}).get("config") or {}
    if held:
        info.status = "training"
    elif status is not None:
        # A `training` left behind without the lock held: the process was killed (or its machine went down).
        info.status = "interrupted" if status["state"] == "training" else status["state"]
    else:
        info.status = _derived_status(folder)
    status = status or {}
    info.kind, info.preset = status.get("kind"), status.get("config_source")
    info.max_steps = status.get("max_steps")
    if info.status == "failed":
        info.error = status.get("error") or status.get("error_type") or "failed (no error recorded)"
    row = last_train_row(folder / "metrics.jsonl")
    info.step = row["step"] if row is not None else status.get("step")
    info.last_loss = finite(row.get("loss")) if row is not None else None
    info.best = _best(folder, config, scan)
    info.started = status.get("started") or (marker or {}).get("last_started")
    times = [os.stat(p).st_mtime for p in (folder / "metrics.jsonl", folder / "train.log",
                                          folder / MARKER_DIR / STATUS_FILE) if p.is_file()]
    info.updated = max(times) if times else None
    start = _iso_seconds(status.get("started"))
    end = _iso_seconds(status.get("ended")) if status.get("ended") else info.updated
    info.wall_seconds = round(max(end - start, 0.0), 1) if start is not None and end is not None else None
    return info


def _best(folder: Path, config: dict, scan: BestEval) -> Optional[dict[str, Any]]:
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    key = train.get("keep_best_by")
    if isinstance(key, str):
        try:
            record = _json_object(folder / "best" / "best.json", "best/best.json")
        except ValueError:
            record = None
        metrics = (record or {}).get("metrics")
        if isinstance(metrics, dict) and finite(metrics.get(key)) is not None and isinstance(record.get("step"), int):
            return {"metric": key, "value": finite(metrics[key]), "step": record["step"]}
    return scan.update()


class _SkippedFiles:
    """The files train.log names as skipped, read incrementally: the last start's count where the start-up line
    is there, else the distinct `skipped NAME (reason)` warnings."""

    def __init__(self, path: Path):
        self.file = GrowingFile(path)
        self.last_start: Optional[int] = None
        self.named: set[bytes] = set()

    def count(self) -> Optional[int]:
        polled = self.file.poll()
        if polled is not None:
            restarted, lines = polled
            if restarted:
                self.last_start, self.named = None, set()
            for line in lines:
                if b"skipped" not in line:
                    continue
                start, named = _START_RE.search(line), _NAMED_RE.search(line)
                if start:
                    self.last_start = int(start.group(1))
                elif named and not _TOTAL_RE.match(named.group(1)):
                    self.named.add(named.group(1))
        if self.file.key is None:
            return None
        return self.last_start if self.last_start is not None else len(self.named)


# -- the cache and the public answers ------------------------------------------------------------------------------


class RunsCache:
    """Run summaries keyed by the identity of the files they were read from; safe to share between threads."""

    WATCHED = ("metrics.jsonl", "train.log", "config.yaml", "model_index.json", LORA_WEIGHTS, "checkpoints",
               "best/best.json", f"{MARKER_DIR}/run.json", f"{MARKER_DIR}/{STATUS_FILE}")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Path, tuple[Any, RunInfo]] = {}
        self._scans: dict[Path, BestEval] = {}
        self._skipped: dict[Path, _SkippedFiles] = {}

    def summary(self, run_id: str, folder: Path, locks: Optional[list[tuple[int, int, int, int]]]) -> RunInfo:
        held = trainer_holds_lock(folder, locks)
        key = (run_id, held, tuple(_stat_key(folder / name) for name in self.WATCHED))
        with self._lock:
            cached = self._entries.get(folder)
            if cached is not None and cached[0] == key:
                return cached[1]
            scan = self._scans.setdefault(folder, BestEval(folder / "metrics.jsonl"))
            try:
                info = _summary(run_id, folder, held, scan)
            except Exception as exc:  # one unreadable folder (permissions, a file removed meanwhile) is one broken row
                info = RunInfo(id=run_id, name=PurePosixPath(run_id).name or folder.name, kind=None, preset=None,
                               status="broken", error=f"{type(exc).__name__}: {exc}")
            self._entries[folder] = (key, info)
            return info

    def skipped_count(self, folder: Path) -> Optional[int]:
        """How many files the run's data could not use, from its train.log (None without one)."""
        with self._lock:
            return self._skipped.setdefault(folder, _SkippedFiles(folder / "train.log")).count()

    def keep_only(self, folders: set[Path]) -> None:
        with self._lock:
            for table in (self._entries, self._scans, self._skipped):
                for folder in [f for f in table if f not in folders]:
                    del table[folder]


_DEFAULT_CACHE = RunsCache()


def find_runs(runs_dir: Path, cache: Optional[RunsCache] = None) -> list[RunInfo]:
    """Every run up to three levels below `runs_dir` (and `runs_dir` itself), with its status and summary.

    A folder whose files cannot be read is listed as `broken` with the reason; none makes this fail.
    """
    cache = cache or _DEFAULT_CACHE
    root = Path(runs_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"RUNS_DIR {runs_dir} is not a folder")
    locks = read_proc_locks()
    found = _walk(root)
    cache.keep_only({folder for _, folder in found})
    return [cache.summary(run_id, folder, locks) for run_id, folder in found]


def _rel(run_id: str, *parts: str) -> str:
    return posixpath.join(*parts) if run_id == "." else posixpath.join(run_id, *parts)


def _text(path: Path) -> Optional[str]:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _folder_bytes(folder: Path) -> int:
    keys = (_stat_key(Path(top, name), follow=False) for top, _, files in os.walk(folder) for name in files)
    return sum(key[1] for key in keys if key is not None)


def run_details(runs_dir: Path, run_id: str, cache: Optional[RunsCache] = None) -> dict[str, Any]:
    """The `/api/run` answer of docs/ui.md for run `run_id`; paths relative to RUNS_DIR (posix)."""
    cache = cache or _DEFAULT_CACHE
    folder = resolve_run(runs_dir, run_id)
    run_id = PurePosixPath(run_id).as_posix()
    info = cache.summary(run_id, folder, read_proc_locks())
    checkpoints = ckpt.list_checkpoints(folder / "checkpoints")
    evaluations = []
    for path in sorted(folder.glob("evaluation*.json")):
        try:
            report = _json_object(path, path.name)
        except ValueError:
            report = None  # written atomically by `difftrain evaluate`: only another program leaves it unreadable
        evaluations.append({"name": path.name, "path": _rel(run_id, path.name), "report": report})
    grids = sorted((int(m.group(1)), p.name) for p in (folder / "samples").glob("step-*.png")
                   if (m := _GRID_RE.match(p.name)))
    train_log = folder / "train.log"
    return {
        "run": info.to_json(),
        "config_yaml": _text(folder / "config.yaml"),
        "model_card": _text(folder / "README.md"),
        "checkpoints": [{"name": path.name, "step": step, "bytes": _folder_bytes(path)} for step, path in checkpoints],
        "evaluations": evaluations,
        # Files the data could not use are named in train.log (data/image_dataset.log_skipped).
        "skipped": {"count": cache.skipped_count(folder),
                    "path": _rel(run_id, "train.log") if train_log.is_file() else None},
        "grids": [{"step": step, "path": _rel(run_id, "samples", name)} for step, name in grids],
        "sources": _sources(folder, info, checkpoints),
        "console_log": _rel(run_id, MARKER_DIR, "console.log") if (folder / MARKER_DIR / "console.log").is_file()
        else None,
    }


def _sources(folder: Path, info: RunInfo, checkpoints: list[tuple[int, Path]]) -> list[dict[str, str]]:
    """What `difftrain sample` can load from this run: its export, its best export, each kept checkpoint."""
    export, best, sources = _exported(folder), _exported(folder / "best"), []
    if export is not None:
        what = "LoRA weights" if export.name == LORA_WEIGHTS else "pipeline"
        sources.append({"name": "export", "label": f"export ({what})"})
    if best is not None:
        label = f"best by {info.best['metric']}: {info.best['value']:.4g} at step {info.best['step']}" \
            if info.best is not None else "best"
        sources.append({"name": "best", "label": label})
    sources.extend({"name": f"checkpoint:{path.name}", "label": f"checkpoint at step {step}"}
                   for step, path in checkpoints)
    return sources

