"""The module's Slicer-side logic on real MRML nodes (the ``slicer-core`` wheel, no Slicer app): a real CT in a
volume node with a rotated direction matrix under a parent transform, markups placed in world coordinates, the
tiny engine locally and through a real server, segments written, saved as .seg.nrrd and read back."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import slicer  # the slicer-core wheel (a test dependency): real MRML without the application
import vtk
from conftest import REPO
from serving_fixtures import KEY, free_port, start_server, stop_server

from MedVLSAM2Lib.engine import InferenceEngine
from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.segmentation import read_segmentation
from MedVLSAM2Lib.serving.client import ServerClient
from MedVLSAM2Lib.terminology import lookup
from MedVLSAM2Lib.volume import read_volume

sys.path.insert(0, str(REPO / "MedVLSAM2"))
from MedVLSAM2Core import SceneLogic  # noqa: E402

pytestmark = [pytest.mark.slicer, pytest.mark.realdata]

# IJK → RAS of the volume node: spacing 0.8, 0.9, 2.5 mm; i runs along +y (anterior), j along -x; origin (10, -5, 3).
IJK_TO_RAS = np.array([[0, -0.9, 0, 10], [0.8, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]], dtype=float)
# its parent transform: a shift of (7, 0, -4) mm
SHIFT = np.array([[1, 0, 0, 7], [0, 1, 0, 0], [0, 0, 1, -4], [0, 0, 0, 1]], dtype=float)
SEG = "It is [SEG]."


@pytest.fixture
def scene(subject_a):  # noqa: ANN001, ANN201
    """A scene with the real CT (subject A) in a rotated volume node under a shifting transform."""
    ct = read_volume(subject_a / "example_ct_sm.nii.gz")
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    slicer.util.updateVolumeFromArray(volume, ct.array)
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(IJK_TO_RAS))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(SHIFT))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    return {"scene": scene, "volume": volume, "points": points, "roi": roi, "segmentation": segmentation, "ct": ct}


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    return InferenceEngine.load("tiny")


def test_world_markups_map_to_hand_computed_voxels(scene):
    logic = SceneLogic()
    volume = logic.volumeFromNode(scene["volume"])
    assert np.allclose(volume.ijk_to_ras, SHIFT @ IJK_TO_RAS) and np.array_equal(volume.array, scene["ct"].array)
    # voxel (i, j, k) = (60, 50, 15): x = -0.9·50 + 10 + 7 = -28, y = 0.8·60 - 5 = 43, z = 2.5·15 + 3 - 4 = 36.5
    scene["points"].AddControlPointWorld(vtk.vtkVector3d(-28, 43, 36.5))
    scene["points"].AddControlPointWorld(vtk.vtkVector3d(-28.9, 43.8, 39))  # (61, 51, 16)
    scene["points"].AddControlPointWorld(vtk.vtkVector3d(0, 0, 0))
    scene["points"].UnsetNthControlPointPosition(2)  # a point not placed yet is no prompt
    points = logic.pointsFromNode(scene["points"], scene["volume"], positive=False)
    assert np.allclose([p.ijk for p in points], [(60, 50, 15), (61, 51, 16)]) and {p.label for p in points} == {0}
    # an ROI of 9 × 8 × 5 mm around that voxel: j ± 5 (x / 0.9), i ± 5 (y / 0.8), k ± 1 (z / 2.5)
    scene["roi"].SetCenterWorld([-28, 43, 36.5])
    scene["roi"].SetSize(9, 8, 5)
    box = logic.boxFromRoiNode(scene["roi"], scene["volume"])
    assert np.allclose(box.min_ijk, (55, 45, 14)) and np.allclose(box.max_ijk, (65, 55, 16))
    # sticking out of the volume (i < 0 below y = -5 + 7·0.8): clamped to the first voxel
    scene["roi"].SetCenterWorld([-28, -5, 36.5])
    assert np.allclose(logic.boxFromRoiNode(scene["roi"], scene["volume"]).min_ijk, (0, 45, 14))
    scene["roi"].SetCenterWorld([500, 500, 500])
    with pytest.raises(InputError, match="does not overlap CT"):
        logic.boxFromRoiNode(scene["roi"], scene["volume"])
    scene["points"].AddControlPointWorld(vtk.vtkVector3d(500, 0, 0))
    with pytest.raises(InputError, match="point 'P-4' of P is outside CT"):
        logic.pointsFromNode(scene["points"], scene["volume"])


def _prompts(scene) -> None:  # noqa: ANN001
    scene["points"].AddControlPointWorld(vtk.vtkVector3d(-28, 43, 36.5))
    scene["roi"].SetCenterWorld([-28, 43, 36.5])
    scene["roi"].SetSize(30, 40, 20)


def test_segments_are_written_named_coloured_and_saved_where_the_ct_is(scene, engine, tmp_path):
    logic, nodes = SceneLogic(engine), scene
    _prompts(nodes)
    (liver,) = logic.segment(nodes["volume"], nodes["segmentation"], text="liver", positiveNode=nodes["points"],
                             roiNode=nodes["roi"], answer=SEG)  # fmt: skip
    volume = logic.volumeFromNode(nodes["volume"])
    points = logic.pointsFromNode(nodes["points"], nodes["volume"])
    box = logic.boxFromRoiNode(nodes["roi"], nodes["volume"])
    expected = engine.segment(engine.encode(volume), text="liver", points=points, boxes=[box], answer=SEG)
    mask = expected.objects[0].mask
    assert mask.sum() > 0 and np.array_equal(logic.maskFromSegment(nodes["segmentation"], liver, nodes["volume"]), mask)
    segment = nodes["segmentation"].GetSegmentation().GetSegment(liver)
    assert segment.GetName() == "liver" and np.allclose(segment.GetColor(), lookup("liver")[0])
    present = np.flatnonzero(expected.objects[0].presence >= 0.5)  # the slices the model saw the liver on
    shown = f"{expected.objects[0].score:.3f}" + (f", slices {present[0]}-{present[-1]}" if len(present) else "")
    assert logic.segmentScore(segment) == shown  # the model's confidence and where, as the segment list shows it
    tag = vtk.reference("")
    assert segment.GetTag("TerminologyEntry", tag) and "^10200004^Liver~" in str(tag)
    # saved by Slicer's own storage node, read back by slicerio: same voxels, same world position
    storage = nodes["scene"].AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "out.seg.nrrd"))
    assert storage.WriteData(nodes["segmentation"])
    saved = read_segmentation(tmp_path / "out.seg.nrrd")
    header = (tmp_path / "out.seg.nrrd").read_bytes()[:20000].decode("latin-1")
    assert f"MedVLSAM2.Score:{expected.objects[0].score:.3f}" in header  # the confidence travels with the file
    assert nodes["segmentation"].GetTransformNodeID() == nodes["volume"].GetTransformNodeID()
    assert np.allclose(SHIFT @ saved.ijk_to_ras, volume.ijk_to_ras)  # the file is in the transform's frame
    (written,) = saved.segments
    assert written.name == "liver" and np.array_equal(written.mask.astype(np.uint8), mask)
    assert np.allclose(written.color, lookup("liver")[0], atol=1e-3) and written.terminology["type"][1] == "10200004"


def test_nothing_is_overwritten_silently_and_undo_restores(scene, engine):
    logic, nodes = SceneLogic(engine), scene
    _prompts(nodes)
    segmentation = nodes["segmentation"].GetSegmentation()
    first = logic.segment(nodes["volume"], nodes["segmentation"], text="liver", roiNode=nodes["roi"], answer=SEG)[0]
    before = logic.maskFromSegment(nodes["segmentation"], first, nodes["volume"])
    second = logic.segment(nodes["volume"], nodes["segmentation"], text="liver", answer=SEG,
                           positiveNode=nodes["points"])[0]  # fmt: skip
    assert segmentation.GetSegment(second).GetName() == "liver 2" and segmentation.GetNumberOfSegments() == 2
    assert np.array_equal(logic.maskFromSegment(nodes["segmentation"], first, nodes["volume"]), before)
    # refine replaces the chosen segment's voxels; one undo brings them back, redo the refined ones
    node = nodes["segmentation"]
    nodes["roi"].SetSize(12, 12, 6)
    logic.segment(nodes["volume"], node, roiNode=nodes["roi"], segmentId=first)  # the box alone
    refined = logic.maskFromSegment(node, first, nodes["volume"])
    assert not np.array_equal(refined, before)
    assert logic.undo(node) and np.array_equal(logic.maskFromSegment(node, first, nodes["volume"]), before)
    assert logic.redo(node) and np.array_equal(logic.maskFromSegment(node, first, nodes["volume"]), refined)
    assert not logic.redo(node) and logic.undo(node)
    assert logic.undo(node) and segmentation.GetNumberOfSegments() == 1 and segmentation.GetSegment(second) is None
    assert logic.undo(node) and segmentation.GetNumberOfSegments() == 0 and not logic.undo(node)
    with pytest.raises(InputError, match="nothing to segment"):
        logic.segment(nodes["volume"], nodes["segmentation"], text="  ")
    with pytest.raises(InputError, match="no backend"):
        SceneLogic().segment(nodes["volume"], nodes["segmentation"], text="liver")


def test_points_give_a_segment_when_the_answer_has_no_seg_and_the_message_is_logged_once(
    scene, engine, answer_without_seg, caplog
):
    logic, nodes = SceneLogic(engine), scene
    _prompts(nodes)
    request = logic.segmentRequest(nodes["volume"], "liver", positiveNode=nodes["points"])
    with caplog.at_level("INFO"):
        result = logic.runSegment(request.pop("volume"), **request)
    logged = [r for r in caplog.records if "the mask comes from your points or box" in r.getMessage()]
    assert result.from_prompts and len(logged) == 1
    (liver,) = logic.writeResult(result, nodes["segmentation"], nodes["volume"])
    assert logic.maskFromSegment(nodes["segmentation"], liver, nodes["volume"]).sum() == result.objects[0].mask.sum()
    with pytest.raises(InputError, match="so it made no mask. Nothing was written"):
        logic.segment(nodes["volume"], nodes["segmentation"], text="liver")


def test_a_result_without_mask_or_message_still_says_why():
    """An older server sends no message with an empty result: the error names the answer instead."""
    from MedVLSAM2Lib.results import SegmentResult

    class _OldServer:
        def encode(self, volume, intensity, cancel):  # noqa: ANN001, ANN202
            return volume

        def segment(self, handle, **prompts):  # noqa: ANN001, ANN003, ANN202
            return SegmentResult("Segment the liver.", "No.", [], np.eye(4), {})

    with pytest.raises(InputError, match=r"^The model answered 'No\.' without a mask\. Nothing was written\.$"):
        SceneLogic(_OldServer()).runSegment(None, text="liver", points=[], boxes=[], answer=None)  # fake: no volume


@pytest.mark.server
def test_the_same_logic_runs_through_a_remote_server(scene, engine, tmp_path):
    port = free_port()
    process = start_server(port, log=tmp_path / "server.log")
    try:
        nodes = scene
        _prompts(nodes)
        remote = SceneLogic(ServerClient(f"http://127.0.0.1:{port}", KEY))
        (segment_id,) = remote.segment(nodes["volume"], nodes["segmentation"], text="liver",
                                       positiveNode=nodes["points"], roiNode=nodes["roi"], answer=SEG)  # fmt: skip
        local = SceneLogic(engine)
        volume = local.volumeFromNode(nodes["volume"])
        expected = engine.segment(engine.encode(volume), text="liver", answer=SEG,
                                  points=local.pointsFromNode(nodes["points"], nodes["volume"]),
                                  boxes=[local.boxFromRoiNode(nodes["roi"], nodes["volume"])])  # fmt: skip
        written = remote.maskFromSegment(nodes["segmentation"], segment_id, nodes["volume"])
        assert written.sum() > 0 and np.array_equal(written, expected.objects[0].mask)
        question = "Is there a liver lesion?"
        assert remote.ask(nodes["volume"], question).text == engine.ask(engine.encode(volume), question).text
    finally:
        stop_server(process)


def test_a_segmentation_node_is_made_only_once_there_is_a_mask(scene, engine):
    """Invalid prompts (or a failed run) leave no empty segmentation node behind; a result makes exactly one."""
    logic, nodes = SceneLogic(engine), scene
    before = nodes["scene"].GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    with pytest.raises(InputError, match="nothing to segment"):
        logic.segment(nodes["volume"], None, text="  ")
    assert nodes["scene"].GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before
    (liver,) = logic.segment(nodes["volume"], None, text="liver", answer=SEG)
    assert nodes["scene"].GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before + 1
    made = nodes["scene"].GetFirstNodeByName(f"{nodes['volume'].GetName()} MedVLSAM2")
    assert made.GetSegmentation().GetSegment(liver).GetName() == "liver"


def test_a_manual_edit_between_two_model_runs_survives_an_undo_of_the_second(scene, engine):
    """Undo goes through Slicer's segmentation history: it returns to the state before the model's last write,
    which holds what the user painted in the Segment Editor after the first run."""
    logic, nodes = SceneLogic(engine), scene
    _prompts(nodes)
    node, volume = nodes["segmentation"], nodes["volume"]
    (liver,) = logic.segment(volume, node, text="liver", roiNode=nodes["roi"], answer=SEG)
    edited = logic.maskFromSegment(node, liver, volume)
    edited[20:24, 40:60, 40:60] = 1  # the user paints more liver (as a Segment Editor effect writes it)
    edited[edited.nonzero()[0][0]] = 0  # and erases the model's first slice
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        logic._labelmap(volume, edited), node, liver, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    )
    (spleen,) = logic.segment(volume, node, text="spleen", positiveNode=nodes["points"], answer=SEG)
    logic.segment(volume, node, roiNode=nodes["roi"], segmentId=liver)  # a refine of the edited liver
    assert not np.array_equal(logic.maskFromSegment(node, liver, volume), edited)
    assert logic.undo(node) and np.array_equal(logic.maskFromSegment(node, liver, volume), edited)
    assert logic.undo(node) and node.GetSegmentation().GetSegment(spleen) is None
    assert np.array_equal(logic.maskFromSegment(node, liver, volume), edited)  # the edit outlives both undos
    # undoing the first run too takes the edited liver away; redo brings it back with the user's edit
    assert logic.undo(node) and node.GetSegmentation().GetNumberOfSegments() == 0 and not logic.undo(node)
    assert logic.redo(node) and np.array_equal(logic.maskFromSegment(node, liver, volume), edited)
    assert logic.redo(node) and node.GetSegmentation().GetSegment(spleen) is not None


def test_the_module_self_test_scenario_passes_on_slicer_core(engine):
    """``MedVLSAM2Test`` (Reload & Test in Slicer) runs this same scenario: box ROI and points on the slicerio chest
    CT, the tiny preset through the module logic, the segment's name, terminology and mask checked."""
    from MedVLSAM2Core.self_test import runSelfTest, selfTestInputs

    ct, reference = selfTestInputs()
    scene = slicer.vtkMRMLScene()
    logic = SceneLogic(engine)
    volumeNode = logic.addVolumeNode(scene, read_volume(ct), "CTChest")
    facts = runSelfTest(logic, volumeNode, reference)
    assert facts["shape"] == (34, 128, 128) and facts["voxels"] > 0 and 0 <= facts["dice"] <= 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 2


def test_the_self_test_scenario_fails_on_an_empty_mask():
    from MedVLSAM2Core.self_test import runSelfTest, selfTestInputs

    from MedVLSAM2Lib.results import ObjectMask, SegmentResult

    class _EmptyMasks:
        def encode(self, volume, intensity, cancel):  # noqa: ANN001, ANN202
            return volume

        def segment(self, handle, **prompts):  # noqa: ANN001, ANN003, ANN202
            mask = np.zeros(handle.array.shape, np.uint8)
            return SegmentResult("q", "It is [SEG].", [ObjectMask("right lung", mask, 0.1)], handle.ijk_to_ras, {})

    ct, reference = selfTestInputs()
    logic = SceneLogic(_EmptyMasks())
    scene = slicer.vtkMRMLScene()  # held: a node does not keep its scene alive
    volumeNode = logic.addVolumeNode(scene, read_volume(ct), "CTChest")
    with pytest.raises(AssertionError, match="the segment is empty"):
        runSelfTest(logic, volumeNode, reference)
