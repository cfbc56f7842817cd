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
