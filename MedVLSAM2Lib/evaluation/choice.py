"""Multiple-choice answers: the options written in a question, and which one an answer picks.

CT-CHAT writes options inline as ``(a) … (b) …`` and answers like ``(b) Choice 2``; M3D writes
``Choices: A. … B. …`` and answers ``B. text``. Models also answer "The answer is B", "b)", or just
the option's text. :func:`parse_choice` accepts all of these and returns ``None`` when an answer names no
option or more than one (never a guess).
"""

from __future__ import annotations

import re

__all__ = ["question_options", "parse_choice"]

_INLINE = re.compile(r"\(([A-Ha-h])\)\s*(.+?)(?=\s*\([A-Ha-h]\)\s|\s*$)", re.DOTALL)
_DOTTED = re.compile(r"(?:^|\s)([A-H])[.)]\s+(.+?)(?=\s+[A-H][.)]\s|\s*$)", re.DOTALL)
# An explicit letter, in order of trust: "(b) …", "b. …" / "B) …" / "C: …", a lone "B", "the answer is B",
# and one "(c)" anywhere in the answer.
_LETTER_PATTERNS = (
    re.compile(r"^\W*\(([A-Ha-h])\)"),
    re.compile(r"^\s*([A-Ha-h])\s*[).:]"),
    re.compile(r"^\s*([A-Ha-h])\s*$"),
    re.compile(r"\b(?:answer|option|choice)\s*(?:is|would be|:)?\s*\(?([A-Ha-h])\b(?![\w'])", re.IGNORECASE),
    re.compile(r"\(([A-Ha-h])\)"),
)


def question_options(question: str) -> dict[str, str]:
    """Options of a question as ``{letter (upper case): text}``; empty when it lists none."""
    text = question.split("Choices:", 1)[1] if "Choices:" in question else question
    found = _INLINE.findall(text) or _DOTTED.findall(text)
    return {letter.upper(): option.strip().rstrip(".;,") for letter, option in found}


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def parse_choice(answer: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter ``answer`` picks: an explicit letter first, else the one option whose text it
    contains; ``None`` when it names none or several."""
    letters = set(options or {}) or set("ABCDEFGH")
    if len({m.upper() for m in _LETTER_PATTERNS[-1].findall(answer)} & letters) > 1:
        return None  # "(a) or (b)"
    for pattern in _LETTER_PATTERNS:
        found = {m.upper() for m in pattern.findall(answer.strip())} & letters
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            return None
    said = _normalise(answer)
    named = [letter for letter, text in (options or {}).items() if _normalise(text) and _normalise(text) in said]
    return named[0] if len(named) == 1 else None
