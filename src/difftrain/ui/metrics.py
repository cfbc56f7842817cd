"""metrics.jsonl for the UI's charts: read incrementally (by byte offset) and thinned for display.

The trainer appends one JSON row per logged step (`{"step", "loss", "lr", "images_per_s", "epoch"}`) or
evaluation (`{"step", "eval": {...}}`) and replaces the whole file when a resume or a rollback trims it
(training/run_files.py). `GrowingFile` follows such a file: each call reads only the bytes appended since the
last one, holds back a last line without its newline (a row being written), and starts over when the file
shrank or was replaced. `MetricsCache.series` gives the `/api/metrics` answer of docs/ui.md; the runs list
(ui/runs.py) reads only `last_train_row` (from the file's end) and `BestEval` (eval rows, incrementally).
"""

from __future__ import annotations

import json
import math
import os
import threading
from array import array
from pathlib import Path
from typing import Any, Optional

import numpy as np

TRAIN_SERIES = ("loss", "lr", "images_per_s")
EVAL_PREFIX = "eval/"
# Eval metrics a run is ranked by when train.keep_best_by is unset: the first one present; lower is better but
# for those in HIGHER_IS_BETTER (training/evaluator.py's rule).
BEST_METRICS = ("fid", "kid", "classifier_fid", "accuracy")
HIGHER_IS_BETTER = {"accuracy"}
_NUMBER_TYPES = {int, float}  # JSON numbers; exact types, so True/False are not
_TAIL_BYTES = 64 * 1024  # first read of last_train_row; doubled until a train row is found
# Bytes just before the read offset that must still be there on the next read; a file rewritten in place (or
# replaced by one reusing the inode number) fails the comparison and is read again from the start.
_ANCHOR_BYTES = 64


class GrowingFile:
    """The complete lines appended to a file since the last `poll`. Not thread-safe: callers lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.key: Optional[tuple[int, int, int, int]] = None  # (dev, inode, size, mtime_ns) at the last read
        self.offset = 0  # bytes of complete lines consumed
        self.anchor = b""  # the last bytes before `offset`

    @property
    def version(self) -> str:
        """Changes whenever the file does (a new inode, size or modification time); "missing" without a file."""
        if self.key is None:
            return "missing"
        dev, ino, size, mtime_ns = self.key
        return f"{dev:x}.{ino:x}.{size:x}.{mtime_ns:x}"

    def poll(self) -> Optional[tuple[bool, list[bytes]]]:
        """None when the file is as at the last call; else (restarted, the new complete lines).

        `restarted` means the lines returned before no longer hold (the file shrank, was replaced or removed):
        the new lines are the whole file's.
        """
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            if self.key is None and self.offset == 0:
                return None
            self.key, self.offset, self.anchor = None, 0, b""
            return True, []
        with f:
            st = os.fstat(f.fileno())  # of the file opened, so a replacement after this is seen next time
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if key == self.key:
                return None
            restarted = self.key is None or self.key[:2] != key[:2] or st.st_size < self.offset \
                or not self._anchor_holds(f)
            if restarted:
                self.offset, self.anchor = 0, b""
            f.seek(self.offset)
            data = f.read(max(st.st_size - self.offset, 0))
        self.key = key
        end = data.rfind(b"\n") + 1  # a last line without its newline is still being written: held back
        complete = data[:end]
        self.offset += end
        self.anchor = (self.anchor + complete[-_ANCHOR_BYTES:])[-_ANCHOR_BYTES:]
        return restarted, complete.splitlines()

    def _anchor_holds(self, f: Any) -> bool:
        if not self.anchor:
            return True
        f.seek(self.offset - len(self.anchor))
        return f.read(len(self.anchor)) == self.anchor


def parse_rows(lines: list[bytes]) -> list[dict]:
    """JSON objects of `lines`; a line that is not one (cut short by a crash, edited) is skipped."""
    if not lines:
        return []
    try:  # one parse for the whole batch is several times faster than one per line
        rows = json.loads(b"[" + b",".join(line for line in lines if line.strip()) + b"]")
    except ValueError:
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return [row for row in rows if isinstance(row, dict)]


def thin_indices(values: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most `max_points` points of `values` that keep its shape for a chart.

    The first and last points are always kept; the others are cut into equal buckets, each giving its smallest
    and its largest value, so a spike or a dip survives any zoom-out. NaN counts as neither (a bucket of NaNs
    keeps one, which a chart shows as a gap).
    """
    if max_points < 2:
        raise ValueError(f"max_points = {max_points}: at least 2 (the first and the last point)")
    n = len(values)
    if n <= max_points:
        return np.arange(n)
    ends = np.array([0, n - 1])
    if max_points < 4:
        return ends
    inner = np.asarray(values[1:n - 1], dtype=np.float64)
    # Buckets of one size, the last one padded, so each bucket's extremes are one vectorised argmin/argmax (a
    # Python loop over 1,000 buckets costs more than the rest of a 100k-row answer).
    size = -(-len(inner) // ((max_points - 2) // 2))
    rows = -(-len(inner) // size)
    padded = np.full(rows * size, np.nan)
    padded[:len(inner)] = inner
    nan = np.isnan(padded)
    # The padding is NaN too: as the first of equal values wins, a bucket of NaNs gives its first, a real point.
    lowest = np.where(nan, np.inf, padded).reshape(rows, size).argmin(axis=1)
    highest = np.where(nan, -np.inf, padded).reshape(rows, size).argmax(axis=1)
    starts = np.arange(rows) * size
    return np.unique(np.concatenate([ends, 1 + starts + lowest, 1 + starts + highest]))


def _finite_or_none(values: np.ndarray) -> list[Optional[float]]:
    """JSON has no NaN or infinity (the API answer is strict JSON): those become null, a gap in the chart."""
    return [v if math.isfinite(v) else None for v in values.tolist()]


class _Series:
    """One metrics.jsonl: its follower and every series read so far, plus the last answer given."""

    def __init__(self, path: Path):
        self.lock = threading.Lock()  # one reader of the file at a time; other files are read meanwhile
        self.file = GrowingFile(path)
        self.num_rows = 0
        self.points: dict[str, tuple[array, array]] = {}  # name -> (steps, values), doubles
        self.answers: dict[int, dict] = {}  # max_points -> answer, for the current version

    def update(self) -> None:
        polled = self.file.poll()
        if polled is None:
            return
        restarted, lines = polled
        self.answers.clear()
        if restarted:
            self.num_rows, self.points = 0, {}
        rows = parse_rows(lines)
        self.num_rows += len(rows)
        points = self.points
        # The hot loop of a first read (100k rows): exact type tests (a bool is no number), no per-row objects.
        for row in rows:
            step = row.get("step")
            if step.__class__ not in _NUMBER_TYPES:
                continue
            for name in TRAIN_SERIES:
                value = row.get(name)
                if value.__class__ in _NUMBER_TYPES:
                    pair = points.get(name)
                    if pair is None:
                        pair = points[name] = (array("d"), array("d"))
                    pair[0].append(step)
                    pair[1].append(value)
            report = row.get("eval")
            if report.__class__ is dict:
                for key, value in report.items():
                    if value.__class__ in _NUMBER_TYPES and not _is_count(key):
                        name = EVAL_PREFIX + key
                        pair = points.get(name)
                        if pair is None:
                            pair = points[name] = (array("d"), array("d"))
                        pair[0].append(step)
                        pair[1].append(value)

    def answer(self, max_points: int) -> dict:
        if max_points not in self.answers:
            series = {}
            for name, (xs, ys) in self.points.items():
                x, y = np.array(xs), np.array(ys)  # copies: an array('d') exporting its buffer cannot grow
                keep = thin_indices(y, max_points)
                series[name] = {"x": [int(v) if v.is_integer() else v for v in x[keep].tolist()],
                                "y": _finite_or_none(y[keep])}
            self.answers = {max_points: {"version": self.version(max_points), "num_rows": self.num_rows,
                                         "series": series}}
        return self.answers[max_points]

    def version(self, max_points: int) -> str:
        # The thinning is part of the answer: another max_points is another answer of the same file.
        return f"{self.file.version}/{max_points}"


class MetricsCache:
    """`/api/metrics` answers for any number of metrics.jsonl files, each read once and then incrementally.

    Safe to call from several threads (the web server's workers).
    """

    def __init__(self) -> None:
        self._files: dict[Path, _Series] = {}
        self._lock = threading.Lock()

    def series(self, path: Path, max_points: int = 2000, version: Optional[str] = None) -> dict:
        """`{"version", "num_rows", "series": {NAME: {"x": [step], "y": [value]}}}` of the metrics file at `path`,
        each series thinned to at most `max_points` (`thin_indices`), or `{"unchanged": true, "version"}` when
        `version` is the current one. NAME: loss, lr, images_per_s, eval/METRIC for every numeric eval value.
        A missing file answers no series (a run that has not logged yet). The answer is shared with later callers
        until the file changes: read it, do not modify it."""
        if max_points < 2:
            raise ValueError(f"max_points = {max_points}: at least 2 (the first and the last point)")
        path = Path(path)
        with self._lock:
            entry = self._files.get(path)
            if entry is None:
                entry = self._files[path] = _Series(path)
        with entry.lock:
            entry.update()
            current = entry.version(max_points)
            if version is not None and version == current:
                return {"unchanged": True, "version": current}
            return entry.answer(max_points)


def last_train_row(path: Path) -> Optional[dict]:
    """The last row of metrics.jsonl with a loss, read backwards from the end (the file may hold 100k rows)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        end = f.seek(0, os.SEEK_END)
        chunk, carry = _TAIL_BYTES, b""
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            lines = (f.read(end - start) + carry).split(b"\n")
            carry = lines.pop(0) if start > 0 else b""  # a line cut by the chunk's start: read with the next one
            for line in reversed(lines):
                if b'"loss"' not in line:
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a row being written, or one cut short by a crash
                if isinstance(row, dict) and isinstance(row.get("step"), int) and "loss" in row:
                    return row
            end, chunk = start, chunk * 2
    return None


def finite(value: Any) -> Optional[float]:
    """A finite JSON number as a float, else None (booleans too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class BestEval:
    """The best value of each BEST_METRICS eval metric in a metrics.jsonl, read incrementally."""

    def __init__(self, path: Path):
        self.file = GrowingFile(path)
        self.best: dict[str, tuple[float, int]] = {}  # metric -> (value, step)

    def update(self) -> Optional[dict[str, Any]]:
        polled = self.file.poll()
        if polled is not None:
            restarted, lines = polled
            if restarted:
                self.best = {}
            for line in lines:
                if b'"eval"' not in line:  # train rows are most rows: not parsed
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                report = row.get("eval") if isinstance(row, dict) else None
                if not isinstance(report, dict) or not isinstance(row.get("step"), int):
                    continue
                for metric in BEST_METRICS:
                    value = finite(report.get(metric))
                    old = self.best.get(metric)
                    if value is not None and (old is None or (value > old[0] if metric in HIGHER_IS_BETTER
                                                              else value < old[0])):
                        self.best[metric] = (value, row["step"])
        for metric in BEST_METRICS:
            if metric in self.best:
                value, step = self.best[metric]
                return {"metric": metric, "value": value, "step": step}
        return None


def _is_count(key: str) -> bool:
    """Report fields that count samples (num_samples, classifier_num_test): settings, not curves worth a chart."""
    return key.startswith("num_") or "_num_" in key
