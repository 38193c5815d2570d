"""How this process was launched: one of several CPU processes needs accelerate told so."""

from __future__ import annotations

import os

__all__ = ["cpu_multiprocess"]


def cpu_multiprocess() -> bool:
    """Whether this is one of several processes (``accelerate launch --multi_gpu`` / ``torchrun``) on a machine
    without CUDA. accelerate must then be created with ``cpu=True`` (gloo); otherwise every process believes it
    runs alone. (``accelerate launch --cpu`` starts a single process, whatever ``--num_processes`` says.)"""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
