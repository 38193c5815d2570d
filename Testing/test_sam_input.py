"""SAM2's one input image (``preprocess.sam_input``): a real CT in HU and the same CT stored as M3D-Seg stores it.

Measure: the mean and the largest absolute difference of the two SAM2 inputs, in SAM2-input units (1.0 = the whole
-160..240 HU window, so 0.0025 = 1 HU), on the CT's own voxel grid (no crop, no resampling: only the intensity
mapping is compared). Thresholds: mean <= 0.005 (2 HU), largest <= 0.025 (10 HU). Measured on TotalSegmentator's
``example_ct_sm`` and its M3D-Seg copy ``demo_totalseg/example_ct_sm/image.npy``: mean 0.0017, largest 0.0115; the
residual is how far this CT's fat and soft-tissue peaks sit from -100 and 40 HU (estimated HU = 0.97 x true).
Before ``sam_input`` SAM2 saw the per-volume min-max of the z-scores, which fails the mean threshold many times over.
"""

from __future__ import annotations

import numpy as np
import pytest

from MedVLSAM2Lib.data.m3dseg import M3DSegDataset
from MedVLSAM2Lib.errors import InputError, IntensityScaleError
from MedVLSAM2Lib.preprocess import GridConfig, sam_input, to_model
from MedVLSAM2Lib.volume import Volume, read_volume

pytestmark = pytest.mark.realdata

WINDOW = (-160.0, 240.0)
MEAN_LIMIT, MAX_LIMIT = 0.005, 0.025


@pytest.fixture(scope="module")
def pair(data_dir, subject_a) -> tuple[Volume, Volume]:
    """(the CT in HU, the same CT as M3D-Seg stores it). M3D-Seg keeps no geometry, so the stored array gets the
    NIfTI's: the two volumes differ in their intensities only."""
    hu = read_volume(subject_a / "example_ct_sm.nii.gz")
    (case,) = M3DSegDataset(data_dir / "m3d" / "m3d_seg_format_demo", "demo_totalseg").cases()
    stored = case.load_image()[0].transpose(2, 1, 0)  # (X, Y, Z) -> KJI
    return hu, Volume(np.ascontiguousarray(stored), hu.ijk_to_ras.copy())


def _voxel_grid(volume: Volume) -> GridConfig:
    """The model grid that is the volume itself: no crop, no resampling."""
    return GridConfig(spatial_size=volume.reoriented("LPS").array.shape, crop_foreground=False)


def test_a_ct_in_hu_and_its_m3d_seg_copy_give_sam2_the_same_image(pair):
    hu, stored = pair
    grid = _voxel_grid(hu)
    difference = np.abs(sam_input(hu, grid, WINDOW, "hu") - sam_input(stored, grid, WINDOW, "normalized"))
    assert difference.mean() <= MEAN_LIMIT and difference.max() <= MAX_LIMIT, (difference.mean(), difference.max())
    before, _ = to_model(stored, grid)  # the old M3D-Seg SAM2 input: min-max of the z-scores
    assert np.abs(sam_input(hu, grid, WINDOW, "hu") - before).mean() > 10 * MEAN_LIMIT


def test_a_hu_volume_gets_exactly_the_hu_window(pair):
    hu, _ = pair
    grid = GridConfig(spatial_size=(16, 64, 64))
    windowed, _ = to_model(hu, GridConfig(spatial_size=(16, 64, 64), intensity="window", window=WINDOW))
    assert sam_input(hu, grid, WINDOW).tobytes() == windowed.tobytes()


def test_the_hu_estimate_ignores_how_the_hu_were_rescaled(pair):
    _, stored = pair
    grid = _voxel_grid(stored)
    z = stored.array
    minmax = (z - z.min()) / (z.max() - z.min())  # M3D's prepared training images: min-max of the z-scores
    expected = sam_input(stored, grid, WINDOW, "normalized")
    for rescaled in (minmax, 3.0 * z + 7.0):
        np.testing.assert_allclose(sam_input(stored.with_array(rescaled), grid, WINDOW, "normalized"), expected,
                                   atol=1e-3)  # fmt: skip


def test_normalized_data_without_fat_and_soft_tissue_peaks_is_refused():
    array = np.full((4, 8, 8), -1.0, dtype=np.float32)
    array[1:3, 2:6, 2:6] = 0.5  # one tissue above the floor: nothing to pin the HU scale on
    with pytest.raises(InputError, match="no separate fat and soft-tissue peaks"):
        sam_input(Volume(array, np.eye(4)), GridConfig(spatial_size=(4, 8, 8)), WINDOW, "normalized")
    with pytest.raises(InputError, match="unknown intensity 'zscore'"):
        sam_input(Volume(array, np.eye(4)), GridConfig(spatial_size=(4, 8, 8)), WINDOW, "zscore")


def _as_m3d_seg_stores_it(hu: np.ndarray) -> np.ndarray:
    """SegVol's foreground normalisation (M3D-Seg's image.npy): voxels above the mean are the foreground; clip
    to its 0.05..99.95 percentiles, z-score with its mean and standard deviation."""
    foreground = hu[hu > hu.mean()]
    low, high = np.percentile(foreground, [0.05, 99.95])
    foreground = np.clip(foreground, low, high)
    return ((np.clip(hu, low, high) - foreground.mean()) / foreground.std()).astype(np.float32)


def test_an_estimate_pinned_on_the_wrong_peaks_is_refused(data_dir):
    """A block of the chest CT angiography whose two highest peaks are soft tissue and contrast-filled vessels
    (estimated at 0.32 times its true scale before the check): the estimate is refused, naming why."""
    cta = read_volume(data_dir / "totalsegmentator" / "subjectB_chest_cta_aorta_crop" / "ct_cropped.nii.gz")
    k, j, i = (n // 2 for n in cta.array.shape)
    block = Volume(_as_m3d_seg_stores_it(cta.array[:k, :j, :i].astype(np.float32)), np.eye(4))
    with pytest.raises(IntensityScaleError, match=r"estimate .* is implausible \(foreground spread 73 HU"):
        sam_input(block, GridConfig(spatial_size=(8, 32, 32)), WINDOW, "normalized")
    whole = Volume(_as_m3d_seg_stores_it(cta.array.astype(np.float32)), np.eye(4))  # the whole crop maps fine
    assert sam_input(whole, GridConfig(spatial_size=(8, 32, 32)), WINDOW, "normalized").shape == (8, 32, 32)
