"""Checks of the counts, steps and guidance scales that `difftrain sample` and `difftrain evaluate` take.

Shared by the command line and the library functions (`sample_run`, `evaluate_run`), run before any
model loads. A bad value is named with its option and what is allowed; it is never replaced by a
default (0 steps used to mean "the run's default", a negative count or NaN guidance crashed in torch).
"""

from __future__ import annotations

import math
from typing import Any, Optional


def count_problem(option: str, value: Any, minimum: int = 1) -> Optional[str]:
    """None when `value` is None (the caller's default) or an int >= minimum, else the problem."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return f"{option} {value!r}: must be an integer >= {minimum}"
    return None


def scale_problem(option: str, value: Any) -> Optional[str]:
    """None when `value` is None or a finite number >= 0 (1 = no guidance), else the problem."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return f"{option} {value!r}: must be a finite number >= 0 (1 = no guidance)"
    return None


def raise_problems(*problems: Optional[str]) -> None:
    """One ValueError naming every problem found, on one line."""
    found = [p for p in problems if p]
    if found:
        raise ValueError("; ".join(found))
