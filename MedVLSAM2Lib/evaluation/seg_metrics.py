"""Segmentation metrics per structure: hard Dice, M3D's soft Dice and normalised surface Dice (MONAI).

Empty ground truth (the structure is absent from the case) has no Dice: a prediction there is either empty (a
true negative) or a **false positive**. :class:`MaskScores` marks such a case ``empty_truth`` with ``None`` Dice
scores and ``false_positive`` set, and :func:`summarize` leaves it out of the Dice means and reports the share of
empty-truth cases with any predicted voxel (``false_positive_rate``). Both empty is a true negative, never a
Dice of 1.

Surface Dice's tolerance is in the units of ``spacing``: millimetres where the data has a spacing, voxels where it
has none (M3D-Seg stores none: pass unit spacing and a tolerance in voxels, and say so).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InputError

__all__ = ["MaskScores", "score_mask", "soft_dice", "summarize"]


@dataclass
class MaskScores:
    """Scores of one predicted structure against its ground truth (``None`` where undefined)."""

    dice: float | None
    soft_dice: float | None
    surface_dice: float | None
    truth_voxels: int
    predicted_voxels: int
    empty_truth: bool
    false_positive: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def soft_dice(probabilities: np.ndarray, truth: np.ndarray, smooth: float = 1.0) -> float:
    """M3D's Dice (``Bench/eval/metrics.py:BinaryDice``) on probabilities, not thresholded:
    ``2 * sum(p * t) / (sum(p) + sum(t) + smooth)`` (the smoothing term is in the denominator only, so an
    empty prediction scores 0)."""
    p, t = np.asarray(probabilities, np.float64).ravel(), np.asarray(truth, np.float64).ravel()
    return float(2.0 * (p * t).sum() / (p.sum() + t.sum() + smooth))


def score_mask(probabilities: np.ndarray, truth: np.ndarray, spacing: Sequence[float], *, threshold: float = 0.5,
               tolerance: float = 1.0, mask: np.ndarray | None = None) -> MaskScores:  # fmt: skip
    """Hard Dice (``probabilities > threshold``, or the given ``mask``), soft Dice and surface Dice at
    ``tolerance`` (in the units of ``spacing``).

    Args:
        probabilities: prediction, ``(K, J, I)`` in [0, 1] (a binary mask works too).
        truth: ground truth of the same shape.
        spacing: voxel size along the array axes ``(k, j, i)``: millimetres, or ``(1, 1, 1)`` for data without
            a spacing (then ``tolerance`` is in voxels).
        mask: the hard prediction when it was thresholded at a higher precision than ``probabilities`` keep
            (the engine's masks come from float32, its kept probabilities are float16).
    """
    import torch
    from monai.metrics import compute_dice, compute_surface_dice

    probabilities, truth = np.asarray(probabilities, np.float32), np.asarray(truth) > 0
    if probabilities.shape != truth.shape or probabilities.ndim != 3:
        raise InputError(f"prediction {probabilities.shape} and ground truth {truth.shape} must be one 3D shape.")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"spacing must be three positive values, got {np.asarray(spacing).tolist()}.")
    if tolerance < 0:
        raise InputError(f"the surface Dice tolerance must be >= 0, got {tolerance}.")
    predicted = probabilities > threshold if mask is None else np.asarray(mask) > 0
    if predicted.shape != truth.shape:
        raise InputError(f"mask {predicted.shape} and ground truth {truth.shape} must be one 3D shape.")
    counts = int(truth.sum()), int(predicted.sum())
    if counts[0] == 0:
        return MaskScores(None, None, None, *counts, empty_truth=True, false_positive=counts[1] > 0)
    y_pred = torch.from_numpy(predicted)[None, None].float()
    y = torch.from_numpy(truth)[None, None].float()
    dice = float(compute_dice(y_pred, y, include_background=True)[0, 0])
    surface = compute_surface_dice(torch.cat([1 - y_pred, y_pred], 1), torch.cat([1 - y, y], 1), [tolerance],
                                   spacing=[float(s) for s in spacing])  # fmt: skip
    surface_dice = float(surface[0, 0])
    return MaskScores(dice, soft_dice(probabilities, truth), 0.0 if np.isnan(surface_dice) else surface_dice,
                      *counts, empty_truth=False)  # fmt: skip


def summarize(rows: Iterable[dict], by: str = "structure") -> dict[str, dict]:
    """Mean scores per value of ``by`` over rows holding :meth:`MaskScores.to_dict` fields: the cases scored, the
    empty-truth cases (left out of the means) and the share of those with a false positive (``None`` without
    any)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(str(row[by]), []).append(row)
    summary = {}
    for name, items in sorted(groups.items()):
        scored = [r for r in items if not r["empty_truth"]]
        empty = [r for r in items if r["empty_truth"]]
        means = {key: (float(np.mean([r[key] for r in scored])) if scored else None)
                 for key in ("dice", "soft_dice", "surface_dice")}  # fmt: skip
        positives = sum(bool(r.get("false_positive")) for r in empty)
        summary[name] = {**means, "cases": len(scored), "empty_truth_cases": len(empty),
                         "false_positive_cases": positives,
                         "false_positive_rate": positives / len(empty) if empty else None}  # fmt: skip
    return summary
