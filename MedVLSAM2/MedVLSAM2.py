"""MedVLSAM2 — the 3D Slicer module.

Slicer glue only: no model code lives here. Top-level imports are stdlib and Slicer toolkits;
``MedVLSAM2Lib`` (and through it numpy-heavy code) is imported inside Logic methods.

This first version registers the module and provides the Logic's node ↔ library conversions
(volume node → ``MedVLSAM2Lib.volume.Volume``); the report, chat and segmentation panels arrive
with the inference engine.
"""

import logging

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic


class MedVLSAM2(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedVLSAM2"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedVLSAM2 developers"]
        self.parent.helpText = (
            "MedVL-SAM2 reads CT volumes: radiology report generation, VQA chat, and segmentation "
            "from text, points and boxes. This version provides the library glue; the panels follow."
        )
        self.parent.acknowledgementText = (
            "Builds on M3D-CLIP, InternVL2.5, SAM2 and 3D Slicer. "
            "Test data courtesy of TotalSegmentator, dcmqi and slicerio."
        )


class MedVLSAM2Logic(ScriptedLoadableModuleLogic):
    """All Slicer-side work; usable without a Widget (headless batch, tests)."""

    def volumeFromNode(self, volumeNode):
        """A ``MedVLSAM2Lib.volume.Volume`` of a scalar volume node: array KJI, IJK→RAS in the node's world.

        The node's parent transform, if any and linear, is folded into ``ijk_to_ras`` so that the library
        sees the volume where the user sees it.
        """
        import numpy as np
        import vtk

        from MedVLSAM2Lib.errors import InputError
        from MedVLSAM2Lib.volume import Volume

        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError("Select a scalar volume (a CT) first.")
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        transformNode = volumeNode.GetParentTransformNode()
        if transformNode is not None:
            if not transformNode.IsTransformToWorldLinear():
                raise InputError(f"{volumeNode.GetName()}: harden or remove its non-linear transform first.")
            toWorld = vtk.vtkMatrix4x4()
            transformNode.GetMatrixTransformToWorld(toWorld)
            vtk.vtkMatrix4x4.Multiply4x4(toWorld, ijkToRas, ijkToRas)
        matrix = np.array([[ijkToRas.GetElement(r, c) for c in range(4)] for r in range(4)])
        logging.info(
            "MedVLSAM2: volume %s, shape %s", volumeNode.GetName(), slicer.util.arrayFromVolume(volumeNode).shape
        )
        return Volume(slicer.util.arrayFromVolume(volumeNode).copy(), matrix, {"source_path": volumeNode.GetName()})
