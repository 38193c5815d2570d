"""One evaluation, start to finish: cases → predictions (resumable, sharded) → metrics, tables and plots.

::

    evaluate("seg", "path/to/checkpoint", data="M3D_Seg", out="eval/seg", seed=0)

What ``medvlsam2 evaluate report|vqa|seg`` runs; under ``accelerate launch`` every process calls it and
process 0 writes the results.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..templates import TermDictionary
from .cases import DEFAULT_SEG_DATASETS, DEFAULT_SPLITS, SEG_MODES, VQA_KINDS, report_cases, seg_cases, vqa_cases
from .predictions import model_fingerprint
from .tasks import SegPredictor, Shard, TextPredictor, run_cases

__all__ = ["EvaluationSettings", "evaluate", "TASKS"]

logger = logging.getLogger(__name__)

TASKS = ("report", "vqa", "seg")


@dataclass
class EvaluationSettings:
    """What an evaluation runs. Only the fields in :meth:`header` change predictions: a rerun that changes one
    of them needs a new output folder; ``limit`` and the BERTScore options may change between runs."""

    split: str | None = None
    split_file: str | None = None
    limit: int | None = None
    seed: int = 0
    kinds: Sequence[str] = VQA_KINDS
    datasets: Sequence[str] = DEFAULT_SEG_DATASETS
    modes: Sequence[str] = SEG_MODES
    structures: Sequence[str] | None = None
    terms: str | None = None
    forced_answer: bool = False
    tolerance_voxels: float = 1.0
    protocols: Sequence[str] = ("ctchat", "m3d")
    bertscore_model: str | None = None
    bertscore_layer: int | None = None
    compare: str | None = None
    examples: int = 2

    def header(self, task: str, terms: Path | None = None) -> dict:
        """What the predictions depend on; for ``seg``, ``terms`` is the term dictionary found (see
        :func:`_terms_path`): box and point cases are asked with its referring text (Table 5), without one with
        the class name, so a resume in the other situation is refused."""
        settings = {"split": self.split or DEFAULT_SPLITS[task], "seed": self.seed,
                    "forced_answer": self.forced_answer, "tolerance_voxels": self.tolerance_voxels}  # fmt: skip
        if task == "seg":
            settings["terms"] = str(terms) if terms else None
            settings["interactive_text"] = "referring" if terms else "semantic"
        return {"task": task, "settings": settings}


def _terms_path(data: Path, given: str | None, modes: Sequence[str]) -> Path | None:
    """Where M3D's term dictionary is (absolute), or ``None`` when no case uses it or it is absent: referring
    cases require it; box and point cases use it for their text and fall back to the class name without it (with
    a warning)."""
    if not {"referring", "box", "points"} & set(modes):
        return None
    path = Path(given) if given else data.parent / "term_dictionary.json"
    if path.is_file():
        return path.resolve()
    if "referring" in modes:
        raise InputError(f"{path}: referring segmentation needs M3D's term_dictionary.json (pass --terms FILE).")
    logger.warning("%s: no term dictionary; box and point cases get the class name as their text, not the "
                   "referring text of the paper's Table 5 (pass --terms FILE).", path)  # fmt: skip
    return None


def evaluate(task: str, source: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
             settings: EvaluationSettings | None = None, *, engine=None, device: str = "cpu",  # noqa: ANN001
             dtype: str = "float32", shard: Shard | None = None,
             progress: Callable[[int, int, str], None] | None = None) -> dict | None:  # fmt: skip
    """Evaluate the checkpoint (or preset) ``source`` on ``task`` over the dataset at ``data``.

    Args:
        task: ``report`` / ``vqa`` (``data`` is CT-RATE's ``dataset`` folder) or ``seg`` (the ``M3D_Seg`` root).
        engine: an already loaded :class:`~MedVLSAM2Lib.engine.InferenceEngine` of ``source`` (else loaded here).
        shard: this process's shard (default: from ``accelerate``, one process when run plainly).

    Returns:
        The metrics on process 0 (also written to ``out/metrics.json`` with the tables and plots), else ``None``.
    """
    from .scoring import task_metrics
    from .tables import read_compare, write_outputs

    if task not in TASKS:
        raise InputError(f"unknown evaluation task {task!r}; choose one of {list(TASKS)}.")
    settings = settings or EvaluationSettings()
    data, out = Path(data), Path(out)
    if not data.is_dir():
        raise InputError(f"{data}: no such data folder.")
    compare = read_compare(settings.compare) if settings.compare else None
    split, skipped = settings.split or DEFAULT_SPLITS[task], []
    if task == "report":
        cases, skipped = report_cases(data, settings.split_file, settings.limit, split)
    elif task == "vqa":
        cases = vqa_cases(data, settings.split_file, settings.kinds, settings.limit, split)
    else:
        cases, skipped = seg_cases(data, settings.datasets, split, settings.modes, settings.structures, settings.limit)
    terms = _terms_path(data, settings.terms, settings.modes) if task == "seg" else None
    header = {**settings.header(task, terms), "model": model_fingerprint(source), "dtype": str(dtype)}
    if engine is None:
        from ..engine import InferenceEngine

        engine = InferenceEngine.load(source, device=device, dtype=dtype)
    if task == "seg":
        dictionary = TermDictionary.load(terms) if terms else None
        predict = SegPredictor(engine, settings.seed, dictionary, forced_answer=settings.forced_answer,
                               tolerance_voxels=settings.tolerance_voxels, out=out,
                               examples=settings.examples)  # fmt: skip
    else:
        predict = TextPredictor(engine)
    shard = shard or Shard.from_accelerate()
    logger.info("evaluating %s: %d cases, process %d of %d", task, len(cases), shard.rank + 1, shard.world)
    records = run_cases(cases, predict, out, header, shard, progress)
    if records is None:
        return None
    skip_bertscore = settings.bertscore_model is not None and str(settings.bertscore_model).lower() == "none"
    text_options = {"protocols": settings.protocols, "use_bertscore": not skip_bertscore,
                    "bertscore_model": None if skip_bertscore else settings.bertscore_model,
                    "bertscore_layer": settings.bertscore_layer}  # fmt: skip
    metrics = task_metrics(task, records, skipped, **({} if task == "seg" else text_options))
    metrics.update(model=header["model"], settings=header["settings"], dtype=str(dtype), data=str(data))
    write_outputs(metrics, out, Path(str(source)).name, compare)
    return metrics
