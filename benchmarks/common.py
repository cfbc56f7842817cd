"""Helpers shared by the side-by-side benchmarks: run a child process and read its peak memory, read
difftrain's metrics.jsonl, print a markdown table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def run_child(argv: Sequence[str], log_path: Path, env: Optional[dict] = None) -> dict:
    """Run argv to completion with output to log_path; wall seconds and peak RSS (largest process, MiB).

    Raises RuntimeError with the log's tail when the child fails, so a broken side is never reported as slow.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        # wait4 gives this child's own resource use (ru_maxrss folds in the children it waited for).
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(argv)} exited with {code}; last lines of {log_path}:\n{tail}")
    return {"wall_seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def difftrain_cmd(*args: str, num_processes: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "difftrain", "train", *args]
    if num_processes > 1:
        cmd += ["--num-processes", str(num_processes)]
    return cmd


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training log rows, evaluation rows) of a difftrain run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval" in r]


def train_seconds_at(train_rows: list[dict], batch_size: int) -> dict[int, float]:
    """Cumulative training seconds (maintenance excluded, as difftrain logs images/s) at each logged step."""
    total, previous, out = 0.0, 0, {}
    for row in train_rows:
        total += (row["step"] - previous) * batch_size / row["images_per_s"]
        previous = row["step"]
        out[row["step"]] = total
    return out


def steady_images_per_s(train_rows: list[dict], skip_steps: int) -> float:
    """Images/s over the logged intervals after the first `skip_steps` steps (warm-up)."""
    rows = [r for r in train_rows if r["step"] > skip_steps]
    if not rows:
        raise ValueError(f"no logged steps after the {skip_steps} warm-up steps")
    seconds = sum(1 / r["images_per_s"] for r in rows)  # per image, one logged interval each
    return len(rows) / seconds


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)
