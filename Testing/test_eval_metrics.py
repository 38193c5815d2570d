"""Evaluation metrics: multiple-choice parsing on real answer styles; Dice, M3D's soft Dice and surface Dice
against MONAI and hand-computed cases, on a real organ mask; empty ground truth counted, never scored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from MedVLSAM2Lib.evaluation.choice import parse_choice, question_options
from MedVLSAM2Lib.evaluation.seg_metrics import score_mask, soft_dice, summarize
from MedVLSAM2Lib.volume import read_volume

CT_CHAT = "Which lung has the larger volume? (a) the right lung (b) the left lung (c) equal (d) cannot be assessed"
M3D = "What is seen in the right lower lobe? Choices: A. Pleural effusion B. Pneumothorax C. Normal lung D. Nodule"

ANSWERS = [
    (CT_CHAT, "(b) the left lung", "B"),
    (CT_CHAT, "(B) The left lung.", "B"),
    (CT_CHAT, "b) the left lung", "B"),
    (CT_CHAT, "b. the left lung", "B"),
    (CT_CHAT, "B", "B"),
    (CT_CHAT, "  c ", "C"),
    (CT_CHAT, "The answer is (d).", "D"),
    (CT_CHAT, "The correct answer is A", "A"),
    (CT_CHAT, "Answer: c", "C"),
    (CT_CHAT, "the left lung", "B"),
    (CT_CHAT, "The right lung has the larger volume.", "A"),
    (CT_CHAT, "I would choose (c) because the volumes match.", "C"),
    (CT_CHAT, "(a) or (b)", None),
    (CT_CHAT, "Both lungs are large.", None),
    (M3D, "B. Pneumothorax", "B"),
    (M3D, "D.", "D"),
    (M3D, "C: Normal lung", "C"),
    (M3D, "pleural effusion", "A"),
    (M3D, "Option B", "B"),
    (M3D, "A normal study.", None),  # a sentence starting with "A" is no letter answer
]


def test_question_options_read_both_layouts():
    assert question_options(CT_CHAT) == {"A": "the right lung", "B": "the left lung", "C": "equal",
                                         "D": "cannot be assessed"}  # fmt: skip
    assert question_options(M3D) == {"A": "Pleural effusion", "B": "Pneumothorax", "C": "Normal lung", "D": "Nodule"}


@pytest.mark.parametrize(("question", "answer", "expected"), ANSWERS)
def test_multiple_choice_parsing(question, answer, expected):
    assert parse_choice(answer, question_options(question)) == expected


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


def test_soft_dice_is_m3ds_smoothed_dice_on_probabilities():
    probabilities = np.array([0.9, 0.6, 0.2, 0.0])
    truth = np.array([1, 1, 0, 0])
    assert soft_dice(probabilities, truth) == pytest.approx((2 * 1.5 + 1) / (1.7 + 2 + 1))


def test_surface_dice_counts_boundary_within_the_tolerance():
    truth = np.zeros((12, 12, 12), bool)
    truth[3:9, 3:9, 3:9] = True
    moved = np.roll(truth, 1, axis=0)  # one slice along k, 3 mm apart
    spacing = (3.0, 1.0, 1.0)
    assert score_mask(moved, truth, spacing, tolerance_mm=3.0).surface_dice == 1.0
    assert score_mask(moved, truth, spacing, tolerance_mm=1.0).surface_dice < 0.95


def test_empty_ground_truth_is_counted_not_scored(liver):
    mask, spacing = liver
    empty = score_mask(mask, np.zeros_like(mask), spacing)
    assert empty.empty_truth and empty.dice is None and empty.predicted_voxels == int(mask.sum())
    rows = [{"structure": "liver", **score_mask(mask, mask, spacing).to_dict()},
            {"structure": "liver", **empty.to_dict()}]  # fmt: skip
    assert summarize(rows)["liver"] == {"dice": 1.0, "soft_dice": 1.0, "surface_dice": 1.0, "cases": 1,
                                        "empty_truth_cases": 1}  # fmt: skip
