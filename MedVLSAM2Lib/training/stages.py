"""The paper's three training stages as freeze plans.

1. projector only, on CT-RATE report generation;
2. + vision encoder + LLM LoRA (with the new ``[SEG]``/``<image>`` rows), on reports and VQA;
3. + ``[SEG]`` projector + SAM2 mask decoder (and optionally SAM2's memory path), on CT-RATE + M3D-Seg
   with the joint loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..model.medvlsam2 import STAGE_PARTS, MedVLSAM2Model

__all__ = ["StagePlan", "stage_plan", "trainable_report"]

REPORT_MODULES = ("vision", "projector", "lora", "seg_projector", "sam_decoder", "sam_memory", "sam_image_encoder")


@dataclass(frozen=True)
class StagePlan:
    """Which parts a stage trains and which tasks it samples."""

    stage: int
    parts: frozenset[str]
    tasks: tuple[str, ...]


STAGE_TASKS = {
    1: ("report",),
    2: ("report", "vqa"),
    3: ("report", "vqa", "semantic", "referring", "interactive"),
}


def stage_plan(stage: int, *, train_sam_memory: bool = False) -> StagePlan:
    """The freeze plan of a stage (1, 2 or 3); ``train_sam_memory`` adds SAM2's memory path to stage 3."""
    if stage not in STAGE_PARTS:
        raise InputError(f"stage must be 1, 2 or 3, got {stage!r}.")
    parts = STAGE_PARTS[stage] | ({"sam_memory"} if train_sam_memory and stage == 3 else set())
    return StagePlan(stage, frozenset(parts), STAGE_TASKS[stage])


def trainable_report(model: MedVLSAM2Model) -> list[tuple[str, int, int]]:
    """``(module, trainable, total)`` parameter counts per module, for the start-of-training printout."""
    rows = []
    for part in REPORT_MODULES:
        parameters = model.part_parameters(part)
        rows.append((part, sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)))
    base = [p for n, p in model.llm.named_parameters() if "lora_" not in n and "trainable_tokens" not in n]
    rows.append(("llm_base", sum(p.numel() for p in base if p.requires_grad), sum(p.numel() for p in base)))
    return rows
