"""Evaluation metrics: Dice, M3D's soft Dice and surface Dice
against MONAI and hand-computed cases, on a real organ mask; empty ground truth counted, never scored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from MedVLSAM2Lib.evaluation.seg_metrics import score_mask, soft_dice, summarize
from MedVLSAM2Lib.volume import read_volume


@pytest.fixture(scope="module")
def liver(subject_a, total_labels) -> tuple[np.ndarray, np.ndarray]:
    labels = read_volume(subject_a / "example_seg.nii.gz")
    return labels.array == total_labels["liver"], labels.spacing[::-1]


def test_dice_matches_monai_and_hand_computed_values(liver):
    mask, spacing = liver
    shifted = np.roll(mask, 3, axis=2)
    metric = DiceMetric(include_background=True)
    metric(torch.from_numpy(shifted)[None, None].float(), torch.from_numpy(mask)[None, None].float())
    assert score_mask(shifted, mask, spacing).dice == pytest.approx(float(metric.aggregate()), abs=1e-6)
    assert score_mask(mask, mask, spacing).dice == 1.0 and score_mask(mask, mask, spacing).surface_dice == 1.0
    half = np.zeros((4, 4, 4), bool)
    half[:2] = True
    full = np.ones((4, 4, 4), bool)
    assert score_mask(half, full, (1, 1, 1)).dice == pytest.approx(2 * 32 / (32 + 64))
    assert score_mask(~half, half, (1, 1, 1)).dice == 0.0
    near = np.where(half, 0.5002, 0.0).astype(np.float16)  # 0.5002 (above 0.5) is 0.5 in float16: not above it
    assert score_mask(near.astype(np.float32), full, (1, 1, 1)).dice == 0.0
    assert score_mask(near.astype(np.float32), full, (1, 1, 1), mask=half).dice == pytest.approx(2 * 32 / 96)


def test_soft_dice_is_m3ds_binary_dice_on_probabilities():
    """M3D's BinaryDice: 2 * sum(p t) / (sum(p) + sum(t) + 1), the smoothing in the denominator only."""
    probabilities = np.array([0.9, 0.6, 0.2, 0.0])
    truth = np.array([1, 1, 0, 0])
    assert soft_dice(probabilities, truth) == pytest.approx(2 * 1.5 / (1.7 + 2 + 1))
    assert soft_dice(np.zeros(4), truth) == 0.0  # an empty prediction scores 0, not 1/3
    assert soft_dice(truth, truth) == pytest.approx(4 / 5)


def test_surface_dice_counts_boundary_within_the_tolerance():
    truth = np.zeros((12, 12, 12), bool)
    truth[3:9, 3:9, 3:9] = True
    moved = np.roll(truth, 1, axis=0)  # one slice along k, 3 mm apart
    spacing = (3.0, 1.0, 1.0)
    assert score_mask(moved, truth, spacing, tolerance=3.0).surface_dice == 1.0
    assert score_mask(moved, truth, spacing, tolerance=1.0).surface_dice < 0.95
    # without a spacing (M3D-Seg) the tolerance is in voxels: the same one-slice shift is within 1 voxel
    assert score_mask(moved, truth, (1.0, 1.0, 1.0), tolerance=1.0).surface_dice == 1.0


def test_empty_ground_truth_is_a_false_positive_or_a_true_negative_never_a_dice(liver):
    mask, spacing = liver
    positive = score_mask(mask, np.zeros_like(mask), spacing)
    assert positive.empty_truth and positive.dice is None and positive.predicted_voxels == int(mask.sum())
    assert positive.false_positive is True
    negative = score_mask(np.zeros(mask.shape, np.float32), np.zeros_like(mask), spacing)
    assert negative.empty_truth and negative.dice is None and negative.false_positive is False
    same = score_mask(mask, mask, spacing)
    rows = [{"structure": "liver", **r.to_dict()} for r in (same, positive, negative)]
    assert summarize(rows)["liver"] == {"dice": 1.0, "soft_dice": pytest.approx(same.soft_dice), "surface_dice": 1.0,
                                        "cases": 1, "empty_truth_cases": 2, "false_positive_cases": 1,
                                        "false_positive_rate": 0.5}  # fmt: skip
    assert summarize(rows[:1])["liver"]["false_positive_rate"] is None
