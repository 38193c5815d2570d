"""DICOM SEG export (:mod:`MedVLSAM2Lib.dicom_seg`) on the dcmqi 3-slice CT: the SEG reads back with highdicom and
with plain pydicom, references the source series, carries our codes and algorithm, and its frames equal our masks
slice for slice, whichever order the files or the grid's k axis come in; then ``medvlsam2 segment … -o out.dcm``."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from MedVLSAM2Lib.cli import main
from MedVLSAM2Lib.dicom_seg import (
    ALGORITHM_NAME,
    GENERIC_CODE,
    read_sources,
    series_files,
    slice_indices,
    write_dicom_seg,
)
from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.results import ObjectMask, SegmentResult
from MedVLSAM2Lib.volume import read_volume

pytestmark = pytest.mark.realdata

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
NOT_DICOM = "DICOM SEG output needs a DICOM series input (it references the source images); got "


@pytest.fixture(scope="module")
def ct3(data_dir):  # noqa: ANN001, ANN201
    return data_dir / "dcmqi_ct3slice" / "dicom"


@pytest.fixture(scope="module")
def series(ct3):  # noqa: ANN001, ANN201
    """The volume as read_volume reads it, and the source headers in k order as this test finds it: axial slices
    (identity orientation), so k runs up the patient's z (03.dcm, 02.dcm, 01.dcm; the README says so)."""
    volume = read_volume(ct3)
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(ct3.glob("*.dcm"))]
    assert all([float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0] for d in sources)
    return volume, sorted(sources, key=lambda d: float(d.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def masks(data_dir, series):  # noqa: ANN001, ANN201
    """Two KJI masks on the series' grid: the real liver label map, and a "lesion" unlike itself under any flip
    (different boxes on slices 0 and 2, nothing on slice 1)."""
    volume, _ = series
    liver = read_volume(data_dir / "dcmqi_ct3slice" / "liver_seg.nrrd")
    assert np.allclose(liver.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
    lesion = np.zeros(volume.array.shape, np.uint8)
    lesion[0, 40:60, 300:340] = 1
    lesion[2, 200:210, 100:180] = 1
    return {"liver": (liver.array == 1).astype(np.uint8), "lesion": lesion}


def _uids(sources) -> list[str]:  # noqa: ANN001
    return [d.SOPInstanceUID for d in sources]


def _frames_by_pydicom(path, uids: list[str], segments: int) -> np.ndarray:  # noqa: ANN001
    """The SEG's frames put back per source slice with plain pydicom: ``(K, rows, columns, segments)``."""
    seg = pydicom.dcmread(path)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    out = np.zeros((len(uids), seg.Rows, seg.Columns, segments), np.uint8)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out[uids.index(uid), :, :, item.SegmentIdentificationSequence[0].ReferencedSegmentNumber - 1] = frame
    return out


def test_seg_references_the_series_and_holds_our_masks_slice_for_slice(series, masks, tmp_path):
    volume, sources = series
    path = write_dicom_seg(list(masks.items()), series_files(volume), tmp_path / "out.dcm",
                           ijk_to_ras=volume.ijk_to_ras)  # fmt: skip
    expected = np.stack([masks["liver"], masks["lesion"]], axis=-1)  # (K, J, I, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["out.dcm"]

    seg = hd.seg.segread(path)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.get_segment_numbers() == [1, 2]
    liver, lesion = seg.get_segment_description(1), seg.get_segment_description(2)
    assert (liver.segment_label, lesion.segment_label) == ("liver", "lesion")
    assert (liver.segmented_property_type.scheme_designator, liver.segmented_property_type.value) == ("SCT", "10200004")
    assert liver.segmented_property_category.value == "123037004"  # our terminology's "Anatomical Structure"
    assert lesion.segmented_property_type.value == lesion.segmented_property_category.value == "85756007"  # Tissue
    assert GENERIC_CODE == (codes.SCT.Tissue.scheme_designator, codes.SCT.Tissue.value, codes.SCT.Tissue.meaning)
    for description in (liver, lesion):
        algorithm = description.algorithm_identification[0]
        assert description.algorithm_type.value == "AUTOMATIC" and algorithm.AlgorithmName == ALGORITHM_NAME
        assert algorithm.AlgorithmVersion == metadata.version("MedVLSAM2Lib")
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodingSchemeDesignator, family.CodeValue, family.CodeMeaning) == (
            "DCM", "123110", "Artificial Intelligence")  # fmt: skip
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(_uids(sources))
    for key in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID"):
        assert seg[key].value == sources[0][key].value, key
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID and seg.Manufacturer and seg.SoftwareVersions
    np.testing.assert_array_equal(seg.get_pixels_by_source_instance(_uids(sources), segment_numbers=[1, 2]), expected)

    np.testing.assert_array_equal(_frames_by_pydicom(path, _uids(sources), 2), expected)
    plain = pydicom.dcmread(path)
    assert plain.NumberOfFrames == sum(expected[k, :, :, s].any() for k in range(3) for s in range(2)) == 5
    for item in plain.PerFrameFunctionalGroupsSequence:  # every frame lies where its source image lies
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        source = sources[_uids(sources).index(uid)]
        np.testing.assert_allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in source.ImagePositionPatient], atol=1e-3)  # fmt: skip


def test_slices_are_matched_by_position_not_by_file_order_or_k_direction(series, masks, tmp_path):
    volume, sources = series
    files = series_files(volume)
    assert slice_indices(read_sources(files), volume.array.shape) == [0, 1, 2]
    assert slice_indices(read_sources(files[::-1]), volume.array.shape) == [2, 1, 0]
    lesion = masks["lesion"]
    k_flip = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 2], [0, 0, 0, 1]], float)  # k -> 2 - k
    written = {
        "reversed files": write_dicom_seg([("lesion", lesion)], files[::-1], tmp_path / "a.dcm"),
        "flipped grid": write_dicom_seg(
            [("lesion", lesion[::-1])], files, tmp_path / "b.dcm", ijk_to_ras=volume.ijk_to_ras @ k_flip
        ),
    }
    for case, path in written.items():
        back = hd.seg.segread(path).get_pixels_by_source_instance(_uids(sources), segment_numbers=[1])
        np.testing.assert_array_equal(back[..., 0], lesion, err_msg=case)
    i_flip = np.array([[-1, 0, 0, 511], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)  # a reoriented volume
    with pytest.raises(InputError, match="does not lie on a slice of the masks' grid"):
        write_dicom_seg([("lesion", lesion[:, :, ::-1])], files, tmp_path / "c.dcm",
                        ijk_to_ras=volume.ijk_to_ras @ i_flip)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dcm", "b.dcm"]


def test_sides_empty_segments_and_empty_results(series, masks, tmp_path):
    """A side becomes the type's modifier; an empty segment keeps its number (no frames); all empty is refused."""
    volume, sources = series
    nothing = np.zeros_like(masks["lesion"])
    objects = [ObjectMask("left kidney", masks["lesion"], 0.9), ObjectMask("cyst", nothing, 0.1)]
    result = SegmentResult("q", "a", objects, volume.ijk_to_ras.copy(), {})
    path = write_dicom_seg(result, series_files(volume), tmp_path / "kidney.dcm")
    plain = pydicom.dcmread(path)
    kind = plain.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning) == ("64033007", "Left")
    assert [s.SegmentLabel for s in plain.SegmentSequence] == ["left kidney", "cyst"] and plain.NumberOfFrames == 2
    back = hd.seg.segread(path).get_pixels_by_source_instance(_uids(sources), segment_numbers=[1, 2])
    np.testing.assert_array_equal(back, np.stack([masks["lesion"], nothing], axis=-1))
    result.objects[0].mask = nothing
    with pytest.raises(InputError, match="every segment is empty"):
        write_dicom_seg(result, series_files(volume), tmp_path / "empty.dcm")
    with pytest.raises(InputError, match="of one shape"):
        write_dicom_seg([("a", masks["lesion"]), ("b", nothing[:2])], series_files(volume), tmp_path / "empty.dcm")
    with pytest.raises(InputError, match="the masks have 2 slices but the series has 3 images"):
        write_dicom_seg([("a", masks["lesion"][:2])], series_files(volume), tmp_path / "empty.dcm")
    assert [p.name for p in tmp_path.iterdir()] == ["kidney.dcm"]


def test_a_series_without_uids_is_refused_before_anything_is_written(data_dir, tmp_path):
    """The TotalSegmentator DICOM series was anonymised with its UIDs blanked: a SEG could not reference it."""
    folder = data_dir / "totalsegmentator" / "subjectC_petct_dicom" / "dicom"
    volume = read_volume(folder)
    mask = np.zeros(volume.array.shape, np.uint8)
    mask[5, 100:120, 100:120] = 1
    with pytest.raises(
        InputError, match=r"no SOPClassUID, SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID;.*anonymised"
    ):
        write_dicom_seg([("liver", mask)], series_files(volume), tmp_path / "x.dcm", ijk_to_ras=volume.ijk_to_ras)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_file(series, masks, tmp_path, monkeypatch):
    volume, _ = series

    def half_then_fail(self, filename, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        Path(filename).write_bytes(b"DICM half a file")
        raise OSError("disk full")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_seg([("lesion", masks["lesion"])], series_files(volume), tmp_path / "out.dcm")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_writes_a_dicom_seg_of_the_mask_it_computed(ct3, series, tmp_path, capsys, monkeypatch):
    """The tiny model's mask (caught on its way to the writer) is what the SEG holds, per source slice."""
    import MedVLSAM2Lib.dicom_seg as dicom_seg

    _, sources = series
    caught = []

    def catch(objects, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        caught.extend(o.mask.copy() for o in objects)
        return write_dicom_seg(objects, *args, **kwargs)

    monkeypatch.setattr(dicom_seg, "write_dicom_seg", catch)
    args = ["segment", str(ct3), "--text", "liver", "--answer", "It is [SEG].", "--preset", "tiny", "--json"]
    assert main([*args, "-o", str(tmp_path / "liver.dcm")]) == 0
    reported = json.loads(capsys.readouterr().out)
    seg = hd.seg.segread(tmp_path / "liver.dcm")
    frames = seg.get_pixels_by_source_instance(_uids(sources), segment_numbers=[1])[..., 0]
    assert [(o["label"], o["value"]) for o in reported["objects"]] == [("liver", 1)] and len(caught) == 1
    assert reported["output"] == str(tmp_path / "liver.dcm") and 0 < frames.sum() == reported["objects"][0]["voxels"]
    np.testing.assert_array_equal(frames, caught[0])
    assert seg.get_segment_description(1).segment_label == "liver"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID


@pytest.mark.parametrize("source", ["nifti", "blank uids"])
def test_dcm_output_needs_a_referable_series_and_fails_before_the_model_loads(source, subject_a, data_dir, tmp_path,
                                                                              monkeypatch, capsys):  # fmt: skip
    from MedVLSAM2Lib.engine import InferenceEngine

    def no_model(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(InferenceEngine, "load", no_model)
    ct = {"nifti": subject_a / "example_ct_sm.nii.gz",
          "blank uids": data_dir / "totalsegmentator" / "subjectC_petct_dicom" / "dicom"}[source]  # fmt: skip
    assert main(["segment", str(ct), "--text", "liver", "--preset", "tiny", "-o", str(tmp_path / "x.dcm")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = NOT_DICOM + str(ct) if source == "nifti" else "no SOPClassUID, SOPInstanceUID, StudyInstanceUID"
    assert len(lines) == 1 and lines[0].startswith("medvlsam2 segment: error: ") and expected in lines[0]
    assert list(tmp_path.iterdir()) == []
