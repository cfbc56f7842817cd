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


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (the default in pyproject): one worker per usable CPU, as memory allows. Most tests are
    single-threaded work (imports, subprocess starts, tiny models), so workers beat threads on 2 cores."""
    from difftrain.processes import total_memory_bytes, usable_cpus

    memory_workers = (total_memory_bytes() or 0) // (_GIB_PER_WORKER * 2**30)
    return max(1, min(usable_cpus(), memory_workers))


def _share_cpus_between_workers() -> None:
    """Under pytest-xdist, each worker (and the processes its tests start) gets its share of the CPUs: workers
    that each used every core would slow each other down several times."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    from difftrain.processes import usable_cpus

    threads = max(1, usable_cpus() // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
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
