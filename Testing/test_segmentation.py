"""Slicer .seg.nrrd writing and reading through slicerio: names, colours, overlaps, geometry."""

from __future__ import annotations

import numpy as np
import pytest
import slicerio

from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.segmentation import Segment, Segmentation, read_segmentation, write_segmentation
from MedVLSAM2Lib.volume import read_volume


@pytest.mark.realdata
def test_label_map_written_as_seg_nrrd_reads_back_identically(subject_a, total_labels, tmp_path):
    labels = read_volume(subject_a / "example_seg.nii.gz").reoriented("LPS")
    names = {total_labels[n]: n for n in ("liver", "spleen", "kidney_left", "kidney_right")}
    segmentation = Segmentation.from_label_map(labels, names)
    path = write_segmentation(segmentation, tmp_path / "organs.seg.nrrd")
    assert slicerio.segment_names(slicerio.read_segmentation(str(path), skip_voxels=True)) == [
        names[k] for k in sorted(names)
    ]
    back = read_segmentation(path)
    np.testing.assert_allclose(back.ijk_to_ras, labels.ijk_to_ras, atol=1e-5)
    for label, name in names.items():
        np.testing.assert_array_equal(back.mask(name), labels.array == label)
    assert [p.name for p in tmp_path.iterdir()] == ["organs.seg.nrrd"]


def test_overlapping_segments_keep_their_own_masks(tmp_path):
    a = np.zeros((4, 5, 6), bool)
    b = np.zeros((4, 5, 6), bool)
    a[1:3, 1:4, 1:5] = True
    b[2:4, 2:5, 3:6] = True  # overlaps a
    color = (0.1, 0.2, 0.3)
    terminology = {
        "contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
        "category": ["SCT", "123037004", "Anatomical Structure"],
        "type": ["SCT", "10200004", "Liver"],
    }
    segmentation = Segmentation(
        np.diag([2.0, 2.0, 3.0, 1.0]), [Segment("liver", a, color, terminology), Segment("lesion", b)]
    )
    back = read_segmentation(write_segmentation(segmentation, tmp_path / "s.seg.nrrd"))
    np.testing.assert_array_equal(back.mask("liver"), a)
    np.testing.assert_array_equal(back.mask("lesion"), b)
    assert back.segments[0].color == pytest.approx(color)
    assert back.segments[0].terminology["type"][2] == "Liver"


@pytest.mark.realdata
def test_plain_label_map_is_not_taken_for_a_segmentation(data_dir):
    with pytest.raises(InputError, match="no segments in this file"):
        read_segmentation(data_dir / "dcmqi_ct3slice" / "liver_seg.nrrd")


def test_bad_segmentations_are_refused(tmp_path):
    mask = np.ones((2, 2, 2), bool)
    with pytest.raises(InputError, match=r"must end in \.seg\.nrrd"):
        write_segmentation(Segmentation(np.eye(4), [Segment("a", mask)]), tmp_path / "a.nrrd")
    with pytest.raises(InputError, match="no segments"):
        write_segmentation(Segmentation(np.eye(4), []), tmp_path / "a.seg.nrrd")
    with pytest.raises(InputError, match="unique"):
        write_segmentation(Segmentation(np.eye(4), [Segment("a", mask), Segment("a", mask)]), tmp_path / "a.seg.nrrd")
    with pytest.raises(InputError, match="No segment named 'b'"):
        Segmentation(np.eye(4), [Segment("a", mask)]).mask("b")
    assert list(tmp_path.iterdir()) == []
