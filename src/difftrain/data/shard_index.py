"""Finding and counting the shards of a streamed set, with the counts cached on disk.

Counting is the only start-up work of a streamed set: a tar shard's header pass, a parquet footer (and the label
column, when labels are wanted and the schema does not name the classes). It runs in parallel
(`data.decode_workers`: processes for local tar shards, whose header parsing is Python; threads for parquet and
the hub, which wait on I/O) and its result is kept per shard under the data cache folder, keyed by the shard's
path, size and modification time (or hub blob id), so a later run reindexes only new or changed shards.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import multiprocessing
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

from difftrain.config import DataConfig
from difftrain.data.disk_cache import cache_dir
from difftrain.data.shards import ColumnError, index_parquet, index_tar
from difftrain.writes import atomic_write_text

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
PARQUET_CONVERSION = "refs/convert/parquet"


def list_shards(cfg: DataConfig, kind: str) -> tuple[Any, list[str], str]:
    """(file system, shard paths in id order, description) of `cfg.path` for a streamed `kind`."""
    if kind == "hub":
        fs, files = hub_parquet_files(cfg.path, cfg.split)
        return fs, files, f"hub data set {cfg.path} [{cfg.split}]"
    import fsspec

    ext = ".tar" if kind == "webdataset" else ".parquet"
    path = str(Path(cfg.path).expanduser())
    local = Path(path)
    if any(c in path for c in "*?["):
        found = glob.glob(path)
    elif local.is_dir():
        found = [str(p) for p in local.iterdir() if not p.name.startswith(".")]
    elif local.is_file():
        found = [path]
    else:
        raise FileNotFoundError(f"data.path = {cfg.path!r}: no such folder or file (data.source = {cfg.source!r})")
    files = sorted(p for p in found if p.lower().endswith(ext))
    if not files:
        raise FileNotFoundError(f"data.path = {cfg.path!r}: no {ext} files there (data.source = {cfg.source!r})")
    return fsspec.filesystem("file"), files, f"{kind} shards {cfg.path}"


def hub_split_files(paths: list[str], split: str) -> list[str]:
    """The parquet files of `split` among a repo's paths (relative to the repo root), of one config.

    Layouts: the parquet conversion's `config/split/0000.parquet` (`config/partial-split/...` for a partial
    conversion of a large set), older `config/name-split.parquet`, and files in the main revision such as
    `data/split-00000-of-00004.parquet` or `split/0000.parquet`. With several configs, 'default' or else the first.
    """
    def is_split(path: str) -> bool:
        *folders, name = path.split("/")
        stem = name.rsplit(".", 1)[0]
        return (split in folders or f"partial-{split}" in folders or stem == split or stem.startswith(f"{split}-")
                or stem.endswith(f"-{split}") or f"-{split}-" in stem)

    matching = sorted(p for p in paths if p.endswith(".parquet") and is_split(p))
    configs = sorted({p.split("/")[0] for p in matching if "/" in p})
    if len(configs) > 1:
        config = "default" if "default" in configs else configs[0]
        matching = [p for p in matching if p.startswith(f"{config}/")]
    return matching


def hub_parquet_files(repo: str, split: str) -> tuple[Any, list[str]]:
    """HfFileSystem and the paths of `repo`'s parquet files of `split`: the parquet conversion, else the main
    revision's own parquet files."""
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem()
    problems = []
    for revision in (PARQUET_CONVERSION, None):
        root = f"datasets/{repo}" + (f"@{quote(revision, safe='')}" if revision else "")
        try:
            found = fs.glob(f"{root}/**/*.parquet")
        except (OSError, ValueError) as exc:  # no such repo or revision, offline, no access
            problems.append(f"{revision or 'main'}: {type(exc).__name__}: {exc}")
            continue
        relative = {fs.resolve_path(p).path_in_repo: p for p in found}
        files = hub_split_files(list(relative), split)
        if files:
            return fs, [relative[p] for p in files]
        problems.append(f"{revision or 'main'}: no parquet files of split {split!r}")
    raise FileNotFoundError(f"data.path = {repo!r} (data.streaming = true): no parquet files to stream ("
                            + "; ".join(problems) + ")")


def _shard_key(fs: Any, path: str, kind: str, want_labels: bool, label_column: Optional[str]) -> str:
    info = fs.info(path)
    lfs = info.get("lfs") or {}
    described = {"format": INDEX_FORMAT, "kind": kind, "path": str(path), "size": info.get("size"),
                 "mtime": info.get("mtime"), "blob": info.get("blob_id"), "sha256": lfs.get("sha256"),
                 "labels": want_labels, "label_column": label_column}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _index_one(job: tuple) -> tuple[str, Optional[dict], Optional[str], bool]:
    """(path, record, problem, problem is the user's setting) of one shard; never raises, so a bad shard
    cannot stop the pool."""
    kind, fs, path, want_labels, image_column, label_column = job
    try:
        if kind == "webdataset":
            return path, index_tar(fs, path, want_labels), None, False
        return path, index_parquet(fs, path, image_column, label_column), None, False
    except ColumnError as exc:
        return path, None, str(exc), True
    except Exception as exc:  # not a tar / parquet, truncated, unreadable: the shard is skipped by name
        return path, None, f"{type(exc).__name__}: {exc}", False


def _pool(kind: str, fs: Any, workers: int) -> Executor:
    import fsspec.implementations.local

    if kind == "webdataset" and isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
    return ThreadPoolExecutor(max_workers=workers)


def index_shards(fs: Any, files: list[str], kind: str, cfg: DataConfig, want_labels: bool,
                 label_column: Optional[str]) -> tuple[dict[str, dict], list[tuple[str, str]], str]:
    """Records of the usable shards ({path: record}, see shards.index_tar), (path, reason) of the skipped ones
    (each named in a `skipped shard PATH (reason)` warning) and a line saying what was indexed or reused.
    A missing configured column raises ValueError."""
    start = time.perf_counter()
    folder = cache_dir(cfg) / "shard-index"
    records: dict[str, dict] = {}
    keys: dict[str, str] = {}
    problems: dict[str, str] = {}
    for path in files:
        try:
            keys[path] = _shard_key(fs, path, kind, want_labels, label_column)
        except OSError as exc:  # a dangling link, a file removed since listing
            problems[path] = f"{type(exc).__name__}: {exc}"
            continue
        try:
            records[path] = json.loads((folder / f"{keys[path]}.json").read_text())
        except (OSError, ValueError):
            pass
    todo = [p for p in files if p in keys and p not in records]
    jobs = [(kind, fs, p, want_labels, cfg.image_column, label_column) for p in todo]
    if len(jobs) > 1 and cfg.decode_workers > 1:
        with _pool(kind, fs, min(cfg.decode_workers, len(jobs))) as pool:
            results = list(pool.map(_index_one, jobs))
    else:
        results = [_index_one(job) for job in jobs]
    unwritable = None
    for path, record, problem, user_error in results:
        if user_error:
            raise ValueError(problem)
        if record is None:
            problems[path] = str(problem)
            continue
        records[path] = record
        try:
            atomic_write_text(folder / f"{keys[path]}.json", json.dumps(record), "a shard index record")
        except OSError as exc:  # the run works without the cache; the next one indexes again
            unwritable = unwritable or exc
    skipped = [(path, problems[path]) for path in files if path in problems]
    for path, reason in skipped:
        logger.warning("skipped shard %s (%s)", path, reason)
    if unwritable is not None:
        logger.warning("could not save the shard index under %s (%s); the next run indexes again", folder, unwritable)
    summary = (f"shard index: {len(files) - len(todo) - sum(1 for p in problems if p not in keys)} of {len(files)} "
               f"shards reused from {folder}, {len(todo)} indexed in {time.perf_counter() - start:.1f} s, "
               f"{len(skipped)} skipped")
    return records, skipped, summary
