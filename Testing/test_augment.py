"""M3D's augmentation: one spatial transform for image, SAM2 image and masks; seeded."""

from __future__ import annotations

import numpy as np

from MedVLSAM2Lib.data.augment import augment


def test_images_and_masks_move_together_and_draws_are_seeded():
    rng = np.random.default_rng(0)
    image = rng.random((8, 16, 16)).astype(np.float32)
    masks = np.stack([image > 0.7, image < 0.2]).astype(np.uint8)
    changed = 0
    for seed in range(30):
        out_image, out_sam, out_masks = augment(
            image, image.copy(), masks, np.random.default_rng(seed), intensity=False
        )
        np.testing.assert_array_equal(out_masks[0], (out_image > 0.7).astype(np.uint8))
        np.testing.assert_array_equal(out_masks[1], (out_image < 0.2).astype(np.uint8))
        np.testing.assert_array_equal(out_sam, out_image)
        changed += not np.array_equal(out_image, image)
        again = augment(image, image.copy(), masks, np.random.default_rng(seed), intensity=False)
        np.testing.assert_array_equal(again[0], out_image)
    assert 10 < changed < 30  # about half the draws rotate, some flip, some do nothing


def test_intensity_changes_stay_within_ten_percent():
    image = np.full((4, 8, 8), 0.5, dtype=np.float32)
    for seed in range(20):
        out, _, _ = augment(image, image.copy(), None, np.random.default_rng(seed))
        assert np.all(np.abs(out - 0.5) <= 0.5 * 0.1 + 0.1 + 1e-6)  # scale by up to 10 %, shift by up to 0.1
