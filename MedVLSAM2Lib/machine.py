"""The machine a run happened on, in words: results and benchmarks name it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cpu_model", "describe_cpu"]


def cpu_model() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` gives it (``platform.processor()`` elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe_cpu() -> str:
    """E.g. ``"AMD EPYC, 2 cores; torch 2.13.0+cpu, AVX512 kernels, 2 threads"`` (imports torch)."""
    import torch

    return (f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
            f"{torch.backends.cpu.get_cpu_capability()} kernels, {torch.get_num_threads()} threads")  # fmt: skip
