"""The segmentation predictor's prompt protocol (no model, no data): box and point cases carry the referring
text of the same structure plus the seeded prompt, as the paper's Table 5; the class name where the term
dictionary has no description; the engine's ``from_prompts`` is recorded. A volume without SAM2 input gives
skipped records and the run goes on; ``--forced-answer`` gives the engine's answer template."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from MedVLSAM2Lib.engine import prompt_answer
from MedVLSAM2Lib.errors import IntensityScaleError
from MedVLSAM2Lib.evaluation.cases import SegCase, seg_case_id
from MedVLSAM2Lib.evaluation.tasks import SAM_INPUT_SKIPPED, SegPredictor, case_rng, run_cases
from MedVLSAM2Lib.prompts import synthesize_box, synthesize_points
from MedVLSAM2Lib.results import ObjectMask, SegmentResult
from MedVLSAM2Lib.templates import TermDictionary
from MedVLSAM2Lib.volume import Volume

TERMS = TermDictionary({"liver": [f"Description {n} of the large organ on the right." for n in range(6)]})
SEED = 3


@dataclass
class _Case:
    """An M3D-Seg case in memory: one 12×10×8 (X, Y, Z) volume with a liver and a spleen."""

    name: str = "case_a"
    categories: tuple[str, ...] = ("liver", "spleen")

    def to_volume(self) -> Volume:
        return Volume(np.linspace(0, 1, 8 * 10 * 12).reshape(8, 10, 12), np.eye(4))

    def load_masks(self) -> np.ndarray:
        masks = np.zeros((2, 12, 10, 8), np.uint8)
        masks[0, 2:7, 3:8, 1:6] = 1
        masks[1, 8:11, 1:4, 4:7] = 1
        return masks


class _Engine:
    """Records each ``segment`` call and answers without [SEG], so the prompts alone give the mask."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def encode(self, volume: Volume, intensity: str) -> str:
        return "handle"

    def segment(self, handle, text, points, boxes, *, answer, probabilities) -> SegmentResult:  # noqa: ANN001
        self.calls.append({"text": text, "points": points, "boxes": boxes, "answer": answer})
        mask = np.zeros((8, 10, 12), np.uint8)
        mask[1:6, 3:8, 2:7] = 1
        obj = ObjectMask("liver", mask, 0.9, mask.astype(np.float16))
        return SegmentResult("q", "No.", [obj], np.eye(4), {"total": 0.1}, from_prompts=True, message="m")


def _cases(structure: str) -> dict[str, SegCase]:
    case = _Case()
    return {mode: SegCase(seg_case_id("0011", case.name, structure, mode), "0011", case, structure, mode)
            for mode in ("referring", "box", "points")}  # fmt: skip


def test_box_and_point_cases_carry_the_referring_text_of_the_same_structure():
    engine = _Engine()
    predict = SegPredictor(engine, SEED, TERMS)
    cases = _cases("liver")
    records = {mode: predict(case) for mode, case in cases.items()}
    referring = records["referring"]["prompt"]
    assert referring["text"] == f"{referring['description']} Please answer and segment."
    for mode in ("box", "points"):
        prompt = records[mode]["prompt"]
        assert (prompt["text"], prompt["description"], prompt["text_kind"]) == (
            referring["text"], referring["description"], "referring")  # fmt: skip
        assert records[mode]["from_prompts"] is True
    truth = _Case().load_masks()[0].transpose(2, 1, 0)  # XYZ → KJI
    (box,) = engine.calls[1]["boxes"]
    assert box == synthesize_box(truth, case_rng(SEED, cases["box"].id))  # the prompts are drawn as before
    assert engine.calls[2]["points"] == synthesize_points(truth, case_rng(SEED, cases["points"].id))
    assert [call["text"] for call in engine.calls] == [referring["text"]] * 3


@pytest.mark.parametrize("terms", [TERMS, None])
def test_without_a_description_box_and_point_cases_get_the_class_name(terms):
    predict = SegPredictor(_Engine(), SEED, terms)
    cases = _cases("spleen")
    assert "skipped" in predict(cases["referring"])
    for mode in ("box", "points"):
        prompt = predict(cases[mode])["prompt"]
        assert (prompt["text"], prompt["text_kind"]) == ("spleen", "semantic") and "description" not in prompt


class _NoSamInputEngine(_Engine):
    """An engine whose volume has no HU estimate: ``segment`` raises as the real engine does."""

    def segment(self, handle, text, points, boxes, *, answer, probabilities) -> SegmentResult:  # noqa: ANN001
        self.calls.append({"text": text})
        raise IntensityScaleError("case_a: its intensity histogram shows no separate fat and soft-tissue peaks")


def test_a_volume_without_sam2_input_is_a_skipped_record_and_the_run_goes_on(tmp_path):
    engine = _NoSamInputEngine()
    cases = list(_cases("liver").values())
    records = run_cases(cases, SegPredictor(engine, SEED, TERMS), tmp_path, {"task": "seg"})
    assert [r["skipped"] for r in records] == [SAM_INPUT_SKIPPED] * 3
    assert all("no separate fat and soft-tissue peaks" in r["error"] for r in records)
    again = run_cases(cases, SegPredictor(engine, SEED, TERMS), tmp_path, {"task": "seg"})  # resume
    assert again == records and len(engine.calls) == 3  # recorded once, never retried


def test_the_forced_answer_is_the_engines_answer_template():
    engine = _Engine()
    SegPredictor(engine, SEED, TERMS, forced_answer=True)(_cases("liver")["box"])
    SegPredictor(engine, SEED, TERMS)(_cases("liver")["box"])
    assert [call["answer"] for call in engine.calls] == [prompt_answer(), None]
