"""M3D-Seg reader on the M3D-Seg-layout case in ../shared/data/m3d."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from MedVLSAM2Lib.data.m3dseg import M3DSegDataset, load_dataset_info, parse_mask_shape
from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.preprocess import GridConfig, to_model
from MedVLSAM2Lib.volume import read_volume

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def m3d_root(data_dir):
    return data_dir / "m3d" / "m3d_seg_format_demo"


def test_demo_case_loads_117_channels_named_like_its_labels(m3d_root, subject_a, total_labels):
    dataset = M3DSegDataset(m3d_root, "demo_totalseg")
    assert len(dataset.categories) == 117 and dataset.categories[4] == "liver"
    (case,) = list(dataset.cases("train"))
    assert case.mask_shape == (117, 122, 101, 30)
    image, masks = case.load_image(), case.load_masks()
    assert image.shape == (1, 122, 101, 30) and masks.shape == (117, 122, 101, 30)
    # channel c is TotalSegmentator label c + 1 of the source label map, in NIfTI (x, y, z) order
    labels_xyz = read_volume(subject_a / "example_seg.nii.gz").array.transpose(2, 1, 0)
    for name in ("liver", "spleen", "vertebrae L1"):
        channel = dataset.categories.index(name)
        np.testing.assert_array_equal(masks[channel], labels_xyz == channel + 1)
    assert int(masks.sum()) == 110225
    volume = case.to_volume()
    assert volume.array.shape == (30, 101, 122)
    # M3D's own recipe only swaps axes to (Z, Y, X): mapping to the model grid must not flip them either
    image, _ = to_model(volume, GridConfig(spatial_size=(30, 101, 122), crop_foreground=False))
    low, high = volume.array.min(), volume.array.max()
    np.testing.assert_allclose(image, (volume.array - low) / (high - low), atol=1e-5)


def test_dataset_info_lists_26_codes(data_dir):
    info = load_dataset_info(data_dir / "m3d" / "dataset_info.json")
    assert len(info) == 26 and info["0000"] == ["liver"] and len(info["0011"]) == 104


def test_mask_file_name_is_parsed_and_bad_names_refused():
    assert parse_mask_shape("mask_(2, 3, 4, 5).npz") == (2, 3, 4, 5)
    with pytest.raises(InputError, match="must be named"):
        parse_mask_shape("mask.npz")


def test_channel_count_mismatch_is_reported(m3d_root, tmp_path):
    root = tmp_path / "M3D_Seg"
    shutil.copytree(m3d_root, root)
    json_path = root / "demo_totalseg" / "demo_totalseg.json"
    description = json.loads(json_path.read_text())
    description["labels"].pop("117")
    json_path.write_text(json.dumps(description))
    with pytest.raises(InputError, match="117 mask channels but 116 categories"):
        list(M3DSegDataset(root, "demo_totalseg").cases())


def test_missing_dataset_json_says_where_it_looked(tmp_path):
    with pytest.raises(InputError, match=r"0003\.json: no dataset JSON"):
        M3DSegDataset(tmp_path, "0003")
