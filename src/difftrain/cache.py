"""Where difftrain keeps what it computes once per machine (classifiers, reference features, speed probes)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$DIFFTRAIN_CACHE, else ~/.cache/difftrain."""
    return Path(os.environ.get("DIFFTRAIN_CACHE", Path.home() / ".cache" / "difftrain"))
