"""Prompt types, bounds checks and paper-protocol synthesis on real masks."""

from __future__ import annotations

import numpy as np
import pytest

from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.prompts import BoxPrompt, PointPrompt, check_prompts_inside, synthesize_box, synthesize_points
from MedVLSAM2Lib.volume import read_volume


@pytest.fixture(scope="module")
def real_masks(subject_a, total_labels):
    labels = read_volume(subject_a / "example_seg.nii.gz").array
    return {name: labels == total_labels[name] for name in ("liver", "spleen", "kidney_left", "vertebrae_L1")}


def _tight_box(mask_slice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    j, i = np.nonzero(mask_slice)
    return np.array([i.min(), j.min()], float), np.array([i.max(), j.max()], float)


@pytest.mark.realdata
def test_three_points_lie_inside_the_target_on_one_slice(real_masks):
    rng = np.random.default_rng(7)
    for name, mask in real_masks.items():
        for _ in range(20):
            points = synthesize_points(mask, rng)
            assert len(points) == 3 and all(p.label == 1 for p in points)
            assert len({p.ijk[2] for p in points}) == 1, name
            for p in points:
                i, j, k = (int(v) for v in p.ijk)
                assert mask[k, j, i], f"{name}: point {p.ijk} outside the mask"
            assert len({p.ijk for p in points}) == 3  # distinct voxels when the slice has enough


@pytest.mark.realdata
def test_box_surrounds_the_slice_mask_with_jitter_within_5_percent(real_masks):
    rng = np.random.default_rng(11)
    for name, mask in real_masks.items():
        for _ in range(50):
            box = synthesize_box(mask, rng)
            k = int(box.min_ijk[2])
            assert box.max_ijk[2] == k and mask[k].any()
            lo, hi = _tight_box(mask[k])
            size = hi - lo + 1
            assert np.all(np.abs(np.array(box.min_ijk[:2]) - lo) <= 0.05 * size + 1e-9), name
            assert np.all(np.abs(np.array(box.max_ijk[:2]) - hi) <= 0.05 * size + 1e-9), name
            # the box covers the slice's target up to the jitter: it holds the tight box shrunk by 5 % a side
            assert np.all(np.array(box.min_ijk[:2]) <= lo + 0.05 * size + 1e-9), name
            assert np.all(np.array(box.max_ijk[:2]) >= hi - 0.05 * size - 1e-9), name


@pytest.mark.realdata
def test_synthesis_is_reproducible_with_a_seed_and_varies_with_another(real_masks):
    mask = real_masks["liver"]

    def draw(seed):
        rng = np.random.default_rng(seed)
        return synthesize_points(mask, rng), synthesize_box(mask, rng)

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_empty_mask_cannot_be_prompted(rng):
    with pytest.raises(InputError, match="empty mask"):
        synthesize_points(np.zeros((4, 5, 6), bool), rng)
    with pytest.raises(InputError, match="empty mask"):
        synthesize_box(np.zeros((4, 5, 6), bool), rng)


def test_point_outside_the_volume_is_named():
    with pytest.raises(
        InputError, match=r"Point 1 at \(i, j, k\) = \(3.0, 40.0, 2.0\) is outside the volume \(10×20×5 voxels"
    ):
        check_prompts_inside((10, 20, 5), [PointPrompt((1, 1, 1)), PointPrompt((3, 40, 2))])
    with pytest.raises(InputError, match="Box 0"):
        check_prompts_inside((10, 20, 5), boxes=[BoxPrompt((0, 0, 0), (12, 3, 1))])
    check_prompts_inside((10, 20, 5), [PointPrompt((9.4, 19.4, -0.4))], [BoxPrompt((0, 0, 4), (9, 19, 4))])


def test_prompt_types_validate_their_fields():
    with pytest.raises(InputError, match="label"):
        PointPrompt((1, 2, 3), label=2)
    with pytest.raises(InputError, match="three finite"):
        PointPrompt((1, 2))
    with pytest.raises(InputError, match="exceeds"):
        BoxPrompt((5, 0, 0), (4, 1, 1))
    assert BoxPrompt((1, 2, 3), (4, 6, 3)).size.tolist() == [3, 4, 0]


def test_prompt_errors_show_numpy_values_as_plain_numbers():
    makers = (
        lambda: BoxPrompt(np.array([5.0, 5, 5]), (1, 1, 1)),
        lambda: PointPrompt((1, 2, 3), np.float64(0.7)),
        lambda: PointPrompt((np.float64(1), 2, np.nan)),
        lambda: BoxPrompt((np.float32(1), 2), (1, 2, 3)),
    )
    for make in makers:
        with pytest.raises(InputError) as err:
            make()
        assert "np." not in str(err.value) and "array(" not in str(err.value)
