"""Multi-segment masks and Slicer's ``.seg.nrrd`` format (through ``slicerio``).

A :class:`Segmentation` is a set of named binary masks on one voxel grid. Overlapping segments are
allowed: ``slicerio`` stores them in extra layers exactly as 3D Slicer does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import InputError
from .volume import Volume, lps_to_ras

__all__ = ["Segment", "Segmentation", "read_segmentation", "write_segmentation"]

# Distinct default colours (RGB in [0, 1]) for segments given none; Slicer's terminology colours come later.
DEFAULT_COLORS = (
    (0.85, 0.33, 0.10),
    (0.00, 0.45, 0.74),
    (0.93, 0.69, 0.13),
    (0.49, 0.18, 0.56),
    (0.47, 0.67, 0.19),
    (0.30, 0.75, 0.93),
    (0.64, 0.08, 0.18),
)


@dataclass
class Segment:
    """One named binary mask: ``mask`` is ``(K, J, I)`` bool on the segmentation's grid."""

    name: str
    mask: np.ndarray
    color: tuple[float, float, float] | None = None
    terminology: dict[str, Any] | None = None


@dataclass
class Segmentation:
    """Named segments on a voxel grid given by ``ijk_to_ras`` and the masks' shared KJI shape."""

    ijk_to_ras: np.ndarray
    segments: list[Segment] = field(default_factory=list)

    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    def mask(self, name: str) -> np.ndarray:
        """The mask of the segment called ``name``; :class:`InputError` listing the names if absent."""
        for segment in self.segments:
            if segment.name == name:
                return segment.mask
        raise InputError(f"No segment named {name!r}; segments are {self.names()}.")

    @classmethod
    def from_label_map(cls, label_map: Volume, names: dict[int, str]) -> Segmentation:
        """One segment per label value in ``names`` (``{label: name}``) of an integer label map."""
        segments = [Segment(name, label_map.array == label) for label, name in sorted(names.items())]
        return cls(label_map.ijk_to_ras.copy(), segments)


def read_segmentation(path: str | os.PathLike) -> Segmentation:
    """Read a Slicer ``.seg.nrrd`` (overlapping segments included) into KJI masks with RAS geometry."""
    import slicerio

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file.")
    try:
        data = slicerio.read_segmentation(str(path))
    except Exception as err:  # slicerio/pynrrd raise many types for corrupt headers
        raise InputError(f"{path}: cannot read as a Slicer segmentation ({err}).") from err
    segments = []
    for info in data["segments"]:
        mask_ijk = slicerio.segment_mask(data, info)
        segments.append(
            Segment(
                name=info["name"],
                mask=np.ascontiguousarray(np.asarray(mask_ijk, bool).transpose(2, 1, 0)),
                color=tuple(info["color"]) if "color" in info else None,
                terminology=info.get("terminology"),
            )
        )
    if not segments:
        raise InputError(f"{path}: no segments in this file; it is a plain label map, not a Slicer segmentation.")
    return Segmentation(lps_to_ras @ np.asarray(data["ijkToLPS"], float), segments)


def write_segmentation(segmentation: Segmentation, path: str | os.PathLike) -> Path:
    """Write a ``.seg.nrrd`` that 3D Slicer opens with the segment names, colours and terminology.

    The file appears complete or not at all (temporary name, then rename).

    Raises:
        InputError: the path does not end in ``.seg.nrrd``, there are no segments, the masks differ in
            shape, or two segments share a name.
    """
    import slicerio

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise InputError(f"{path}: a Slicer segmentation file name must end in .seg.nrrd.")
    if not segmentation.segments:
        raise InputError(f"{path}: nothing to write, the segmentation has no segments.")
    shapes = {s.mask.shape for s in segmentation.segments}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise InputError(f"{path}: all segment masks must be 3D and of one shape, got {sorted(shapes)}.")
    names = segmentation.names()
    if len(set(names)) != len(names):
        raise InputError(f"{path}: segment names must be unique, got {names}.")
    k, j, i = next(iter(shapes))
    data = slicerio.create_segmentation((i, j, k), lps_to_ras @ np.asarray(segmentation.ijk_to_ras, float))
    for n, segment in enumerate(segmentation.segments):
        fields: dict[str, Any] = {
            "id": f"Segment_{n + 1}",
            "name": segment.name,
            "color": list(segment.color or DEFAULT_COLORS[n % len(DEFAULT_COLORS)]),
        }
        if segment.terminology:
            fields["terminology"] = segment.terminology
        slicerio.add_segment(data, np.asarray(segment.mask, bool).transpose(2, 1, 0), fields)
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(str(tmp), data)
    return path
