"""What the engine returns — plain numpy dataclasses, shared by the engine, the server client and Slicer.

Kept apart from :mod:`MedVLSAM2Lib.engine` so that code receiving results (the HTTP client, the Slicer module)
never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Report", "Answer", "ObjectMask", "SegmentResult"]


@dataclass
class Report:
    """A generated report: the whole text, its findings and impression sections (CT-RATE layout), and the
    number of tokens generated."""

    text: str
    findings: str
    impression: str
    tokens: int
    seconds: float


@dataclass
class Answer:
    """A VQA answer; ``choice`` is the option letter it picks among those written in the question (multiple
    choice only; ``None`` when it names none or several, see :mod:`MedVLSAM2Lib.evaluation.choice`)."""

    text: str
    kind: str
    choice: str | None
    seconds: float


@dataclass
class ObjectMask:
    """One segmented structure: ``mask`` is uint8 KJI on the volume's own grid; ``score`` is SAM2's highest
    per-slice probability that the object is present; ``probabilities`` (float16, same grid) only when asked;
    ``presence`` ``(K,)`` float32 in [0, 1]: per slice ``k`` of the volume, the probability that the object is present
    there (SAM2's score of the nearest model slice, 0 outside the model's crop; see ``engine.slice_presence``), or
    ``None`` where that has no meaning (the volume's k axis is not the axial one SAM2 runs along; an old server)."""

    label: str
    mask: np.ndarray
    score: float
    probabilities: np.ndarray | None = field(default=None, repr=False)
    presence: np.ndarray | None = field(default=None, repr=False)


@dataclass
class SegmentResult:
    """The model's answer and one :class:`ObjectMask` per ``[SEG]`` in it (or the one mask of points or a box
    alone), on the grid of ``ijk_to_ras`` (the volume's own); ``timings`` in seconds.

    ``from_prompts`` is ``True`` when the one mask comes from points or a box alone: no text was given (``question``
    and ``answer`` are then empty), or the answer to it had no ``[SEG]`` (see ``InferenceEngine.segment``).
    ``message`` says so, or that no mask was made, in a sentence for the user (empty when there is nothing to say).
    """

    question: str
    answer: str
    objects: list[ObjectMask]
    ijk_to_ras: np.ndarray
    timings: dict[str, float]
    from_prompts: bool = False
    message: str = ""

    def no_mask_reason(self) -> str:
        """Why there is no mask, in a sentence for the user: ``message``, or (from a server that sent none) the
        answer."""
        return self.message or f"The model answered {self.answer!r} without a mask."
