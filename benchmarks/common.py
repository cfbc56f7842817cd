"""Helpers shared by the side-by-side benchmarks: run a child process and read its peak memory, read
difftrain's metrics.jsonl, print a markdown table."""

from __future__ import annotations

import json
import os
import shutil
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
    return run_children([argv], [log_path], env)[0]


def run_children(argvs: Sequence[Sequence[str]], log_paths: Sequence[Path], env: Optional[dict] = None) -> list[dict]:
    """Run several children at the same time (each with its own log) and wait for all of them; each one's
    wall seconds and peak RSS as in `run_child`. Raises RuntimeError if any fails."""
    start = time.perf_counter()
    procs = {}
    for argv, log_path in zip(argvs, log_paths, strict=True):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, **(env or {})})
        procs[proc.pid] = (proc, list(argv), log_path)
    results = {}
    while len(results) < len(procs):
        # wait4 gives this child's own resource use (ru_maxrss folds in the children it waited for). Each pid is
        # waited for by itself: wait4(-1) would also reap children this process started elsewhere (a test
        # worker's or a server's), whose own Popen then never learns their exit code.
        for pid in procs.keys() - results.keys():
            done_pid, status, usage = os.wait4(pid, os.WNOHANG)
            if done_pid == pid:
                exit_code = os.waitstatus_to_exitcode(status)
                procs[pid][0].returncode = exit_code  # reaped here: its Popen must not wait for the pid again
                results[pid] = (time.perf_counter() - start, exit_code, usage)
        if len(results) < len(procs):
            time.sleep(0.02)
    for pid, (_, argv, log_path) in procs.items():
        if results[pid][1] != 0:
            tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-30:])
            raise RuntimeError(f"{' '.join(argv)} exited with {results[pid][1]}; last lines of {log_path}:\n{tail}")
    return [{"wall_seconds": results[pid][0], "peak_rss_mib": results[pid][2].ru_maxrss / 1024} for pid in procs]


def difftrain_cmd(*args: str, num_processes: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "difftrain", "train", *args]
    if num_processes > 1:
        cmd += ["--num-processes", str(num_processes)]
    return cmd


def run_difftrain(preset: str, out: Path, overrides: Sequence[str], num_processes: int = 1) -> dict:
    """Train `preset` into a fresh `out`; the child's usage, its metrics rows, the config.yaml the run saved
    ("config", so overrides and presets cannot disagree with what is reported) and its global batch size."""
    import yaml

    if out.exists():
        shutil.rmtree(out)
    usage = run_child(difftrain_cmd(preset, "--output-dir", str(out), *overrides, num_processes=num_processes),
                      out.with_suffix(".log"))
    rows, evals = read_metrics(out)
    config = yaml.safe_load((out / "config.yaml").read_text())
    train = config["train"]
    global_batch = train["batch_size"] * train["gradient_accumulation_steps"] * num_processes
    return {**usage, "rows": rows, "evals": evals, "config": config, "global_batch": global_batch}


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


def images_per_s_after(step_seconds: Sequence[float], batch_size: int, skip_steps: int) -> float:
    """Images/s of a baseline loop from its per-step seconds, after `skip_steps` warm-up steps."""
    seconds = step_seconds[skip_steps:]
    if not seconds:
        raise ValueError(f"no steps after the {skip_steps} warm-up steps")
    return batch_size * len(seconds) / sum(seconds)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def flops_per_image(unet, text_tokens: int = 0) -> float:
    """Forward plus backward FLOPs of one image through a diffusers UNet (torch.utils.flop_counter), with
    the input shape and conditioning (class label, or `text_tokens` caption tokens) taken from its config."""
    from torch.utils.flop_counter import FlopCounterMode

    from difftrain.models.backbone import network_call
    from difftrain.training.precision import probe_inputs

    x, t, cond = probe_inputs(unet, 1, text_tokens or None, next(unet.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        network_call(type(unet))(unet, x, t, cond).float().square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())
