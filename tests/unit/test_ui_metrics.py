"""metrics.jsonl for the UI: thinning keeps extremes and endpoints, incremental reads equal a full read, a file
trimmed by a resume is read again, a row still being written is held back. Rows are written by the trainer's
own writer and trimmer (training/run_files.MetricsLog)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from difftrain.training.run_files import MetricsLog
from difftrain.ui.metrics import BestEval, MetricsCache, last_train_row, thin_indices

ALL = 10**9  # max_points that thins nothing


def _train_row(step: int, rng: np.random.Generator) -> dict:
    return {"step": step, "loss": float(rng.random()), "lr": 1e-3 * (1 - step / 1e6),
            "images_per_s": float(100 + rng.random()), "epoch": step / 1000}


def _eval_row(step: int, fid: float, accuracy: float) -> dict:
    return {"step": step, "eval": {"num_samples": 100, "fid": fid, "kid": fid / 1000, "accuracy": accuracy,
                                   "inception": "/path/default_1.pt"}}


def _write(path: Path, steps: range, seed: int = 0, eval_every: int = 0) -> None:
    log, rng = MetricsLog(path, writes=True), np.random.default_rng(seed)
    for step in steps:
        log.append(_train_row(step, rng))
        if eval_every and step % eval_every == 0:
            log.append(_eval_row(step, fid=100.0 / step, accuracy=min(1.0, step / 1000)))


def _full(path: Path, max_points: int = ALL) -> dict:
    answer = MetricsCache().series(path, max_points=max_points)
    return {k: v for k, v in answer.items() if k != "version"}


def test_thinning_keeps_endpoints_and_every_local_extreme():
    rng = np.random.default_rng(1)
    values = np.cumsum(rng.normal(size=100_000))
    values[500:520] = np.nan  # logged NaN losses are no extreme
    # 150 spikes and 150 dips, 300 points apart, each far beyond its neighbourhood: thinning 100k points to 2000
    # (buckets of about 100) must keep every one, wherever its bucket boundaries fall.
    positions = np.arange(1000, 91_000, 300) + rng.integers(-100, 100, size=300)
    signs = rng.permutation(np.repeat([1.0, -1.0], 150))
    values[positions] += signs * 1000
    for max_points in (2, 3, 4, 10, 2000):
        keep = thin_indices(values, max_points)
        assert len(keep) <= max_points and keep[0] == 0 and keep[-1] == len(values) - 1
        assert np.all(np.diff(keep) > 0)
        if max_points >= 4:
            assert np.nanargmax(values) in keep and np.nanargmin(values) in keep
    keep = set(thin_indices(values, 2000).tolist())
    assert [p for p in positions if p not in keep] == []
    assert not any(np.isnan(values[k]) for k in keep if k not in range(500, 520))
    assert list(thin_indices(values[:7], 7)) == list(range(7))
    with pytest.raises(ValueError, match="max_points = 1"):
        thin_indices(values, 1)
    # A stretch of NaN longer than a bucket keeps a point of it, shown as a gap (null) in the chart.
    gap = np.arange(10_000, dtype=np.float64)
    gap[3000:6000] = np.nan
    keep = thin_indices(gap, 100)
    assert any(3000 <= k < 6000 for k in keep) and {0, 9999} <= set(keep.tolist())


def test_incremental_reads_equal_a_full_read(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    cache = MetricsCache()
    assert cache.series(path)["series"] == {} and cache.series(path)["num_rows"] == 0  # not logged yet
    _write(path, range(1, 301), eval_every=50)
    first = cache.series(path, max_points=ALL)
    # num_samples counts samples: no chart for it
    assert sorted(first["series"]) == ["eval/accuracy", "eval/fid", "eval/kid", "images_per_s",
                                       "loss", "lr"]
    assert first["num_rows"] == 306 and first["series"]["eval/fid"]["x"] == [50, 100, 150, 200, 250, 300]
    last = 300
    for end in (302, 450, 900):  # appended in pieces, read after each
        _write(path, range(last + 1, end), seed=end, eval_every=50)
        last = end - 1
        incremental = cache.series(path, max_points=ALL)
        assert {k: v for k, v in incremental.items() if k != "version"} == _full(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert incremental["series"]["loss"]["y"] == [r["loss"] for r in rows if "loss" in r]
    thinned = cache.series(path, max_points=50)
    assert {k: v for k, v in thinned.items() if k != "version"} == _full(path, 50)
    assert len(thinned["series"]["loss"]["x"]) <= 50 and thinned["series"]["loss"]["x"][-1] == 899


def test_version_says_when_nothing_changed(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    _write(path, range(1, 11))
    cache = MetricsCache()
    version = cache.series(path, max_points=100)["version"]
    assert cache.series(path, max_points=100, version=version) == {"unchanged": True, "version": version}
    assert "series" in cache.series(path, max_points=5, version=version)  # another thinning, another answer
    _write(path, range(11, 12))
    answer = cache.series(path, max_points=100, version=version)
    assert answer["version"] != version and answer["series"]["loss"]["x"][-1] == 11


def test_a_trimmed_or_rewritten_file_is_read_again(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    _write(path, range(1, 101), seed=1, eval_every=20)
    cache = MetricsCache()
    cache.series(path, max_points=ALL)
    MetricsLog(path, writes=True).trim(60)  # a resume from step 60: a new file without the later rows
    _write(path, range(61, 81), seed=2)  # ... which the resumed run logs again, other values
    answer = cache.series(path, max_points=ALL)
    assert answer["series"]["loss"]["x"] == list(range(1, 81))
    assert answer["series"]["eval/fid"]["x"] == [20, 40, 60]
    assert {k: v for k, v in answer.items() if k != "version"} == _full(path)

    # Rewritten in place (same inode) and longer than before: the bytes before the offset differ, so it is reread.
    inode = path.stat().st_ino
    path.write_text("")
    _write(path, range(1, 121), seed=3)
    assert path.stat().st_ino == inode
    answer = cache.series(path, max_points=ALL)
    assert answer["series"]["loss"]["x"] == list(range(1, 121)) and "eval/fid" not in answer["series"]
    assert answer == {**_full(path), "version": answer["version"]}
    path.unlink()
    assert cache.series(path)["series"] == {}


def test_a_row_still_being_written_is_held_back(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    _write(path, range(1, 6))
    cache = MetricsCache()
    assert cache.series(path)["num_rows"] == 5
    row = json.dumps({"step": 6, "loss": float("nan"), "lr": 1e-3, "images_per_s": 10.0, "epoch": 0.1}) + "\n"
    with open(path, "a") as f:
        f.write(row[:20])
    answer = cache.series(path)
    assert answer["num_rows"] == 5 and answer["series"]["loss"]["x"][-1] == 5
    assert last_train_row(path)["step"] == 5
    with open(path, "a") as f:
        f.write(row[20:])
    answer = cache.series(path)
    # NaN is logged for a stretch of skipped steps; JSON has none, the chart gets a gap.
    assert answer["num_rows"] == 6 and answer["series"]["loss"]["x"][-1] == 6
    assert answer["series"]["loss"]["y"][-1] is None
    json.dumps(answer, allow_nan=False)
    assert math.isnan(last_train_row(path)["loss"])


def test_last_train_row_and_best_eval(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    _write(path, range(1, 1001), eval_every=100)
    log = MetricsLog(path, writes=True)
    for step in range(1001, 2000):  # 100 KiB of eval rows after the last train row: more than one tail read
        log.append(_eval_row(step, fid=50.0, accuracy=0.5))
    assert os.path.getsize(path) - path.read_text().rindex('"loss"') > 100_000
    assert last_train_row(path) == [json.loads(line) for line in path.read_text().splitlines() if "loss" in line][-1]
    best = BestEval(path)
    assert best.update() == {"metric": "fid", "value": 0.1, "step": 1000}
    assert best.best["accuracy"] == (1.0, 1000) and best.best["kid"] == (0.0001, 1000)
    MetricsLog(path, writes=True).trim(500)
    assert best.update() == {"metric": "fid", "value": 0.2, "step": 500}
    assert last_train_row(tmp_path / "none.jsonl") is None


def test_reading_100k_rows_is_fast(tmp_path: Path):
    """Prints the first-read and incremental times (run with -s); the numbers are reported, not asserted."""
    path = tmp_path / "metrics.jsonl"
    rng = np.random.default_rng(0)
    rows = [json.dumps(_train_row(step, rng)) for step in range(1, 100_001)]
    rows += [json.dumps(_eval_row(step, 10.0, 0.5)) for step in range(1000, 100_001, 1000)]
    path.write_text("\n".join(rows) + "\n")
    cache = MetricsCache()
    start = time.perf_counter()
    answer = cache.series(path)
    first_s = time.perf_counter() - start
    _write(path, range(100_001, 100_101), seed=3)
    start = time.perf_counter()
    cache.series(path, version=answer["version"])
    incremental_s = time.perf_counter() - start
    start = time.perf_counter()
    cache.series(path, version=cache.series(path)["version"])
    unchanged_s = time.perf_counter() - start
    start = time.perf_counter()
    row = last_train_row(path)
    tail_s = time.perf_counter() - start
    assert answer["num_rows"] == 100_100 and row["step"] == 100_100
    print(f"\nmetrics.jsonl {path.stat().st_size / 2**20:.1f} MiB, 100,100 rows: first read + thinning to 2000 "
          f"{first_s * 1000:.0f} ms; 100 rows appended {incremental_s * 1000:.1f} ms; unchanged "
          f"{unchanged_s * 1000:.2f} ms; last train row from the tail {tail_s * 1000:.2f} ms")
