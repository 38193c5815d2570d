"""The cases an evaluation runs: CT-RATE reports and VQA turns, M3D-Seg structures × prompt modes.

Layouts (as downloaded):

* CT-RATE ``dataset`` folder: ``radiology_text_reports/{train,validation}_reports.csv``,
  ``vqa/{train,valid}_vqa.json`` and the v2 volumes ``valid_fixed/valid_<p>/valid_<p>_<s>/valid_<p>_<s>_<r>.nii.gz``
  (already HU). Splits: ``train`` and ``validation`` (CT-RATE's held-out 1,304 patients, the paper's "test set").
* ``M3D_Seg`` root: ``<code>/<code>.json`` with ``train`` and ``test`` lists (the paper evaluates the test lists
  of 0012 CT-ORG, 0003 AbdomenCT-1K and 0011 TotalSegmentator).

Every case has a stable ``id``; runners use it for resuming, sharding and seeding its prompts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.ctrate import iter_reports, iter_vqa, volume_path
from ..data.m3dseg import M3DSegCase, M3DSegDataset
from ..errors import InputError
from ..templates import load_templates

__all__ = [
    "TextCase",
    "SegCase",
    "SEG_MODES",
    "DEFAULT_SEG_DATASETS",
    "DEFAULT_SPLITS",
    "report_cases",
    "vqa_cases",
    "seg_cases",
    "Skipped",
]

TEXT_SPLITS = {"train": (Path("radiology_text_reports") / "train_reports.csv", Path("vqa") / "train_vqa.json"),
               "validation": (Path("radiology_text_reports") / "validation_reports.csv",
                              Path("vqa") / "valid_vqa.json")}  # fmt: skip
SEG_SPLITS = ("train", "test")
DEFAULT_SPLITS = {"report": "validation", "vqa": "validation", "seg": "test"}
DEFAULT_SEG_DATASETS = ("0012", "0003", "0011")
# semantic: the class name; referring: a term-dictionary description; box / points: the referring text (the same
# description as the structure's referring case; the class name where the dictionary has none) plus a box or three
# points, as the paper's Table 5.
SEG_MODES = ("semantic", "referring", "box", "points")
VQA_KINDS = ("short", "long", "choice")


@dataclass(frozen=True)
class Skipped:
    """A sample an evaluation leaves out, and why: listed by id in ``metrics.json``, counted in the tables."""

    id: str
    reason: str


@dataclass(frozen=True)
class TextCase:
    """A report or a VQA turn on one CT-RATE volume; ``history`` holds the earlier turns of its conversation."""

    id: str
    volume_path: Path
    question: str
    reference: str
    kind: str
    history: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SegCase:
    """One structure of one M3D-Seg case under one prompt ``mode`` (see ``SEG_MODES``)."""

    id: str
    dataset: str
    case: M3DSegCase
    structure: str
    mode: str

    def id_for(self, mode: str) -> str:
        """The id of the same structure of the same case under another ``mode``."""
        return seg_case_id(self.dataset, self.case.name, self.structure, mode)


def seg_case_id(dataset: str, case: str, structure: str, mode: str) -> str:
    """A segmentation case's stable id: ``<dataset>/<case>/<structure>/<mode>``."""
    return f"{dataset}/{case}/{structure}/{mode}"


def _split_file(root: Path, given: str | os.PathLike | None, split: str, which: int, what: str) -> Path:
    if split not in TEXT_SPLITS:
        raise InputError(f"CT-RATE has the splits {list(TEXT_SPLITS)}, not {split!r}.")
    default = TEXT_SPLITS[split][which]
    path = Path(given) if given else root / default
    if not path.is_file():
        raise InputError(f"{path}: no {what} (expected <data>/{default}, or pass --split-file).")
    return path


def _ctrate_volume(root: Path, image: str, where: Path) -> Path:
    path = volume_path(root, image.split(".")[0])
    if not path.is_file():
        raise InputError(f"{path}: volume {image!r} listed in {where} is missing (CT-RATE v2 '*_fixed' layout).")
    return path


def _limited(cases: list, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}.")
    return cases[:limit] if limit else cases


def report_cases(root: str | os.PathLike, split_file: str | os.PathLike | None = None, limit: int | None = None,
                 split: str = "validation") -> tuple[list[TextCase], list[Skipped]]:  # fmt: skip
    """One case per report of the CT-RATE ``split`` CSV (the reference is Findings + Impression), and the
    reports left out because they have neither."""
    root = Path(root)
    csv_path = _split_file(root, split_file, split, 0, f"CT-RATE {split} reports CSV")
    question = load_templates().report_questions[0]
    cases, skipped = [], []
    for report in iter_reports(csv_path):
        name = report.volume_name.split(".")[0]
        if not (report.findings or report.impressions):
            skipped.append(Skipped(name, "the report has neither findings nor an impression to score against"))
            continue
        path = _ctrate_volume(root, report.volume_name, csv_path)
        cases.append(TextCase(name, path, question, report.text, "report"))
    if not cases:
        raise InputError(f"{csv_path}: no report with findings or impression.")
    return _limited(cases, limit), skipped


def vqa_cases(root: str | os.PathLike, split_file: str | os.PathLike | None = None,
              kinds: Sequence[str] = VQA_KINDS, limit: int | None = None,
              split: str = "validation") -> list[TextCase]:  # fmt: skip
    """One case per short / long / multiple-choice turn of CT-CHAT's VQA JSON of ``split`` (report-generation
    turns belong to the report task); earlier turns of the same record are given as chat history."""
    unknown = sorted(set(kinds) - set(VQA_KINDS))
    if unknown:
        raise InputError(f"unknown VQA kinds {unknown}; choose from {list(VQA_KINDS)}.")
    root = Path(root)
    json_path = _split_file(root, split_file, split, 1, f"CT-CHAT {split} VQA JSON")
    cases = []
    for index, sample in enumerate(iter_vqa(json_path)):
        path = _ctrate_volume(root, sample.image, json_path)
        history: list[tuple[str, str]] = []
        for turn_index, turn in enumerate(sample.turns):
            if turn.kind in kinds:
                case_id = f"{sample.id or index}#{turn_index}"
                cases.append(TextCase(case_id, path, turn.question, turn.answer, turn.kind, tuple(history)))
            history.append((turn.question, turn.answer))
    if not cases:
        raise InputError(f"{json_path}: no VQA turn of kind {list(kinds)}.")
    return _limited(cases, limit)


def seg_cases(root: str | os.PathLike, datasets: Sequence[str] = DEFAULT_SEG_DATASETS, split: str = "test",
              modes: Sequence[str] = SEG_MODES, structures: Sequence[str] | None = None,
              limit: int | None = None) -> tuple[list[SegCase], list[Skipped]]:  # fmt: skip
    """Every (case, structure, mode) of the ``split`` lists of ``datasets``; ``structures`` restricts the
    categories (names as in each dataset's JSON); ``limit`` keeps the first cases (volumes) of each dataset.
    A structure named in ``structures`` that one dataset lacks is listed as skipped for that dataset; one that no
    dataset has is an error."""
    unknown = sorted(set(modes) - set(SEG_MODES))
    if unknown:
        raise InputError(f"unknown segmentation modes {unknown}; choose from {list(SEG_MODES)}.")
    if split not in SEG_SPLITS:
        raise InputError(f"M3D-Seg has the splits {list(SEG_SPLITS)}, not {split!r}.")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}.")
    found = {code: list(M3DSegDataset(root, code).categories) for code in datasets}
    if structures:
        nowhere = [s for s in structures if not any(s in names for names in found.values())]
        if nowhere:
            known = sorted({name for names in found.values() for name in names})
            raise InputError(f"--structures {nowhere} are categories of none of {list(datasets)} (they have "
                             f"{known[:12]}{'…' if len(known) > 12 else ''}).")  # fmt: skip
    cases, skipped = [], []
    for code, names in found.items():
        dataset = M3DSegDataset(root, code)
        if structures:
            skipped += [Skipped(f"{code}/*/{s}", f"not a category of dataset {code}") for s in structures
                        if s not in names]  # fmt: skip
            names = [s for s in names if s in structures]
        for number, case in enumerate(dataset.cases(split)):
            if limit and number >= limit:
                break
            for structure in names:
                for mode in modes:
                    cases.append(SegCase(seg_case_id(code, case.name, structure, mode), code, case, structure, mode))
    if not cases:
        raise InputError(f"{root}: the {split!r} split of {list(datasets)} lists no case.")
    return cases, skipped
