"""``InferenceEngine.warmup`` (issue 17) on the tiny preset, CPU: it runs every step, leaves nothing in the cache,
changes no result of a real request (the same tokens; masks and probabilities within float rounding) and stops on
cancel; ``load`` records its time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from MedVLSAM2Lib.config import preset
from MedVLSAM2Lib.demo import default_inputs
from MedVLSAM2Lib.engine import InferenceEngine, prompt_answer
from MedVLSAM2Lib.errors import Cancelled
from MedVLSAM2Lib.model.medvlsam2 import MedVLSAM2Model
from MedVLSAM2Lib.prompts import BoxPrompt
from MedVLSAM2Lib.volume import read_volume

STEPS = ("encode", "report", "segment", "refine", "total")


def _engine() -> InferenceEngine:
    torch.manual_seed(0)
    return InferenceEngine(MedVLSAM2Model(preset("tiny")))


class _CancelAfter:
    """A cancel flag that reads as set from its ``checks``-th check on: cancels mid-way, wherever that falls."""

    def __init__(self, checks: int) -> None:
        self.left = checks

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


@pytest.fixture(scope="module")
def warm() -> tuple[InferenceEngine, dict[str, float]]:
    """A fresh tiny engine right after its warmup, and what warmup returned."""
    engine = _engine()
    assert engine.warmup_seconds is None
    return engine, engine.warmup()


def _requests(engine: InferenceEngine) -> dict:
    """A streamed report, a text segmentation (with probabilities) and a box alone on the slicerio chest CT."""
    handle = engine.encode(read_volume(default_inputs()[0]))
    streamed: list[str] = []
    report = engine.report(handle, on_token=streamed.append, max_new_tokens=16)
    text = engine.segment(handle, text="right lung", answer=prompt_answer(), probabilities=True)
    box = engine.segment(handle, boxes=[BoxPrompt((25, 35, 17), (60, 90, 17))])
    return {"report": (report.text, report.tokens, "".join(streamed)), "masks": [text.objects[0].mask,
            box.objects[0].mask], "probabilities": text.objects[0].probabilities,
            "scores": [text.objects[0].score, box.objects[0].score]}  # fmt: skip


def test_warmup_runs_every_step_and_leaves_the_cache_empty(warm):
    engine, seconds = warm
    assert tuple(seconds) == STEPS
    assert all(math.isfinite(value) and value > 0 for value in seconds.values())
    assert seconds["total"] >= sum(seconds[step] for step in STEPS[:-1]) and engine.warmup_seconds == seconds["total"]
    assert engine.describe()["cached_volumes"] == 0 and engine.cached_bytes == 0
    assert engine.model.greedy_decoder().cache is not None  # the decoder's KV cache is what stays (for reports)


def test_results_are_the_same_with_and_without_warmup(warm):
    """Same tokens; probabilities within one float16 step near 1 (2**-11), scores within 1e-5, and a mask voxel may
    differ only where its probability lies that close to the 0.5 threshold. Not bit for bit: the first calls in a
    process occasionally round differently on CPU, warmup or not (seen in 2 runs of 16: 1 voxel of 557,056, a
    probability 4.9e-4 apart)."""
    with_warmup, without = _requests(warm[0]), _requests(_engine())
    assert with_warmup["report"] == without["report"]
    assert np.allclose(with_warmup["scores"], without["scores"], rtol=0, atol=1e-5)
    probabilities = [with_warmup["probabilities"].astype(np.float32), without["probabilities"].astype(np.float32)]
    assert np.abs(probabilities[0] - probabilities[1]).max() <= 2**-11
    for index, (a, b) in enumerate(zip(with_warmup["masks"], without["masks"], strict=True)):
        assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape
        differ = a != b
        assert differ.sum() <= 10, f"mask {index}: {differ.sum()} voxels differ"
        if index == 0:  # the text mask: its probabilities are known
            assert np.all(np.abs(probabilities[1][differ] - 0.5) <= 2**-11)


# Checks of a tiny warmup (64 in all): the encoding makes 0-2, the report 3-24, the segmentation 25-45, the box 46-63.
@pytest.mark.parametrize("checks", [0, 2, 10, 30, 50])
def test_cancel_stops_warmup_and_leaves_no_volume(checks):
    engine = _engine()
    with pytest.raises(Cancelled):
        engine.warmup(cancel=_CancelAfter(checks))
    assert engine.cached_bytes == 0 and engine.warmup_seconds is None
    if checks == 10:  # cancelled mid-report: the decoder (and its KV cache) is left fit for the next warmup
        assert tuple(engine.warmup()) == STEPS


def test_load_records_its_seconds():
    engine = InferenceEngine.load("tiny")
    assert engine.load_seconds is not None and 0 < engine.load_seconds < 600
