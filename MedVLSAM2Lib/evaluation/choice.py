"""Multiple-choice answers: the options written in a question, and which one an answer picks.

CT-CHAT writes options inline as ``(a) … (b) …`` and answers like ``(b) Choice 2``; M3D writes
``Choices: A. … B. …`` and answers ``B. text``. Models also answer "The answer is B", "B is correct",
"option b", or the option's text in a sentence. :func:`parse_choice` reads all of these and returns ``None``
when an answer names no option or more than one: it never guesses.

The rules, in order:

1. A letter that *leads* the answer in a letter-like form: ``(b)``, ``b)``, ``B.``, ``B:``, a lone ``B``,
   ``B is correct``, or ``B`` followed by that option's text.
2. An option that refers to the others ("Both (a) and (b)", "All of the above", "None of the above") when the
   answer says the same.
3. Letters in letter-like positions anywhere: ``(c)``, ``answer: c``, ``the answer is c``, ``option C``,
   ``C is correct``. A letter after a negation ("not (c)", "rather than c") does not count; several that remain
   name no single option. A bare ``a`` is a letter only when nothing follows it but punctuation ("the answer is a
   lymph node" is an article).
4. Option texts, matched on word boundaries ("abnormal" does not contain "normal", "15 mm" does not contain
   "5 mm", "nodule" does not contain "no"), a match inside a longer matched option not counted ("viral pneumonia"
   is not also "pneumonia"), negated mentions ("not X", "X is not …") not counted.
"""

from __future__ import annotations

import re

__all__ = ["question_options", "parse_choice"]

LETTERS = "ABCDEFGH"
# Words that make the option after them one the answer rules out.
_NEGATION = r"(?:not|never|nor|neither|rather\s+than|instead\s+of|except|excluding|unlikely|ruled?\s+out)"
_NEGATED_BEFORE = re.compile(rf"\b{_NEGATION}\s*(?:an?\s+|the\s+|option\s+|choice\s+)?\W{{0,2}}$", re.IGNORECASE)
# "the thymus is not enlarged" (on the normalised answer: "isn't" reads "isn t")
_NEGATED_AFTER = re.compile(r"^ (?:(?:is|are|was|were|does|do) not|(?:isn|aren|wasn|weren|doesn|don) t)\b")
_END = r"(?=\s*$|\s*[).,:;!?]|\s+(?:is|was|would\s+be|seems)\b)"
_LEADING = (
    re.compile(r"^\W*\(([A-Ha-h])\)"),
    re.compile(r"^[\W_]*([A-Ha-h])\s*[).:]"),
    re.compile(r"^\W*([A-Ha-h])\W*$"),
    re.compile(r"^\W*([A-Ha-h])\s+(?:is|would\s+be|seems)\s+(?:the\s+)?(?:correct|right|best|answer)", re.IGNORECASE),
)
_CUE = r"\b(?i:answer|option|choice)\s*(?i:is|would\s+be|:|-)?\s*\(?"
_ANYWHERE = (
    re.compile(r"\(([A-Ha-h])\)"),
    re.compile(_CUE + r"([A-Ha-h])" + _END),  # "the answer is a." ("a" then an article would go on)
    re.compile(_CUE + r"([B-Hb-h])\b(?![\w'])"),  # "the answer is B because ..."
    re.compile(r"(?:^|[\s,;])([A-H])\s+(?:is|would\s+be)\s+(?:the\s+)?(?:correct|right|best)\b"),
)
_COMPOUND = {
    "all": re.compile(r"\ball\s+(?:of\s+)?(?:the\s+)?(?:above|options|choices|of\s+these)\b", re.IGNORECASE),
    "none": re.compile(r"\bnone\s+(?:of\s+)?(?:the\s+)?(?:above|options|choices|of\s+these)\b", re.IGNORECASE),
    "both": re.compile(r"\bboth\b", re.IGNORECASE),
}


def _markers(text: str, pattern: str) -> list[tuple[str, int, int]]:
    """``(letter, start, end)`` of option markers found in order A, B, C, …: a marker inside an option's text
    ("Both (a) and (b)") is not taken for the next option because the next letter is searched for."""
    found, position = [], 0
    for letter in LETTERS:
        match = re.compile(pattern.format(f"[{letter}{letter.lower()}]")).search(text, position)
        if match is None:
            break
        found.append((letter, match.start(), match.end()))
        position = match.end()
    return found


def question_options(question: str) -> dict[str, str]:
    """Options of a question as ``{letter (upper case): text}``; empty when it lists fewer than two."""
    text = question.split("Choices:", 1)[1] if "Choices:" in question else question
    for pattern in (r"\({}\)\s*", r"(?:^|\s){}[.)]\s+"):
        markers = _markers(text, pattern)
        if len(markers) >= 2:
            ends = [start for _, start, _ in markers[1:]] + [len(text)]
            return {letter: text[end:stop].strip().rstrip(".;,").strip()
                    for (letter, _, end), stop in zip(markers, ends, strict=True)}  # fmt: skip
    return {}


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def _negated(answer: str, start: int) -> bool:
    return bool(_NEGATED_BEFORE.search(answer[:start]))


def _leading_letter(answer: str, options: dict[str, str], letters: set[str]) -> str | None:
    for pattern in _LEADING:
        match = pattern.search(answer)
        if match and match.group(1).upper() in letters:
            return match.group(1).upper()
    match = re.match(r"^\s*([A-H])\s+(.+)$", answer)  # "B viral pneumonia": an upper-case letter, then its option
    if match and _normalise(options.get(match[1], "")):
        return match[1] if _normalise(match[2]).startswith(_normalise(options[match[1]])) else None
    return None


def _compound(answer: str, options: dict[str, str]) -> str | None:
    """The one option that refers to the others ("Both (a) and (b)", "All/None of the above") that the answer
    echoes: by the same phrase, or by naming the same letters ("(a) and (b)")."""
    said, picked = answer.lower(), set()
    for letter, text in options.items():
        for kind, pattern in _COMPOUND.items():
            if not pattern.search(text):
                continue
            letters = _pair(text) if kind == "both" else frozenset()
            if (letters and letters == _pair(said)) or (not letters and pattern.search(said)):
                picked.add(letter)
    return picked.pop() if len(picked) == 1 else None


def _pair(text: str) -> frozenset[str]:
    """The letters an "(a) and (b)" phrase names (empty when there is none)."""
    match = re.search(r"\(?\b([a-hA-H])\b\)?\s*(?:and|&)\s*\(?\b([a-hA-H])\b\)?", text)
    return frozenset(letter.upper() for letter in match.groups()) if match else frozenset()


def _letters_anywhere(answer: str, letters: set[str]) -> set[str]:
    found = set()
    for pattern in _ANYWHERE:
        for match in pattern.finditer(answer):
            letter = match.group(1).upper()
            if letter in letters and not _negated(answer, match.start()):
                found.add(letter)
    return found


def _options_said(answer: str, options: dict[str, str]) -> set[str]:
    """Options whose text the answer says (word boundaries), not inside a longer said option, not negated."""
    said = _normalise(answer)
    spans = []
    for letter, text in options.items():
        wanted = _normalise(text)
        if not wanted:
            continue
        for match in re.finditer(rf"(?:^|(?<= )){re.escape(wanted)}(?= |$)", said):
            spans.append((letter, match.start(), match.end()))
    kept = set()
    for letter, start, end in spans:
        inside = any(s <= start and end <= e and (e - s) > (end - start) for _, s, e in spans)
        if not inside and not _NEGATED_BEFORE.search(said[:start]) and not _NEGATED_AFTER.search(said[end:]):
            kept.add(letter)
    return kept


def parse_choice(answer: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter ``answer`` picks (upper case), or ``None`` when it names none or several (see the
    module's rules). Without ``options`` only explicit letters count."""
    options = options or {}
    letters = set(options) or set(LETTERS)
    answer = " ".join(answer.split())
    compound = _compound(answer, options)
    if compound:
        return compound
    explicit = _letters_anywhere(answer, letters)
    leading = _leading_letter(answer, options, letters)
    if leading:
        return leading if explicit <= {leading} else None
    if explicit:
        return explicit.pop() if len(explicit) == 1 else None
    named = _options_said(answer, options)
    return named.pop() if len(named) == 1 else None
