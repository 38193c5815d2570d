"""Volume readers and writers on the real corpus: DICOM (JPEG 2000 and GE), NIfTI, NRRD, MHA; bad input."""

from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import nrrd
import numpy as np
import pytest

from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.volume import Volume, list_dicom_series, read_volume, write_volume

pytestmark = pytest.mark.realdata


def test_jpeg2000_dicom_series_lies_on_the_grid_of_its_label_map(data_dir):
    folder = data_dir / "totalsegmentator" / "subjectC_petct_dicom"
    ct = read_volume(folder / "dicom")
    labels = read_volume(folder / "example_seg_dicom.nii.gz")
    assert ct.array.shape == (20, 512, 512)
    assert ct.metadata["modality"] == "CT" and ct.metadata["files"] == 20
    # The NIfTI is stored LAS, the DICOM LPS: the same grid up to a row flip, which reorienting removes.
    ct_lps, labels_lps = ct.reoriented("LPS"), labels.reoriented("LPS")
    assert labels_lps.array.shape == ct_lps.array.shape
    np.testing.assert_allclose(ct_lps.ijk_to_ras, labels_lps.ijk_to_ras, atol=1e-3)
    assert ct.array.min() == -1024  # RescaleIntercept applied: stored 0 is air at -1024 HU
    assert 84 <= ct_lps.array[labels_lps.array == 5].mean() <= 94  # liver, id 5


def test_ge_three_slice_series_aligns_with_its_liver_nrrd(data_dir):
    folder = data_dir / "dcmqi_ct3slice"
    ct = read_volume(folder / "dicom")
    liver = read_volume(folder / "liver_seg.nrrd")
    assert ct.array.shape == liver.array.shape == (3, 512, 512)
    np.testing.assert_allclose(ct.ijk_to_ras, liver.ijk_to_ras, atol=1e-3)
    assert 32 <= ct.array[liver.array == 1].mean() <= 42
    # LPS files become RAS: x and y of the NRRD header's LPS origin change sign, z stays.
    origin_lps = nrrd.read_header(str(folder / "liver_seg.nrrd"))["space origin"]
    np.testing.assert_allclose(liver.ijk_to_ras[:3, 3], origin_lps * np.array([-1, -1, 1]), atol=1e-6)
    assert ct.ijk_to_ras[2, 3] == pytest.approx(-128.69, abs=0.01)


def test_nifti_reader_matches_nibabel_array_order_and_affine(subject_a):
    path = subject_a / "example_ct_sm.nii.gz"
    volume = read_volume(path)
    reference = nib.load(str(path))
    assert volume.array.shape == reference.shape[::-1]
    np.testing.assert_array_equal(volume.array, np.asarray(reference.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(volume.ijk_to_ras, reference.affine)
    assert volume.axcodes == ("R", "A", "S")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_written_volume_reads_back_with_identical_voxels_and_geometry(subject_a, tmp_path, suffix):
    volume = read_volume(subject_a / "example_ct_sm.nii.gz").reoriented("LPI")  # a non-trivial direction matrix
    path = write_volume(volume, tmp_path / f"ct{suffix}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_allclose(back.ijk_to_ras, volume.ijk_to_ras, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [f"ct{suffix}"]  # no temporary file left


def test_reoriented_keeps_every_voxel_at_its_world_position(subject_a):
    volume = read_volume(subject_a / "example_ct_sm.nii.gz")
    flipped = volume.reoriented("LPI")
    assert flipped.axcodes == ("L", "P", "I")
    i, j, k = 7, 33, 21
    world = volume.ijk_to_ras @ [i, j, k, 1]
    i2, j2, k2, _ = np.linalg.solve(flipped.ijk_to_ras, world)
    assert flipped.array[round(k2), round(j2), round(i2)] == volume.array[k, j, i]


def test_missing_path_names_the_path(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "absent.nii.gz")


def test_unsupported_extension_lists_supported_ones(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match=r"scan\.png: unsupported file type '\.png'.*\.nii\.gz"):
        read_volume(path)


def test_truncated_nifti_is_reported_as_truncated(subject_a, tmp_path):
    data = (subject_a / "example_ct_sm.nii.gz").read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.nii\.gz: cannot read NIfTI .*truncated"):
        read_volume(path)


def test_single_dicom_slice_is_rejected_as_2d(data_dir):
    with pytest.raises(InputError, match=r"CT_small\.dcm: this is a 2D image"):
        read_volume(data_dir / "pydicom" / "CT_small.dcm")


def test_2d_nifti_is_rejected(tmp_path):
    path = tmp_path / "slice.nii"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), str(path))
    with pytest.raises(InputError, match="2D image"):
        read_volume(path)


def test_folder_with_two_series_lists_them_and_reads_the_chosen_one(data_dir, tmp_path):
    for source in [
        data_dir / "dcmqi_ct3slice" / "dicom",
        data_dir / "totalsegmentator" / "subjectC_petct_dicom" / "dicom",
    ]:
        for f in source.iterdir():
            shutil.copy(f, tmp_path / f"{source.parent.name}_{f.name}")
    series = list_dicom_series(tmp_path)
    assert sorted(s["files"] for s in series) == [3, 20]
    with pytest.raises(InputError, match=r"holds 2 DICOM series; choose one with --series UID") as info:
        read_volume(tmp_path)
    assert "CT Body 3.0" in str(info.value) and "20 files" in str(info.value)
    three = next(s for s in series if s["files"] == 3)
    assert read_volume(tmp_path, series_uid=three["uid"]).array.shape == (3, 512, 512)
    with pytest.raises(InputError, match="no DICOM series with UID '1.2.3'"):
        read_volume(tmp_path, series_uid="1.2.3")


def test_series_with_a_missing_slice_is_refused(data_dir, tmp_path):
    import SimpleITK as sitk

    source = data_dir / "totalsegmentator" / "subjectC_petct_dicom" / "dicom"
    ordered = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(source))
    for n, f in enumerate(ordered):
        if n != 10:
            shutil.copy(f, tmp_path)
    with pytest.raises(InputError, match=r"not evenly spaced: 4\.000 mm .* 2\.000 mm elsewhere"):
        read_volume(tmp_path)


@pytest.mark.parametrize("dtype", [bool, np.int64])
def test_masks_and_int64_label_maps_are_writable(tmp_path, dtype):
    array = (np.arange(60).reshape(3, 4, 5) % 3 == 0).astype(dtype)
    for suffix in (".nii.gz", ".nrrd"):
        back = read_volume(write_volume(Volume(array, np.eye(4)), tmp_path / f"m{suffix}"))
        np.testing.assert_array_equal(back.array, array.astype(np.int64))


def test_non_numeric_voxels_are_refused():
    with pytest.raises(InputError, match="scalar numbers"):
        Volume(np.zeros((2, 2, 2), dtype=[("r", "u1"), ("g", "u1"), ("b", "u1")]), np.eye(4))


def test_folder_without_dicom_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM series found"):
        read_volume(tmp_path)


def test_corrupt_nrrd_is_reported(tmp_path):
    path = tmp_path / "bad.nrrd"
    path.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: gzip\n\nnot gzip")
    with pytest.raises(InputError, match=r"bad\.nrrd: cannot read image"):
        read_volume(path)


def test_volume_rejects_bad_geometry():
    with pytest.raises(InputError, match="expected a 3D array"):
        Volume(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(InputError, match="singular"):
        Volume(np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]))


def test_write_volume_refuses_unknown_suffix_and_leaves_nothing(tmp_path):
    volume = Volume(np.zeros((2, 3, 4), np.int16), np.eye(4))
    with pytest.raises(InputError, match="cannot write"):
        write_volume(volume, tmp_path / "x.vtk")
    assert list(tmp_path.iterdir()) == []


def test_gzip_header_of_truncated_file_is_not_mistaken_for_data(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(gzip.compress(b""))
    with pytest.raises(InputError, match="empty.nii.gz"):
        read_volume(path)


def test_contains_ijk_uses_voxel_edges():
    volume = Volume(np.zeros((4, 5, 6)), np.eye(4))
    assert volume.contains_ijk((5.4, 4.4, 3.4)) and not volume.contains_ijk((5.6, 0, 0))
    assert volume.shape_ijk == (6, 5, 4)
