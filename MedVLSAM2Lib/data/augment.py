"""M3D's training augmentation with MONAI transforms, applied identically to the image, the SAM2 image and
the masks (prompts are synthesised afterwards from the augmented mask, so they agree with it too).

M3D (``LaMed``): random 90° rotation in the slice plane (p 0.5), a flip along each axis (p 0.1 each),
intensity scale and shift by up to ±10 % (p 0.5 each; images only).
"""

from __future__ import annotations

import numpy as np

__all__ = ["augment"]


def augment(
    image: np.ndarray,
    sam_image: np.ndarray,
    masks: np.ndarray | None,
    rng: np.random.Generator,
    *,
    intensity: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Augment one sample; deterministic for a given ``rng`` state.

    Args:
        image, sam_image: ``(D, H, W)`` float in [0, 1] on the model grid (H == W for rotations).
        masks: ``(C, D, H, W)`` or ``None``.
        rng: the sample's generator (its draws seed MONAI's random state).
        intensity: also apply the intensity scale/shift (to the images only).

    Returns:
        The augmented ``(image, sam_image, masks)``.
    """
    from monai.transforms import Compose, RandFlipd, RandRotate90d, RandScaleIntensityd, RandShiftIntensityd

    keys = ["image", "sam_image"] + (["masks"] if masks is not None else [])
    spatial = [RandRotate90d(keys, prob=0.5, spatial_axes=(1, 2))]
    spatial += [RandFlipd(keys, prob=0.1, spatial_axis=axis) for axis in (0, 1, 2)]
    images = ["image", "sam_image"]
    colour = [RandScaleIntensityd(images, factors=0.1, prob=0.5), RandShiftIntensityd(images, offsets=0.1, prob=0.5)]
    transform = Compose(spatial + (colour if intensity else []))
    transform.set_random_state(seed=int(rng.integers(2**31)))
    data = {"image": image[None], "sam_image": sam_image[None]}
    if masks is not None:
        data["masks"] = masks
    out = transform(data)
    result = [np.asarray(out[k], dtype=np.float32)[0] for k in images]
    augmented_masks = None if masks is None else np.asarray(out["masks"]).astype(masks.dtype)
    return result[0], result[1], augmented_masks
