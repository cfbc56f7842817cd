"""What the browser test builds and drives: tiny real runs, a synthetic large run, processes, waits."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "images"
# Chromium without these flags keeps trying to reach Google's services (sync, updates, QUIC), which on a closed
# network only costs time and log noise.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}

# The fastest real runs: the tiny class-conditional UNet on scikit-learn digits at 8 px (configs/tiny/).
TINY = "tiny/digits-class"
FINISHED_A = ["train.max_steps=4", "train.sample_every_steps=1"]  # four preview grids for the slider
FINISHED_B = ["train.max_steps=4", "train.learning_rate=3.0e-3"]  # a different curve to compare
# Runs for as long as the module needs it; rare checkpoints and grids keep its disk and CPU use small.
LIVE = ["train.max_steps=100000", "train.checkpoint_every_steps=200", "train.sample_every_steps=25"]

# A folder name full of markup: the page must show it as text (it is user data) and link it correctly.
BROKEN = 'broken <img src=x onerror="window.injected=1"> & #?%'
PERF_GRIDS = 200
PERF_ROWS = 100_000


def find_chromium() -> str | None:
    """A Chromium for playwright: $DIFFTRAIN_CHROMIUM, the system's, or playwright's own download."""
    named = os.environ.get("DIFFTRAIN_CHROMIUM")
    candidates = [named] if named else []
    candidates += ["/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium"),
                   shutil.which("chromium-browser"), shutil.which("google-chrome")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        bundled = p.chromium.executable_path
    return bundled if bundled and os.path.isfile(bundled) else None


def subprocess_env(cache: Path) -> dict[str, str]:
    # One thread per process: the trainers, the server and the browser share the machine's few cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DIFFTRAIN_CACHE": str(cache)}


def train(runs_dir: Path, name: str, overrides: list[str], env: dict, log: Path, nice: bool = False) -> subprocess.Popen:
    command = [sys.executable, "-m", "difftrain", "train", TINY, "--output-dir", str(runs_dir / name), *overrides]
    # The never-ending run yields the CPU to everything the test waits on; it only has to make progress.
    return subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            preexec_fn=(lambda: os.nice(19)) if nice else None)


def stop_process(process: subprocess.Popen, grace_s: float = 60) -> None:
    """A clean stop (SIGINT, as Ctrl-C), then a kill when it does not end in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def stop_pid(pid: int, grace_s: float = 60) -> None:
    """Stop a process this test's server started (a launched trainer outlives the server by design)."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_for(what: str, check, timeout_s: float, interval_s: float = 0.5, logs: tuple[Path, ...] = ()):
    """Poll `check()` until it returns something truthy; fail naming `what` (and the logs' tails) otherwise."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - a server still starting answers with connection errors
            last_error = exc
        time.sleep(interval_s)
    tails = "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.exists())
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error})\n{tails}")


def make_perf_run(source: Path, target: Path) -> None:
    """A run folder with PERF_GRIDS preview grids and PERF_ROWS metrics rows, from a finished run's files."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("samples", "metrics.jsonl", "logs"))
    from PIL import Image

    samples = target / "samples"
    samples.mkdir()
    rng = random.Random(0)
    every = PERF_ROWS // PERF_GRIDS
    for i in range(1, PERF_GRIDS + 1):
        # Small noise images (2 columns x 10 rows of 8 px digits, as the tiny preset's grids): the point is
        # their number, not their size.
        Image.frombytes("L", (16, 80), rng.randbytes(16 * 80)).save(samples / f"step-{i * every:06d}.png")
    lines = []
    for step in range(1, PERF_ROWS + 1):
        lines.append(f'{{"step": {step}, "loss": {0.05 + 0.3 / (1 + step / 2000) + rng.random() * 0.02:.6f}, '
                     f'"lr": {1e-3 * (1 - step / PERF_ROWS):.8f}, "images_per_s": {150 + rng.random() * 10:.3f}, '
                     f'"epoch": {step / 32:.5f}}}')
        if step % 5000 == 0:
            lines.append(json.dumps({"step": step, "eval": {"num_samples": 100, "classifier_fid": 80 / (1 + step / 20000),
                                                            "accuracy": min(1.0, step / PERF_ROWS)}}))
    (target / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    # The copied status says 4 steps; the rows say PERF_ROWS (the runs list shows step / max_steps).
    status_path = target / ".difftrain" / "status.json"
    status = json.loads(status_path.read_text())
    status.update(max_steps=PERF_ROWS, step=PERF_ROWS)
    status_path.write_text(json.dumps(status))


@dataclass
class UiServer:
    url: str
    runs_dir: Path
    live: subprocess.Popen
    logs: list[Path] = field(default_factory=list)

    def api(self, path: str) -> dict:
        return get_json(self.url + path)
