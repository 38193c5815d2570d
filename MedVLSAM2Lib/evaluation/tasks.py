"""Task runners: one prediction per case, streamed to JSON Lines, resumable, sharded over processes.

Each process appends to its own ``<out>/predictions/part-<rank>.jsonl`` (see :mod:`.predictions`). Case ``n``
of the (deterministic) case list belongs to process ``n % world``; a case finished in any part file is never
run again, so a killed run resumes where it stopped, with any number of processes. Prompts of case ``id`` are
drawn from a generator seeded by ``(seed, id)`` only, so results do not depend on order or sharding. After a
barrier, process 0 merges the parts in case order.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, IntensityScaleError
from ..prompts import synthesize_box, synthesize_points
from ..templates import TermDictionary, load_templates
from .cases import SegCase, TextCase
from .choice import parse_choice, question_options
from .predictions import PredictionLog, read_predictions
from .seg_metrics import score_mask

__all__ = ["Shard", "case_rng", "run_cases", "TextPredictor", "SegPredictor"]


# ``skipped`` reasons (the summary counts cases per reason).
SAM_INPUT_SKIPPED = "no SAM2 input: the HU scale of this normalised volume cannot be estimated"
NO_PROMPT_SKIPPED = "no box or points: the structure is absent from this case, so no prompt can be drawn"
NO_DESCRIPTION_SKIPPED = "no description of this structure in the term dictionary"


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` evaluation processes; ``barrier`` waits for all of them."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = field(default=_no_barrier, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise InputError(f"shard rank {self.rank} must be in 0..{self.world - 1}.")

    @classmethod
    def from_accelerate(cls) -> Shard:
        """The shard of this process under ``accelerate launch`` (rank 0 of 1 when run plainly)."""
        from accelerate import PartialState

        from ..distributed import cpu_multiprocess

        state = PartialState(cpu=cpu_multiprocess())
        return cls(state.process_index, state.num_processes, state.wait_for_everyone)


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """The generator of one case's prompts: a function of ``seed`` and the case id alone."""
    digest = int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def run_cases(cases: Sequence, predict: Callable[[object], dict], out: str | Path, header: dict, shard: Shard = Shard(),
              progress: Callable[[int, int, str], None] | None = None) -> list[dict] | None:  # fmt: skip
    """Predict this process's unfinished cases, then (process 0) return every case's record in case order.

    Args:
        cases: objects with a unique ``id``, identical in every process.
        predict: case → record (a JSON-able dict; ``id`` is added).
        out: the evaluation folder; parts go to ``out/predictions``.
        header: task, model fingerprint and settings; part files written under another header are refused.
        progress: called as ``(done, total, case id)`` for this process's cases.

    Returns:
        The records in case order on process 0, ``None`` on the others.

    Raises:
        InputError: duplicate case ids, a part file of another run, or cases missing after the merge.
    """
    ids = [case.id for case in cases]
    if len(set(ids)) != len(ids):
        raise InputError("case ids must be unique; the split lists a case twice.")
    parts = Path(out) / "predictions"
    mine = parts / f"part-{shard.rank:03d}.jsonl"
    done = _finished(parts, header, skip=mine)
    log = PredictionLog(mine, header)
    done.update(log.done)
    todo = [case for n, case in enumerate(cases) if n % shard.world == shard.rank and case.id not in done]
    for number, case in enumerate(todo, start=1):
        log.append({"id": case.id, **predict(case)})
        if progress:
            progress(number, len(todo), case.id)
    shard.barrier()
    if shard.rank != 0:
        return None
    merged = _finished(parts, header)
    missing = [i for i in ids if i not in merged]
    if missing:
        raise InputError(f"{parts}: {len(missing)} case(s) have no prediction (e.g. {missing[:3]}); rerun to finish.")
    return [merged[i] for i in ids]


def _finished(parts: Path, header: dict, skip: Path | None = None) -> dict[str, dict]:
    done: dict[str, dict] = {}
    for part in sorted(parts.glob("part-*.jsonl")) if parts.is_dir() else []:
        if part != skip and part.stat().st_size:
            done.update(read_predictions(part, header)[0])
    return done


class _LastVolume:
    """Keeps the volume (and what was derived from it) of the last case: cases come grouped by volume."""

    def __init__(self, load: Callable[[object], object]) -> None:
        self._load, self._key, self._value = load, None, None

    def __call__(self, key: object) -> object:
        if key != self._key:
            self._key, self._value = key, self._load(key)
        return self._value


class TextPredictor:
    """Reports and VQA answers of an :class:`~MedVLSAM2Lib.engine.InferenceEngine` on CT-RATE volumes."""

    def __init__(self, engine) -> None:  # noqa: ANN001
        from ..data.ctrate import load_ctrate_volume

        self.engine = engine
        self._volume = _LastVolume(lambda path: engine.encode(load_ctrate_volume(path)))

    def __call__(self, case: TextCase) -> dict:
        handle = self._volume(case.volume_path)
        record = {"kind": case.kind, "question": case.question, "reference": case.reference}
        if case.kind == "report":
            report = self.engine.report(handle)
            return {**record, "prediction": report.text, "tokens": report.tokens, "seconds": report.seconds}
        answer = self.engine.ask(handle, case.question, history=case.history, kind=case.kind)
        record.update(prediction=answer.text, seconds=answer.seconds)
        if case.kind == "choice":
            options = question_options(case.question)
            record.update(choice=answer.choice, truth=parse_choice(case.reference, options))
        return record


class SegPredictor:
    """Masks for M3D-Seg cases under the seeded prompt protocol, scored as they are produced.

    Box and point cases get the referring text plus the prompt, as the paper's Table 5 (see :meth:`_prompt`);
    ``from_prompts`` in a record says the answer had no ``[SEG]`` and the prompts segmented through the template.

    ``forced_answer`` evaluates the mask path alone (the answer is
    :func:`~MedVLSAM2Lib.engine.prompt_answer`, the first semantic answer template, instead of a generated one).
    A structure absent from the case (empty ground truth) is run too in the semantic and referring modes and
    scored as a true negative or a false positive; box and point cases cannot draw a prompt there and are
    skipped with that reason. Surface Dice uses ``tolerance_voxels``: M3D-Seg stores no spacing.
    A volume whose SAM2 input cannot be made (a normalised volume without a plausible HU estimate, see
    :func:`~MedVLSAM2Lib.preprocess.hu_from_normalized`) gives each of its cases a ``skipped`` record with the
    reason in ``error``, like any skipped case: the run continues, and a resumed run does not try it again.
    ``examples`` saves the slice of largest ground truth of the first cases of each mode to
    ``out/examples`` for the qualitative figure.
    """

    def __init__(self, engine, seed: int = 0, terms: TermDictionary | None = None, *,  # noqa: ANN001
                 forced_answer: bool = False, tolerance_voxels: float = 1.0, out: Path | None = None,
                 examples: int = 2) -> None:  # fmt: skip
        from ..engine import prompt_answer  # the engine module imports torch; keep this module light

        self.engine, self.seed, self.terms = engine, seed, terms
        self.forced_answer, self.tolerance_voxels = forced_answer, tolerance_voxels
        self.answer = prompt_answer() if forced_answer else None
        self.examples_dir = Path(out) / "examples" if out is not None else None
        self.examples = examples
        self._shown: dict[str, int] = {}
        self._volume = _LastVolume(self._load)

    def _load(self, case) -> tuple:  # noqa: ANN001
        volume = case.to_volume()
        masks = case.load_masks()  # (C, X, Y, Z) → KJI per category
        truth = {name: masks[n].transpose(2, 1, 0) for n, name in enumerate(case.categories)}
        return volume, self.engine.encode(volume, intensity="normalized"), truth

    def _prompt(self, case: SegCase, truth: np.ndarray, rng: np.random.Generator) -> dict:
        """Semantic: the class name. Referring: a description in the first referring question. Box and points
        (Table 5): the same text as the referring case of the structure plus the prompt drawn with ``rng``."""
        if case.mode == "semantic":
            return {"text": case.structure}
        if case.mode == "referring":
            return self._referring_text(case)
        text = self._interactive_text(case)
        if case.mode == "box":
            return {**text, "boxes": [synthesize_box(truth, rng)]}
        return {**text, "points": synthesize_points(truth, rng)}

    def _referring_text(self, case: SegCase) -> dict:
        """The referring question of ``case``'s structure; its description is drawn with the generator of the
        structure's referring case, so box and point cases carry exactly the text that case was asked."""
        description = self.terms.sample(case.structure, case_rng(self.seed, case.id_for("referring")))
        return {"text": load_templates().referring_questions[0].format(description), "description": description}

    def _interactive_text(self, case: SegCase) -> dict:
        """The text of a box or point case: the referring text (``text_kind`` "referring") where the term
        dictionary describes the structure, else the class name as in semantic segmentation ("semantic")."""
        if self.terms is not None and case.structure in self.terms:
            return {**self._referring_text(case), "text_kind": "referring"}
        return {"text": case.structure, "text_kind": "semantic"}

    def __call__(self, case: SegCase) -> dict:
        volume, handle, truths = self._volume(case.case)
        truth = truths[case.structure]
        record = {"dataset": case.dataset, "case": case.case.name, "structure": case.structure, "mode": case.mode}
        if case.mode in ("box", "points") and not truth.any():
            return {**record, "skipped": NO_PROMPT_SKIPPED}
        if case.mode == "referring" and (self.terms is None or case.structure not in self.terms):
            return {**record, "skipped": NO_DESCRIPTION_SKIPPED}
        rng = case_rng(self.seed, case.id)
        prompt = self._prompt(case, truth, rng)
        try:
            result = self.engine.segment(handle, prompt.get("text"), prompt.get("points", ()),
                                         prompt.get("boxes", ()), answer=self.answer, probabilities=True)  # fmt: skip
        except IntensityScaleError as err:
            return {**record, "skipped": SAM_INPUT_SKIPPED, "error": str(err)}
        if result.objects:  # hard Dice on the engine's mask (thresholded in float32), soft Dice on probabilities
            probabilities, mask = result.objects[0].probabilities.astype(np.float32), result.objects[0].mask > 0
        else:
            probabilities, mask = np.zeros(truth.shape, np.float32), np.zeros(truth.shape, bool)
        scores = score_mask(probabilities, truth, (1.0, 1.0, 1.0), tolerance=self.tolerance_voxels, mask=mask)
        if truth.any():
            self._keep_example(case, volume.array, truth, mask)
        return {**record, **scores.to_dict(), "answer": result.answer, "masks": len(result.objects),
                "from_prompts": result.from_prompts, "prompt": _json_prompt(prompt),
                "seconds": result.timings["total"]}  # fmt: skip

    def _keep_example(self, case: SegCase, image: np.ndarray, truth: np.ndarray, predicted: np.ndarray) -> None:
        shown = self._shown.get(case.mode, 0)
        if self.examples_dir is None or shown >= self.examples:
            return
        self._shown[case.mode] = shown + 1
        k = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(axis=1)))
        self.examples_dir.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", case.id)
        np.savez_compressed(self.examples_dir / f"{name}.npz", image=image[k].astype(np.float32), truth=truth[k],
                            predicted=predicted[k], id=case.id, slice=k)  # fmt: skip


def _json_prompt(prompt: dict) -> dict:
    out = {key: value for key, value in prompt.items() if key in ("text", "description", "text_kind")}
    if "points" in prompt:
        out["points"] = [list(p.ijk) for p in prompt["points"]]
    if "boxes" in prompt:
        out["boxes"] = [[*b.min_ijk, *b.max_ijk] for b in prompt["boxes"]]
    return out
