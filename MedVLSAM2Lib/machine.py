"""The machine a run happened on, in words: results and benchmarks name it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cpu_model", "describe_cpu", "cpu_flags", "unsupported_capability"]


def cpu_model() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` gives it (``platform.processor()`` elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


# The CPU flags torch's kernel sets need (x86-64). Forced onto a CPU without them, torch reports the kernel set and
# then dies of an illegal instruction deep inside a later operation.
CAPABILITY_FLAGS = {"avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo``; None where that file does not exist (not Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def unsupported_capability(capability: str | None = None) -> str | None:
    """Why the kernel set ``capability`` (default: ``$ATEN_CPU_CAPABILITY``) cannot run on this CPU; None if it can
    (or if the CPU's flags cannot be read)."""
    capability = (capability if capability is not None else os.environ.get("ATEN_CPU_CAPABILITY", "")).lower()
    needed, flags = CAPABILITY_FLAGS.get(capability), cpu_flags()
    if not needed or flags is None or needed <= flags:
        return None
    runnable = ["default", *(name for name, need in CAPABILITY_FLAGS.items() if need <= flags)]
    return (f"ATEN_CPU_CAPABILITY={capability} asks for kernels this CPU ({cpu_model()}) cannot run: it lacks "
            f"{', '.join(sorted(needed - flags))}. Unset it or choose one of {', '.join(runnable)}.")  # fmt: skip


def describe_cpu() -> str:
    """E.g. ``"AMD EPYC, 2 cores; torch 2.13.0+cpu, AVX512 kernels, 2 threads"`` (imports torch)."""
    import torch

    return (f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
            f"{torch.backends.cpu.get_cpu_capability()} kernels, {torch.get_num_threads()} threads")  # fmt: skip
