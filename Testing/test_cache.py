"""The preprocessing cache: exact model-grid tensors, resume, parallel workers, checksums."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
from corpus import ORGANS, load_pair

from MedVLSAM2Lib.cli import main
from MedVLSAM2Lib.data import cache as cache_module
from MedVLSAM2Lib.data.cache import CacheItem, VolumeCache, prepare
from MedVLSAM2Lib.data.ctrate import cache_items as ctrate_items
from MedVLSAM2Lib.data.m3dseg import M3DSegDataset
from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.preprocess import SAM_INPUT_VERSION, GridConfig, mask_to_model, sam_input, to_model
from MedVLSAM2Lib.volume import read_volume, write_volume

pytestmark = pytest.mark.realdata
GRID = GridConfig(spatial_size=(16, 64, 64))
WINDOW = (-160.0, 240.0)


def _subject_items(subject_a, total_labels):
    names = {n: total_labels[n] for n in ORGANS}
    ct_sm = partial(load_pair, subject_a / "example_ct_sm.nii.gz", subject_a / "example_seg.nii.gz", names)
    ct = partial(load_pair, subject_a / "example_ct.nii.gz", subject_a / "example_seg_fast_force_split.nii.gz", names)
    return [CacheItem("subjectA_sm", ct_sm), CacheItem("subjectA", ct)]


def test_cache_reproduces_the_model_grid_tensors_exactly(subject_a, total_labels, tmp_path):
    items = _subject_items(subject_a, total_labels)
    prepare(items, tmp_path / "cache", GRID, WINDOW, workers=2)
    cache = VolumeCache(tmp_path / "cache")
    cache.verify()
    volume, masks = items[1].load()
    image, record = to_model(volume, GRID)
    windowed, _ = to_model(volume, GridConfig(spatial_size=GRID.spatial_size, intensity="window", window=WINDOW))
    cached = cache.load("subjectA")
    np.testing.assert_array_equal(cached.image, image)
    np.testing.assert_array_equal(cached.sam_image, windowed)
    assert cached.record == record and cached.categories == list(masks)
    for n, mask in enumerate(masks.values()):
        np.testing.assert_array_equal(cached.masks[n], mask_to_model(mask.astype(np.uint8), record))


def test_prepare_resumes_and_skips_finished_volumes(subject_a, total_labels, tmp_path):
    items = _subject_items(subject_a, total_labels)
    folder = tmp_path / "cache"
    prepare(items[:1], folder, GRID, WINDOW)  # an interrupted run: one volume done
    first = (folder / "volumes" / "subjectA_sm.npz").stat().st_mtime_ns
    written = []
    prepare(items, folder, GRID, WINDOW, on_progress=lambda done, total, name: written.append((done, total, name)))
    assert written == [(2, 2, "subjectA")]  # only the missing volume was converted
    assert (folder / "volumes" / "subjectA_sm.npz").stat().st_mtime_ns == first
    with pytest.raises(InputError, match="other settings"):
        prepare(items, folder, GridConfig(spatial_size=(8, 32, 32)), WINDOW)


def test_corrupt_cached_file_is_named_before_training(subject_a, total_labels, tmp_path):
    prepare(_subject_items(subject_a, total_labels)[:1], tmp_path / "cache", GRID, WINDOW)
    path = tmp_path / "cache" / "volumes" / "subjectA_sm.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"subjectA_sm\.npz: checksum mismatch"):
        VolumeCache(tmp_path / "cache").verify()


def test_a_cache_from_before_the_one_sam2_input_is_refused(subject_a, total_labels, tmp_path):
    prepare(_subject_items(subject_a, total_labels)[:1], tmp_path / "cache", GRID, WINDOW)
    index = tmp_path / "cache" / "index.json"
    index.write_text(index.read_text().replace('"sam_window": [', '"old_window": ['))
    with pytest.raises(InputError, match="no 'sam_window'.*prepare` again into a new folder"):
        VolumeCache(tmp_path / "cache")


def test_a_cache_of_another_sam2_input_version_is_refused(subject_a, total_labels, tmp_path, monkeypatch):
    items = _subject_items(subject_a, total_labels)[:1]
    prepare(items, tmp_path / "cache", GRID, WINDOW)
    index = tmp_path / "cache" / "index.json"
    assert f'"sam_input_version": {SAM_INPUT_VERSION}' in index.read_text()
    monkeypatch.setattr(cache_module, "SAM_INPUT_VERSION", SAM_INPUT_VERSION + 1)  # e.g. FAT_HU changed
    with pytest.raises(InputError, match=rf"version {SAM_INPUT_VERSION}, this version makes {SAM_INPUT_VERSION + 1}; "
                                         r"run `medvlsam2 prepare` again"):  # fmt: skip
        VolumeCache(tmp_path / "cache")
    with pytest.raises(InputError, match=r"run `medvlsam2 prepare` again"):  # resuming it is refused too
        prepare(items, tmp_path / "cache", GRID, WINDOW)


def test_prepare_command_converts_the_m3d_seg_case(data_dir, tmp_path, capsys):
    root = data_dir / "m3d" / "m3d_seg_format_demo"
    args = ["prepare", "m3dseg", str(root), str(tmp_path / "cache"), "--code", "demo_totalseg", "--preset", "tiny"]
    assert main(args) == 0
    assert "prepared    1 volumes" in capsys.readouterr().out
    cached = VolumeCache(tmp_path / "cache").load("demo_totalseg_example_ct_sm")
    case = next(M3DSegDataset(root, "demo_totalseg").cases())
    assert cached.masks.shape == (117, 16, 64, 64) and len(cached.categories) == 117
    expected, _ = to_model(case.to_volume(), GRID)
    np.testing.assert_array_equal(cached.image, expected)
    # SAM2 sees the HU window of the z-scores put back on an estimated HU scale, as at inference
    np.testing.assert_array_equal(cached.sam_image, sam_input(case.to_volume(), GRID, WINDOW, "normalized"))
    assert main(["prepare", "m3dseg", str(root), str(tmp_path / "other")]) == 2  # --code is required


def test_ctrate_items_name_a_missing_volume(subject_a, tmp_path):
    reports = tmp_path / "reports.csv"
    reports.write_text(
        "VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN,Impressions_EN\n"
        "valid_1_a_1.nii.gz,Not given.,CT,Normal.,Normal.\nvalid_2_a_1.nii.gz,Not given.,CT,Normal.,Normal.\n"
    )
    from MedVLSAM2Lib.data.ctrate import volume_path

    write_volume(read_volume(subject_a / "example_ct_sm.nii.gz"), volume_path(tmp_path, "valid_1_a_1"))
    with pytest.raises(
        InputError, match=r"valid_2_a_1\.nii\.gz: volume 'valid_2_a_1' listed in .*reports\.csv is missing"
    ):
        ctrate_items(tmp_path, reports)
    reports.write_text(reports.read_text().splitlines()[0] + "\n" + reports.read_text().splitlines()[1] + "\n")
    entries = prepare(ctrate_items(tmp_path, reports), tmp_path / "cache", GRID, WINDOW)
    assert list(entries) == ["valid_1_a_1"] and entries["valid_1_a_1"]["categories"] == []
