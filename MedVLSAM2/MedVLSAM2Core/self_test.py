"""The module's self-test scenario, shared by ``MedVLSAM2Test`` (Reload & Test, the Self Tests module, ctest) and
by ``make test`` on the ``slicer-core`` wheel: the same steps and checks in both.

On the chest CT that ships with ``slicerio``: a box ROI around the reference right lung, a positive point at its
centre and a negative point in the left lung, placed as markups in world coordinates; the module Logic segments
"right lung" with the given backend and writes the segment. Checks: one new segment, its name, its terminology
(SNOMED "Lung", modifier "Right") and colour, a non-empty mask on the CT's own grid, the model's confidence tag.
"""

from __future__ import annotations

import numpy as np
import vtk

from MedVLSAM2Core.scene_logic import SceneLogic

__all__ = ["SELF_TEST_ANSWER", "selfTestInputs", "runSelfTest"]

STRUCTURE = "right lung"
SELF_TEST_ANSWER = "It is [SEG]."  # the tiny random-weight preset does not write [SEG] by itself


def selfTestInputs() -> tuple[str, str]:
    """Paths of the chest CT and of its reference segmentation inside the ``slicerio`` package."""
    import slicerio

    return slicerio.get_testdata_file("CTChest4.nrrd"), slicerio.get_testdata_file("Segmentation.seg.nrrd")


def _world(volume, ijk: np.ndarray) -> list[float]:  # noqa: ANN001
    return (volume.ijk_to_ras @ np.r_[ijk, 1.0])[:3].tolist()


def _placePrompts(logic: SceneLogic, volumeNode, referencePath: str) -> tuple:  # noqa: ANN001
    from MedVLSAM2Lib.segmentation import read_segmentation

    volume = logic.volumeFromNode(volumeNode)
    reference = {segment.name: segment.mask for segment in read_segmentation(referencePath).segments}
    scene = volumeNode.GetScene()
    kji = np.argwhere(reference[STRUCTURE])
    low, high = kji.min(axis=0)[::-1].astype(float), kji.max(axis=0)[::-1].astype(float)  # IJK corners
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "MedVLSAM2 self-test box")
    roi.SetCenterWorld(_world(volume, (low + high) / 2))
    spacing = np.linalg.norm(volume.ijk_to_ras[:3, :3], axis=0)
    roi.SetSize(*((high - low) * spacing))  # the box is axis-aligned with the CT (CTChest4 has no rotation)
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "MedVLSAM2 self-test positive")
    negative = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "MedVLSAM2 self-test negative")
    for node, name in ((positive, STRUCTURE), (negative, "left lung")):
        inside = np.argwhere(reference[name])
        centre = inside[np.argmin(np.linalg.norm(inside - inside.mean(axis=0), axis=1))]  # a voxel of the organ
        node.AddControlPointWorld(vtk.vtkVector3d(*_world(volume, centre[::-1].astype(float))))
    return roi, positive, negative, reference[STRUCTURE]


def runSelfTest(logic: SceneLogic, volumeNode, referencePath: str) -> dict:  # noqa: ANN001
    """Place the prompts, segment through ``logic`` (its backend set), check the segment; returns what was
    checked (segment id, voxel count, Dice against the reference, which random weights leave low).

    Raises:
        AssertionError: a check failed, with what was expected.
    """
    from MedVLSAM2Lib.terminology import lookup

    roi, positive, negative, reference = _placePrompts(logic, volumeNode, referencePath)
    segmentationNodes = volumeNode.GetScene().GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    (segmentId,) = logic.segment(volumeNode, None, text=STRUCTURE, positiveNode=positive, negativeNode=negative,
                                 roiNode=roi, answer=SELF_TEST_ANSWER)  # fmt: skip
    scene = volumeNode.GetScene()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentationNodes + 1, "no segmentation made"
    segmentationNode = scene.GetFirstNodeByName(f"{volumeNode.GetName()} MedVLSAM2")
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    assert segment.GetName() == STRUCTURE, f"segment named {segment.GetName()!r}, expected {STRUCTURE!r}"
    colour, terminology = lookup(STRUCTURE)
    tag = vtk.reference("")
    assert segment.GetTag("TerminologyEntry", tag), "the segment has no terminology"
    for code in (terminology["type"][1], terminology["typeModifier"][1]):
        assert f"^{code}^" in str(tag), f"terminology {tag} lacks SNOMED code {code}"
    assert np.allclose(segment.GetColor(), colour, atol=1e-3), f"colour {segment.GetColor()}, expected {colour}"
    assert logic.segmentScore(segment) is not None, "the model's confidence is not on the segment"
    mask = logic.maskFromSegment(segmentationNode, segmentId, volumeNode)
    dims = tuple(reversed(volumeNode.GetImageData().GetDimensions()))
    assert mask.shape == dims, f"mask of shape {mask.shape} is not on the CT's grid {dims}"
    assert mask.sum() > 0, "the segment is empty"
    dice = 2 * np.logical_and(mask, reference).sum() / (mask.sum() + reference.sum())
    return {"segmentId": segmentId, "voxels": int(mask.sum()), "dice": float(dice), "shape": mask.shape}
