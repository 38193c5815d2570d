"""Slicer terminology and colours for segment names ("right lung", "kidney_left", "liver").

A small packaged table (``resources/terminology.json``) after 3D Slicer's General Anatomy list; names that
are not in it get no terminology and a default colour.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["lookup", "structure_names"]

CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = ["SCT", "123037004", "Anatomical Structure"]
SIDES = {"right": ["SCT", "24028007", "Right"], "left": ["SCT", "7771000", "Left"]}


@cache
def _table() -> dict[str, dict[str, Any]]:
    text = resources.files("MedVLSAM2Lib").joinpath("resources/terminology.json").read_text(encoding="utf-8")
    return json.loads(text)["structures"]


def _split_side(name: str) -> tuple[str, str | None]:
    words = name.lower().replace("_", " ").split()
    for side in SIDES:
        if side in words:
            words.remove(side)
            return " ".join(words), side
    return " ".join(words), None


def lookup(name: str) -> tuple[tuple[float, float, float], dict[str, Any]] | None:
    """``(colour RGB in [0, 1], slicerio terminology dict)`` for a known structure name, else ``None``."""
    structure, side = _split_side(name)
    entry = _table().get(structure)
    if entry is None:
        return None
    terminology: dict[str, Any] = {
        "contextName": CONTEXT,
        "category": entry.get("category", ANATOMICAL_STRUCTURE),
        "type": entry["code"],
        "anatomicContextName": ANATOMIC_CONTEXT,
    }
    if side:
        terminology["typeModifier"] = SIDES[side]
    rgb = entry.get(side, entry["color"]) if side else entry["color"]
    return tuple(c / 255.0 for c in rgb), terminology


def structure_names() -> list[str]:
    """Every name :func:`lookup` knows ("liver", "left kidney", …), sorted: the Slicer panel's completion list."""
    names = set()
    for structure, entry in _table().items():
        names.add(structure)
        names.update(f"{side} {structure}" for side in SIDES if side in entry)
    return sorted(names)
