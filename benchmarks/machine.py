"""One line describing where a benchmark ran: date, CPU, cores, GPU, library versions."""

from __future__ import annotations

import datetime
import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    import diffusers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{datetime.date.today().isoformat()}; {cpu_model()}, {len(os.sched_getaffinity(0))} cores "
            f"(torch threads {torch.get_num_threads()}); {gpu}; torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}")
