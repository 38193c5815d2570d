"""The paper's instruction templates (stored as data in ``resources/templates.json``) and the M3D term dictionary.

Templates follow M3D's ``Seg_templates``/``Caption_templates``: ``{}`` is the slot for a class name
(semantic segmentation) or a term-dictionary description (referring segmentation); every
segmentation answer contains ``[SEG]``. The term dictionary maps a category name to short anatomical
descriptions (``../shared/data/m3d/term_dictionary.json`` is the real file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from .errors import InputError
from .jsonfile import read_json

__all__ = [
    "SEG_TOKEN",
    "Templates",
    "load_templates",
    "TermDictionary",
    "segmentation_prompt",
    "prompt_only_prompt",
    "report_prompt",
    "vqa_question",
]

SEG_TOKEN = "[SEG]"
TEMPLATE_KINDS = (
    "report_questions",
    "semantic_questions",
    "semantic_answers",
    "semantic_no_answers",
    "referring_questions",
    "referring_answers",
    "referring_no_answers",
    "prompt_questions",
)
# CT-CHAT's task tags, appended to VQA questions so that the model knows the answer style expected.
VQA_KIND_TAGS = {"short": "<short_answer>", "long": "<long_answer>", "choice": "<multiple_choice>",
                 "report": "<report_generation>"}  # fmt: skip


@dataclass(frozen=True)
class Templates:
    """Template lists by kind (see ``TEMPLATE_KINDS``)."""

    report_questions: tuple[str, ...]
    semantic_questions: tuple[str, ...]
    semantic_answers: tuple[str, ...]
    semantic_no_answers: tuple[str, ...]
    referring_questions: tuple[str, ...]
    referring_answers: tuple[str, ...]
    referring_no_answers: tuple[str, ...]
    prompt_questions: tuple[str, ...]

    def __post_init__(self) -> None:
        for kind in ("semantic_answers", "referring_answers"):
            missing = [t for t in getattr(self, kind) if SEG_TOKEN not in t]
            if missing:
                raise InputError(f"templates: every {kind} entry must contain {SEG_TOKEN}; these do not: {missing}.")
        for kind in TEMPLATE_KINDS:
            if kind not in ("report_questions", "semantic_answers", "prompt_questions"):
                missing = [t for t in getattr(self, kind) if "{}" not in t]
                if missing:
                    raise InputError(f"templates: every {kind} entry needs a '{{}}' slot; these lack one: {missing}.")


@cache
def load_templates() -> Templates:
    """The packaged templates (read once)."""
    text = resources.files("MedVLSAM2Lib").joinpath("resources/templates.json").read_text(encoding="utf-8")
    data = json.loads(text)
    return Templates(**{kind: tuple(data[kind]) for kind in TEMPLATE_KINDS})


class TermDictionary:
    """Category name → list of anatomical descriptions (M3D ``term_dictionary.json`` format)."""

    def __init__(self, terms: dict[str, list[str]]) -> None:
        for name, descriptions in terms.items():
            if (
                not isinstance(descriptions, list)
                or not descriptions
                or not all(isinstance(d, str) for d in descriptions)
            ):
                raise InputError(f"term dictionary: {name!r} must map to a non-empty list of strings.")
        self._terms = {name.lower(): list(descriptions) for name, descriptions in terms.items()}

    @classmethod
    def load(cls, path: str | os.PathLike) -> TermDictionary:
        data = read_json(path, "term dictionary")
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a JSON object of category -> [descriptions].")
        return cls({name: terms for name, terms in data.items() if not name.startswith("_")})  # "_source" notes

    def __len__(self) -> int:
        return len(self._terms)

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._terms

    def categories(self) -> list[str]:
        return list(self._terms)

    def descriptions(self, name: str) -> list[str]:
        if name.lower() not in self._terms:
            raise InputError(f"term dictionary has no category {name!r}.")
        return list(self._terms[name.lower()])

    def sample(self, name: str, rng: np.random.Generator) -> str:
        """One random description of ``name``."""
        descriptions = self.descriptions(name)
        return descriptions[int(rng.integers(len(descriptions)))]


def _pick(options: tuple[str, ...], rng: np.random.Generator, phrasings: int = 0) -> str:
    """One random option, from the first ``phrasings`` ones when > 0 (0: all of them)."""
    if phrasings < 0:
        raise InputError(f"phrasings must be >= 0 (0 = every template), got {phrasings}.")
    options = options[:phrasings] if phrasings else options
    return options[int(rng.integers(len(options)))]


def segmentation_prompt(
    category: str,
    rng: np.random.Generator,
    *,
    terms: TermDictionary | None = None,
    present: bool = True,
    phrasings: int = 0,
) -> tuple[str, str]:
    """A (question, answer) pair for semantic segmentation, or referring when ``terms`` is given.

    Referring questions replace the class name with a random description; the answer then names the
    class. Absent targets (``present=False``) get a "no" answer without ``[SEG]``. ``phrasings`` > 0 draws
    from the first that many questions and answers only (0: all of them).
    """
    t = load_templates()

    def pick(options: tuple[str, ...]) -> str:
        return _pick(options, rng, phrasings)

    if terms is None:
        question = pick(t.semantic_questions).format(category)
        answer = pick(t.semantic_answers) if present else pick(t.semantic_no_answers).format(category)
    else:
        question = pick(t.referring_questions).format(terms.sample(category, rng))
        answer = pick(t.referring_answers if present else t.referring_no_answers).format(category)
    return question, answer


def prompt_only_prompt(rng: np.random.Generator, *, phrasings: int = 0) -> tuple[str, str]:
    """A (question, answer) pair that carries a prompt-only training target (its points/box segment alone; the
    ``[SEG]`` state of this generic question does not prompt SAM2)."""
    t = load_templates()
    return _pick(t.prompt_questions, rng, phrasings), _pick(t.semantic_answers, rng, phrasings)


def vqa_question(question: str, kind: str) -> str:
    """A VQA question with CT-CHAT's task tag for ``kind`` (short, long, choice, report) appended."""
    if kind not in VQA_KIND_TAGS:
        raise InputError(f"unknown answer kind {kind!r}; choose one of {sorted(VQA_KIND_TAGS)}.")
    return f"{question.strip()} {VQA_KIND_TAGS[kind]}"


def report_prompt(rng: np.random.Generator, *, phrasings: int = 0) -> str:
    """A random report-generation instruction (from the first ``phrasings`` ones when > 0)."""
    return _pick(load_templates().report_questions, rng, phrasings)
