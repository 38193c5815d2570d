"""Notice when the user places, moves or removes a prompt (point or ROI), for "update on each prompt".

Qt-free: VTK observers on the markups nodes, so it runs on ``slicer-core`` too. The Widget debounces the calls
and re-segments on the cached volume; a node's events while a point is still being dragged are ignored (only
the end of an interaction counts), so one drag gives one update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import slicer

__all__ = ["PromptWatcher"]

_MARKUPS = slicer.vtkMRMLMarkupsNode
PROMPT_EVENTS = (
    _MARKUPS.PointPositionDefinedEvent,  # a point (or an ROI) was placed
    _MARKUPS.PointEndInteractionEvent,  # a drag of a point or of an ROI handle ended
    _MARKUPS.PointRemovedEvent,  # a point was deleted
)


class PromptWatcher:
    """Calls ``onChange(node)`` after each placed, moved or removed prompt in the watched markups nodes."""

    def __init__(self, onChange: Callable) -> None:
        self.onChange = onChange
        self._observations: list[tuple] = []

    def watch(self, nodes: Iterable) -> None:
        """Watch ``nodes`` (``None`` entries skipped) instead of the nodes watched before."""
        self.stop()
        for node in nodes:
            if node is None:
                continue
            for event in PROMPT_EVENTS:
                tag = node.AddObserver(event, lambda caller, _event: self.onChange(caller))
                self._observations.append((node, tag))

    def stop(self) -> None:
        """Remove every observer."""
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []
