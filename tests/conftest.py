"""Shared fixtures: paths to the repo, the shared data sets, and small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Deterministic CPU math and quiet libraries for every test (also in subprocesses).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Memory one pytest-xdist worker may need at its peak (a tiny SDXL run, a browser, a 2-process run's ranks).
_GIB_PER_WORKER = 4


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup v2 CPU quota (a container's 2 CPUs on a
    64-core host count as 2)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (the default in pyproject): one worker per usable CPU, as memory allows. Most tests are
    single-threaded work (imports, subprocess starts, tiny models), so workers beat threads on 2 cores."""
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = _GIB_PER_WORKER
    return max(1, min(usable_cpus(), int(mem_gib // _GIB_PER_WORKER)))


def _share_cpus_between_workers() -> None:
    """Under pytest-xdist, each worker (and the processes its tests start) gets its share of the CPUs: workers
    that each used every core would slow each other down several times."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, usable_cpus() // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


_share_cpus_between_workers()


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def flowers_dir() -> Path:
    path = SHARED_DATA / "flowers" / "train"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture
def mnist_dir() -> Path:
    path = SHARED_DATA / "mnist"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(autouse=True)
def _private_difftrain_cache(tmp_path_factory, monkeypatch):
    """Classifier and reference-feature caches live in a per-session temp dir, never in ~/.cache."""
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "difftrain-cache"))
