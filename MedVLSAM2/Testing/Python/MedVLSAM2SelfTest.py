"""Self-test of the MedVLSAM2 module in a real 3D Slicer (ctest, or the module's Reload and Test button).

Loads a sample CT, segments it with the tiny random-weight preset through the module Logic and checks that a
named segment with voxels lands in a segmentation node on the CT's grid. The model run is the heavy part: it
runs only when the dependencies are installed and ``MEDVLSAM2_SELFTEST_MODEL=1`` is set (as TotalSegmentator's
self-test keeps its full run behind a flag); otherwise only the node conversions are tested.
"""

import os

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


class MedVLSAM2SelfTest(ScriptedLoadableModuleTest):
    """Node conversions always; the tiny model when asked for."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_conversions_and_segmentation()

    def test_conversions_and_segmentation(self):
        import SampleData

        from MedVLSAM2 import MedVLSAM2Logic

        volumeNode = SampleData.downloadSample("CTChest")
        logic = MedVLSAM2Logic()
        volume = logic.scene.volumeFromNode(volumeNode)
        self.assertEqual(volume.array.shape, slicer.util.arrayFromVolume(volumeNode).shape)
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
        centre = volume.ijk_to_ras @ np.r_[np.array(volume.shape_ijk) / 2.0, 1.0]
        points.AddControlPointWorld(centre[:3].tolist())
        (point,) = logic.scene.pointsFromNode(points, volumeNode)
        self.assertTrue(np.allclose(point.ijk, np.array(volume.shape_ijk) / 2.0, atol=1e-3))
        if os.environ.get("MEDVLSAM2_SELFTEST_MODEL") != "1":
            self.delayDisplay("MedVLSAM2: set MEDVLSAM2_SELFTEST_MODEL=1 to also run the tiny model")
            return
        logic.loadLocal("tiny", "cpu")
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        (segmentId,) = logic.scene.segment(volumeNode, segmentationNode, text="liver", positiveNode=points,
                                           answer="It is [SEG].")  # fmt: skip
        self.assertEqual(segmentationNode.GetSegmentation().GetSegment(segmentId).GetName(), "liver")
        mask = logic.scene.maskFromSegment(segmentationNode, segmentId, volumeNode)
        self.assertEqual(mask.shape, slicer.util.arrayFromVolume(volumeNode).shape)
        self.delayDisplay("MedVLSAM2 self-test passed")
