"""MRML ⇄ MedVLSAM2Lib: everything the module does with Slicer nodes, without Qt or the application.

Runs in the Slicer app, in headless Slicer, and on the ``slicer-core`` wheel (what the tests use). Coordinates:
a volume's ``ijk_to_ras`` here is IJK → *world* (its parent transforms folded in), so markups read in world
coordinates map to the volume's voxels by one inverse; masks are written into a segmentation node placed under
the volume's transform, on the volume's own grid, so they overlay the CT exactly.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.prompts import NEGATIVE, POSITIVE, BoxPrompt, PointPrompt
from MedVLSAM2Lib.volume import Volume

UNDO_STATES = 10  # model writes that can be undone per segmentation
SCORE_TAG = "MedVLSAM2.Score"  # the model's confidence in a segment it wrote (SAM2's object score, 0..1)
SLICES_TAG = "MedVLSAM2.PresentSlices"  # the slices (k, first-last) where the model saw the object (presence >= 0.5)

__all__ = ["SceneLogic"]


def _register_converters() -> None:
    """Segmentations need their conversion rules; the Slicer app registers them, the slicer-core wheel does not."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


class SceneLogic:
    """Node conversions, the backend call, and segment writing with undo and redo.

    ``backend`` is a :class:`MedVLSAM2Lib.engine.InferenceEngine` (local) or a
    :class:`MedVLSAM2Lib.serving.client.ServerClient` (remote): both have ``encode/report/ask/segment``.
    """

    def __init__(self, backend=None, intensity: str = "hu") -> None:  # noqa: ANN001
        self.backend = backend
        self.intensity = intensity  # "hu", or "normalized" for already rescaled data such as M3D-Seg
        self._histories: dict[str, slicer.vtkSegmentationHistory] = {}

    # ------------------------------------------------------------------ nodes → library

    def ijkToWorld(self, volumeNode) -> np.ndarray:  # noqa: ANN001
        """IJK → world RAS of a volume node: its IJK → RAS with its (linear) parent transforms folded in."""
        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError("select a scalar volume (a CT) first.")
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        matrix = slicer.util.arrayFromVTKMatrix(ijkToRas)
        transformNode = volumeNode.GetParentTransformNode()
        if transformNode is not None:
            if not transformNode.IsTransformToWorldLinear():
                raise InputError(f"{volumeNode.GetName()}: harden or remove its non-linear transform first.")
            toWorld = vtk.vtkMatrix4x4()
            transformNode.GetMatrixTransformToWorld(toWorld)
            matrix = slicer.util.arrayFromVTKMatrix(toWorld) @ matrix
        return matrix

    def volumeFromNode(self, volumeNode) -> Volume:  # noqa: ANN001
        """A :class:`Volume` of the node: voxels KJI (a copy), ``ijk_to_ras`` to world (see :meth:`ijkToWorld`)."""
        matrix = self.ijkToWorld(volumeNode)
        if volumeNode.GetImageData() is None:
            raise InputError(f"{volumeNode.GetName()}: the volume has no image data.")
        array = slicer.util.arrayFromVolume(volumeNode).copy()
        return Volume(array, matrix, {"source_path": volumeNode.GetName()})

    def addVolumeNode(self, scene, volume: Volume, name: str):  # noqa: ANN001, ANN201
        """A new scalar volume node in ``scene`` holding ``volume`` (voxels and IJK → RAS), e.g. for batch runs."""
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, volume.array)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(volume.ijk_to_ras))
        return node

    def _worldToIjk(self, volumeNode, points_world: np.ndarray) -> np.ndarray:  # noqa: ANN001
        inverse = np.linalg.inv(self.ijkToWorld(volumeNode))
        homogeneous = np.c_[points_world, np.ones(len(points_world))]
        return (homogeneous @ inverse.T)[:, :3]

    def pointsFromNode(self, pointListNode, volumeNode, positive: bool = True) -> list[PointPrompt]:  # noqa: ANN001
        """The control points of a point list as IJK prompts of ``volumeNode`` (world → IJK), one label for all.

        Raises:
            InputError: a point lies outside the volume (named by its label).
        """
        if pointListNode is None:
            return []
        placed = slicer.vtkMRMLMarkupsNode.PositionDefined  # skip points still being placed or left undefined
        count = pointListNode.GetNumberOfControlPoints()
        defined = [n for n in range(count) if pointListNode.GetNthControlPointPositionStatus(n) == placed]
        world = np.zeros((len(defined), 3))
        for row, n in enumerate(defined):
            pointListNode.GetNthControlPointPositionWorld(n, world[row])
        ijk = self._worldToIjk(volumeNode, world)
        shape = np.array(volumeNode.GetImageData().GetDimensions())
        for n, point in zip(defined, ijk, strict=True):
            if np.any(point < -0.5) or np.any(point > shape - 0.5):
                raise InputError(f"point {pointListNode.GetNthControlPointLabel(n)!r} of {pointListNode.GetName()} "
                                 f"is outside {volumeNode.GetName()}; move it onto the image.")  # fmt: skip
        label = POSITIVE if positive else NEGATIVE
        return [PointPrompt(tuple(point), label) for point in ijk]

    def boxFromRoiNode(self, roiNode, volumeNode) -> BoxPrompt | None:  # noqa: ANN001
        """The IJK box of ``volumeNode`` enclosing an ROI's 8 corners (world → IJK), clamped to the volume.

        Raises:
            InputError: the ROI does not overlap the volume.
        """
        if roiNode is None:
            return None
        size = np.array(roiNode.GetSize()) / 2.0
        corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * size
        toWorld = slicer.util.arrayFromVTKMatrix(roiNode.GetObjectToWorldMatrix())
        world = (np.c_[corners, np.ones(8)] @ toWorld.T)[:, :3]
        ijk = self._worldToIjk(volumeNode, world)
        high = np.array(volumeNode.GetImageData().GetDimensions(), float) - 1
        lo, hi = ijk.min(axis=0), ijk.max(axis=0)
        if np.any(hi < 0) or np.any(lo > high):
            raise InputError(f"the ROI {roiNode.GetName()} does not overlap {volumeNode.GetName()}.")
        return BoxPrompt(tuple(np.clip(lo, 0, high)), tuple(np.clip(hi, 0, high)))

    # ------------------------------------------------------------------ the backend

    def requireBackend(self):  # noqa: ANN201
        """The backend, or an :class:`InputError` saying how to get one."""
        if self.backend is None:
            raise InputError("no backend: load a model (Local) or connect to a server (Remote) in Setup.")
        return self.backend

    def encode(self, volumeNode, cancel=None):  # noqa: ANN001, ANN201
        """The backend's handle of the node's volume (encoded once per content: the backend caches it)."""
        return self.requireBackend().encode(self.volumeFromNode(volumeNode), self.intensity, cancel=cancel)

    def report(self, volumeNode, onToken=None, cancel=None):  # noqa: ANN001, ANN201
        """A radiology report of the volume; ``onToken`` receives the text as it is generated, ``cancel`` (a
        ``threading.Event``) stops it between tokens."""
        return self.requireBackend().report(self.encode(volumeNode, cancel), on_token=onToken, cancel=cancel)

    def ask(self, volumeNode, question: str, history=(), kind: str = "short", cancel=None):  # noqa: ANN001, ANN201
        """Answer ``question`` about the volume, with the chat's earlier ``(question, answer)`` turns."""
        return self.requireBackend().ask(self.encode(volumeNode, cancel), question, history=history, kind=kind,
                                         cancel=cancel)  # fmt: skip

    def segmentRequest(self, volumeNode, text: str | None = None, positiveNode=None, negativeNode=None,  # noqa: ANN001
                       roiNode=None, answer: str | None = None) -> dict:  # fmt: skip
        """Read the prompts from the nodes (main thread): the keyword arguments of :meth:`runSegment`.

        Raises:
            InputError: nothing to segment, or a prompt outside the volume.
        """
        points = self.pointsFromNode(positiveNode, volumeNode) + self.pointsFromNode(negativeNode, volumeNode, False)
        box = self.boxFromRoiNode(roiNode, volumeNode)
        text = text.strip() if text and text.strip() else None
        if text is None and not points and box is None:
            raise InputError("nothing to segment: type a structure or description, or place points or an ROI.")
        return {"volume": self.volumeFromNode(volumeNode), "text": text, "points": points,
                "boxes": [box] if box else [], "answer": answer}  # fmt: skip

    def runSegment(self, volume: Volume, cancel=None, **prompts):  # noqa: ANN001, ANN003, ANN201
        """The backend call (no MRML access: safe on a worker thread); returns its ``SegmentResult``. ``cancel``
        (a ``threading.Event``) stops it between slices (and between tokens while the model answers).

        A result whose mask came from the points or box alone because the answer had no ``[SEG]`` carries a
        ``message`` saying so; the engine logs it (in whichever process it runs) and the Widget shows it.

        Raises:
            InputError: the model answered without a mask (text alone).
        """
        backend = self.requireBackend()
        result = backend.segment(backend.encode(volume, self.intensity, cancel=cancel), cancel=cancel, **prompts)
        if not result.objects:
            raise InputError(f"{result.no_mask_reason()} Nothing was written.")
        return result

    def outputSegmentation(self, segmentationNode, volumeNode):  # noqa: ANN001, ANN201
        """The segmentation to write into: ``segmentationNode``, or a new one named after the volume. Called only
        once a result is in hand, so invalid prompts or a failed run never leave an empty node behind."""
        if segmentationNode is not None:
            return segmentationNode
        name = f"{volumeNode.GetName()} MedVLSAM2"
        return volumeNode.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", name)

    def writeResult(self, result, segmentationNode, volumeNode, segmentId: str | None = None) -> list[str]:  # noqa: ANN001
        """Write a ``SegmentResult`` (main thread): each mask as a new segment, or the first into ``segmentId``.
        One :meth:`undo` reverts the whole write; the state saved before it keeps the user's own edits."""
        self._requireSegment(segmentationNode, segmentId)
        self._history(segmentationNode).SaveState()
        if segmentId is not None:
            first = result.objects[0]
            return [self.writeSegment(segmentationNode, volumeNode, first.mask, segmentId=segmentId, score=first.score,
                                      presence=first.presence)]  # fmt: skip
        return [self.writeSegment(segmentationNode, volumeNode, obj.mask, name=obj.label, score=obj.score,
                                  presence=obj.presence) for obj in result.objects]  # fmt: skip

    def segment(self, volumeNode, segmentationNode, text: str | None = None, positiveNode=None, negativeNode=None,  # noqa: ANN001
                roiNode=None, segmentId: str | None = None, answer: str | None = None) -> list[str]:  # fmt: skip
        """Segment from text and/or markups and write the masks (new segments, or refine ``segmentId``); the
        three steps above in one call, for scripts and batch runs. Without ``segmentationNode`` a new one is made,
        only once there is a mask to write. Returns the ids of the segments written."""
        request = self.segmentRequest(volumeNode, text, positiveNode, negativeNode, roiNode, answer)
        result = self.runSegment(request.pop("volume"), **request)
        return self.writeResult(result, self.outputSegmentation(segmentationNode, volumeNode), volumeNode, segmentId)

    # ------------------------------------------------------------------ writing segments

    def _labelmap(self, volumeNode, mask: np.ndarray):  # noqa: ANN001, ANN202
        dims = volumeNode.GetImageData().GetDimensions()
        if mask.shape != tuple(reversed(dims)):
            raise InputError(f"a mask of shape {mask.shape} does not fit {volumeNode.GetName()} (K, J, I = "
                             f"{tuple(reversed(dims))}).")  # fmt: skip
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(*dims)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = (mask > 0).astype(np.uint8).ravel()
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)  # node coordinates: the segmentation shares the volume's transform
        image.SetImageToWorldMatrix(ijkToRas)
        return image

    def _place(self, segmentationNode, volumeNode) -> None:  # noqa: ANN001
        _register_converters()
        if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        elif segmentationNode.GetTransformNodeID() != volumeNode.GetTransformNodeID():
            raise InputError(f"{segmentationNode.GetName()} sits under another transform than "
                             f"{volumeNode.GetName()}; choose or create a segmentation for this volume.")  # fmt: skip
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        if segmentationNode.GetDisplayNode() is None and segmentationNode.GetScene() is not None:
            segmentationNode.CreateDefaultDisplayNodes()

    @staticmethod
    def _requireSegment(segmentationNode, segmentId: str | None) -> None:  # noqa: ANN001
        if segmentId is not None and segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            raise InputError(f"{segmentationNode.GetName()} has no segment {segmentId!r} to refine.")

    def _uniqueName(self, segmentation, name: str) -> str:  # noqa: ANN001
        taken = {segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())}
        candidate, n = name, 2
        while candidate in taken:
            candidate, n = f"{name} {n}", n + 1
        return candidate

    def writeSegment(self, segmentationNode, volumeNode, mask: np.ndarray, name: str | None = None,  # noqa: ANN001
                     segmentId: str | None = None, score: float | None = None,
                     presence: np.ndarray | None = None) -> str:  # fmt: skip
        """Write ``mask`` (KJI on the volume's grid) as a new segment called ``name`` — never over an existing
        one: a taken name gets a number — or, with ``segmentId``, replace that segment's voxels (refine).
        :meth:`writeResult` makes it undoable. Known structure names get Slicer's terminology and colour; the
        model's confidence ``score`` is kept in the segment's :data:`SCORE_TAG` tag (saved with the segmentation),
        and the range of slices its per-slice ``presence`` (one value per k) puts at >= 0.5 in :data:`SLICES_TAG`.
        """
        from slicerio.segmentation import terminology_entry_to_string

        from MedVLSAM2Lib.terminology import lookup

        self._place(segmentationNode, volumeNode)
        segmentation = segmentationNode.GetSegmentation()
        image = self._labelmap(volumeNode, mask)
        self._requireSegment(segmentationNode, segmentId)
        if segmentId is None:
            name = self._uniqueName(segmentation, name or "segment")
            segmentId = segmentation.AddEmptySegment("", name)
            known = lookup(name.rstrip("0123456789 "))
            if known is not None:
                colour, terminology = known
                segmentation.GetSegment(segmentId).SetColor(*colour)
                segmentation.GetSegment(segmentId).SetTag("TerminologyEntry", terminology_entry_to_string(terminology))
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            image, segmentationNode, segmentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)  # fmt: skip
        segment = segmentation.GetSegment(segmentId)
        if score is not None:
            segment.SetTag(SCORE_TAG, f"{score:.3f}")
        present = np.flatnonzero(np.asarray(presence) >= 0.5) if presence is not None else []
        if len(present):
            segment.SetTag(SLICES_TAG, f"{present[0]}-{present[-1]}")
        else:
            segment.RemoveTag(SLICES_TAG)
        return segmentId

    @staticmethod
    def segmentScore(segment) -> str | None:  # noqa: ANN001
        """The model's confidence kept on a segment it wrote, with the slices it saw the object on when known
        (``"0.930, slices 5-30"``); ``None`` for segments it did not write."""
        score, slices = vtk.reference(""), vtk.reference("")
        if not segment.GetTag(SCORE_TAG, score):
            return None
        return f"{score}, slices {slices}" if segment.GetTag(SLICES_TAG, slices) else str(score)

    def _history(self, segmentationNode) -> slicer.vtkSegmentationHistory:  # noqa: ANN001
        """Slicer's segmentation undo history of ``segmentationNode`` (the class the Segment Editor uses): a state
        is saved before each model write, so undo returns to what the user had, their manual edits included."""
        key = segmentationNode.GetID() or str(id(segmentationNode))
        history = self._histories.get(key)
        if history is None or history.GetSegmentation() is not segmentationNode.GetSegmentation():
            history = slicer.vtkSegmentationHistory()
            history.SetMaximumNumberOfStates(UNDO_STATES)
            history.SetSegmentation(segmentationNode.GetSegmentation())
            self._histories[key] = history
        return history

    def undo(self, segmentationNode) -> bool:  # noqa: ANN001
        """Return ``segmentationNode`` to its state before the last model write (redo keeps what undo took away,
        edits made after that write included); returns whether there was anything to undo."""
        history = self._history(segmentationNode)
        return history.IsRestorePreviousStateAvailable() and history.RestorePreviousState()

    def redo(self, segmentationNode) -> bool:  # noqa: ANN001
        """Re-apply what the last :meth:`undo` reverted; returns whether there was anything to redo."""
        history = self._history(segmentationNode)
        return history.IsRestoreNextStateAvailable() and history.RestoreNextState()

    def forgetHistory(self) -> None:
        """Drop every undo state (a closed scene: its segmentations are gone)."""
        for history in self._histories.values():
            history.RemoveAllStates()
        self._histories.clear()

    def maskFromSegment(self, segmentationNode, segmentId: str, volumeNode) -> np.ndarray:  # noqa: ANN001
        """The segment's voxels on the volume's grid (KJI, uint8)."""
        scene = segmentationNode.GetScene()
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentationNode, ids, labelmap, volumeNode):  # fmt: skip
                raise InputError(f"could not read segment {segmentId!r} of {segmentationNode.GetName()}.")
            return (slicer.util.arrayFromVolume(labelmap) > 0).astype(np.uint8)
        finally:
            scene.RemoveNode(labelmap)
