"""The peak memory of one piece of work (a training step): what `difftrain check` prints and a benchmark can reuse.

On CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (the tensors' bytes, not the caching
allocator's reserve). On Linux without CUDA: the process's resident-set high-water mark, reset before the work by
writing "5" to /proc/self/clear_refs and read from VmHWM in /proc/self/status after it, with the resident size before
it, so the work's own increase shows. Elsewhere, or where /proc refuses the reset: not measured. Worker processes
(the data loader's) are other processes and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class PeakMemory:
    before_bytes: Optional[int]
    """Allocated (CUDA) or resident (CPU) bytes just before the work; None when not measured."""
    peak_bytes: Optional[int]
    """The high-water mark during the work (it includes `before_bytes`); None when not measured."""
    device: str
    """'cuda' or 'cpu'."""
    kind: str = ""
    """What was measured, in words."""
    result: Any = None
    """What the measured function returned."""

    @property
    def measured(self) -> bool:
        return self.peak_bytes is not None

    @property
    def increase_bytes(self) -> Optional[int]:
        if self.peak_bytes is None or self.before_bytes is None:
            return None
        return max(0, self.peak_bytes - self.before_bytes)

    def describe(self) -> str:
        """One phrase: 'peak process resident memory 812.4 MiB (612.0 MiB before the step, +200.4 MiB)'."""
        if not self.measured:
            return f"peak memory not measured ({self.kind or 'no measurement on this platform'})"
        mib = 2 ** 20
        return (f"peak {self.kind} {self.peak_bytes / mib:.1f} MiB ({self.before_bytes / mib:.1f} MiB before the "
                f"step, +{self.increase_bytes / mib:.1f} MiB)")


def _status_bytes(field: str) -> Optional[int]:
    """VmRSS / VmHWM of this process in bytes, from /proc/self/status (kB)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_resident_peak() -> bool:
    """Reset this process's VmHWM to its current resident size; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    hwm, rss = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    # A kernel that ignores the write leaves the old high-water mark: only a reset to about the current size counts.
    return hwm is not None and rss is not None and hwm <= rss + 4 * 2 ** 20


def measure_peak(fn: Callable[[], Any], device: Optional[torch.device | str] = None) -> PeakMemory:
    """Run `fn()` and return its peak memory on `device` (default: CUDA when available, else the CPU); the value
    `fn` returned is in `.result`. CUDA work is synchronised before the peak is read."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return PeakMemory(before, torch.cuda.max_memory_allocated(device), "cuda", "GPU memory allocated", result)
    if not reset_resident_peak():
        return PeakMemory(None, None, device.type, "the resident-size peak cannot be reset here (/proc/self/clear_refs)",
                          fn())
    before = _status_bytes("VmRSS")
    result = fn()
    peak = _status_bytes("VmHWM")
    if before is None or peak is None:
        return PeakMemory(None, None, device.type, "/proc/self/status unreadable", result)
    return PeakMemory(before, peak, device.type, "process resident memory", result)
