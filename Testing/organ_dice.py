"""Ask the model to segment organs of a real CT and score its masks on the CT's own grid (tests only)."""

from __future__ import annotations

import numpy as np
import torch

from MedVLSAM2Lib.metrics import dice
from MedVLSAM2Lib.preprocess import GridConfig, probabilities_from_model, sam_input, to_model
from MedVLSAM2Lib.volume import Volume


def segmentation_question(organ: str) -> str:
    """The first semantic template (the one the CPU recipes train with)."""
    return f"Can you segment the {organ} in this image?"


def model_inputs(model, ct: Volume):  # noqa: ANN001, ANN201
    """(ViT image, SAM2 slices, grid record) of ``ct`` on the model's grid."""
    grid = GridConfig(spatial_size=model.config.vision.img_size)
    image, record = to_model(ct, grid)
    windowed = sam_input(ct, grid, model.config.segmenter.window)
    return torch.from_numpy(image)[None], torch.from_numpy(windowed), record


def organ_dice(model, ct: Volume, labels: np.ndarray, organs: dict[str, int]) -> dict[str, tuple[float, str]]:  # noqa: ANN001
    """Per organ: generate the answer, segment from its ``[SEG]``, map back to the CT's grid, Dice vs ``labels``."""
    image, sam_image, record = model_inputs(model, ct)
    model.eval()
    results = {}
    with torch.no_grad():
        for organ, value in organs.items():
            prompt = model.prompt_ids(segmentation_question(organ.replace("_", " ")))
            answer = model.generate(image[None], prompt, max_new_tokens=8)
            probs = model.segment_answer(image[None], sam_image[None], prompt, answer)
            mask = None if probs is None else probabilities_from_model(probs.probabilities[0].numpy(), record) > 0.5
            results[organ] = (0.0 if mask is None else dice(labels == value, mask), model.tokenizer.decode(answer))
    model.train()
    return results
