"""Point and box prompts in voxel (IJK) coordinates, and their synthesis for evaluation.

Coordinates are continuous voxel indices ``(i, j, k)`` with voxel centres at integers, on the grid
of the volume the prompt belongs to (Slicer converts RAS → IJK before calling the library).

Synthesis follows the MedVL-SAM2 evaluation protocol: three random positive points inside the target
on one random slice that contains it; a box from the ground-truth mask on one random slice, each
edge jittered by up to ±5 % of the box size. Slices are along ``k`` (the first axis of a KJI array):
give masks on the model grid or on a canonically oriented volume (``Volume.reoriented("LPS")``) so
that these slices are axial.
Randomness comes only from the ``numpy.random.Generator`` the caller passes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .errors import InputError

__all__ = ["PointPrompt", "BoxPrompt", "check_prompts_inside", "synthesize_points", "synthesize_box"]

POSITIVE, NEGATIVE = 1, 0


def _shown(value: object) -> str:
    """``value`` as a message shows it: numpy numbers as plain numbers, never ``np.float64(…)``."""
    try:
        return repr(np.asarray(value).tolist())
    except (TypeError, ValueError):
        return repr(value)


@dataclass(frozen=True)
class PointPrompt:
    """A click: ``ijk`` voxel coordinate and ``label`` (1 positive / foreground, 0 negative / background)."""

    ijk: tuple[float, float, float]
    label: int = POSITIVE

    def __post_init__(self) -> None:
        ijk = tuple(float(v) for v in np.asarray(self.ijk, dtype=float).ravel())
        if len(ijk) != 3 or not np.all(np.isfinite(ijk)):
            raise InputError(f"A point prompt needs three finite coordinates (i, j, k), got {_shown(self.ijk)}.")
        if self.label not in (POSITIVE, NEGATIVE):
            raise InputError(f"A point label must be 1 (positive) or 0 (negative), got {_shown(self.label)}.")
        object.__setattr__(self, "ijk", ijk)


@dataclass(frozen=True)
class BoxPrompt:
    """An axis-aligned box from ``min_ijk`` to ``max_ijk`` (voxel centres, inclusive).

    A 2D box drawn on one slice is a 3D box one slice thick (``min_ijk[2] == max_ijk[2]``).
    """

    min_ijk: tuple[float, float, float]
    max_ijk: tuple[float, float, float]

    def __post_init__(self) -> None:
        lo = np.asarray(self.min_ijk, dtype=float).ravel()
        hi = np.asarray(self.max_ijk, dtype=float).ravel()
        if lo.shape != (3,) or hi.shape != (3,) or not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise InputError(
                f"A box needs finite min and max corners (i, j, k), got {_shown(self.min_ijk)}, {_shown(self.max_ijk)}."
            )
        if np.any(lo > hi):
            raise InputError(
                f"Box min corner {tuple(lo.tolist())} exceeds its max corner {tuple(hi.tolist())} on some axis."
            )
        object.__setattr__(self, "min_ijk", tuple(lo.tolist()))
        object.__setattr__(self, "max_ijk", tuple(hi.tolist()))

    @property
    def size(self) -> np.ndarray:
        """Extent along i, j, k in voxels (0 along an axis where the box is one voxel thick)."""
        return np.asarray(self.max_ijk) - np.asarray(self.min_ijk)


def _inside(point: np.ndarray, shape_ijk: tuple[int, int, int]) -> bool:
    return bool(np.all(point >= -0.5) and np.all(point <= np.asarray(shape_ijk, float) - 0.5))


def check_prompts_inside(
    shape_ijk: tuple[int, int, int], points: Iterable[PointPrompt] = (), boxes: Iterable[BoxPrompt] = ()
) -> None:
    """Raise :class:`InputError` naming the first point or box that lies outside a grid of ``shape_ijk`` voxels."""
    size = "×".join(str(s) for s in shape_ijk)
    for n, point in enumerate(points):
        if not _inside(np.asarray(point.ijk), shape_ijk):
            raise InputError(
                f"Point {n} at (i, j, k) = {tuple(round(v, 2) for v in point.ijk)} is outside the volume "
                f"({size} voxels, valid range -0.5 … size-0.5 on each axis); place it on the image."
            )
    for n, box in enumerate(boxes):
        if not (_inside(np.asarray(box.min_ijk), shape_ijk) and _inside(np.asarray(box.max_ijk), shape_ijk)):
            raise InputError(
                f"Box {n} from {box.min_ijk} to {box.max_ijk} (i, j, k) extends outside the volume ({size} voxels)."
            )


def _target_slices(mask_kji: np.ndarray) -> np.ndarray:
    if mask_kji.ndim != 3:
        raise InputError(f"Prompt synthesis needs a 3D mask (K, J, I), got shape {mask_kji.shape}.")
    slices = np.flatnonzero(np.asarray(mask_kji, bool).reshape(mask_kji.shape[0], -1).any(axis=1))
    if slices.size == 0:
        raise InputError("Prompt synthesis got an empty mask: the target has no voxels, so no prompt can be placed.")
    return slices


def synthesize_points(mask_kji: np.ndarray, rng: np.random.Generator, n_points: int = 3) -> list[PointPrompt]:
    """``n_points`` positive points inside the target, all on one random slice that contains it.

    Points are distinct voxels when the slice has enough of them; otherwise voxels repeat.

    Args:
        mask_kji: target mask, shape ``(K, J, I)``, non-zero = target.
        rng: the random generator (seed it for reproducible evaluation).
        n_points: how many points (the protocol uses 3).

    Raises:
        InputError: the mask is empty or not 3D.
    """
    slices = _target_slices(mask_kji)
    k = int(rng.choice(slices))
    j, i = np.nonzero(np.asarray(mask_kji[k], bool))
    chosen = rng.choice(j.size, size=n_points, replace=j.size < n_points)
    return [PointPrompt((float(i[c]), float(j[c]), float(k)), POSITIVE) for c in chosen]


def synthesize_box(mask_kji: np.ndarray, rng: np.random.Generator, jitter: float = 0.05) -> BoxPrompt:
    """A box around the target on one random slice, each edge moved by up to ±``jitter`` of the box size.

    The tight box of the slice's mask is measured edge to edge (``max - min + 1`` voxels); the jittered
    box is clipped to the image and stays one slice thick.

    Raises:
        InputError: the mask is empty or not 3D, or ``jitter`` is negative.
    """
    if jitter < 0:
        raise InputError(f"jitter must be >= 0, got {jitter}.")
    slices = _target_slices(mask_kji)
    k = int(rng.choice(slices))
    j, i = np.nonzero(np.asarray(mask_kji[k], bool))
    lo = np.array([i.min(), j.min()], float)
    hi = np.array([i.max(), j.max()], float)
    size = hi - lo + 1.0
    lo = lo + rng.uniform(-jitter, jitter, 2) * size
    hi = hi + rng.uniform(-jitter, jitter, 2) * size
    limit = np.array([mask_kji.shape[2] - 1, mask_kji.shape[1] - 1], float)
    lo, hi = np.clip(lo, 0, limit), np.clip(hi, 0, limit)
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return BoxPrompt((lo[0], lo[1], float(k)), (hi[0], hi[1], float(k)))
