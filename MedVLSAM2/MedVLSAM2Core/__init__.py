"""The module's Slicer-side logic that needs no Qt: importable in the app, headless Slicer and slicer-core."""

from .scene_logic import SceneLogic

__all__ = ["SceneLogic"]
