"""Multiple-choice scoring: the options of both question layouts and which option an answer picks, over the
answer shapes models and references really take (letters, option text in a sentence, negations, compound
options). ``None`` means the answer names no single option: it is never guessed."""

from __future__ import annotations

import pytest

from MedVLSAM2Lib.evaluation.choice import parse_choice, question_options

LUNG = "Which lung has the larger volume? (a) the right lung (b) the left lung (c) equal (d) cannot be assessed"
M3D = "What is seen in the right lower lobe? Choices: A. Pleural effusion B. Pneumothorax C. Normal lung D. Nodule"
NORMAL = "Is the mediastinum normal? (a) normal (b) abnormal"
PNEUMONIA = "Which pattern is present? (a) pneumonia (b) viral pneumonia (c) atelectasis"
SIZE = "What is the size of the nodule? (a) 5 mm (b) 15 mm (c) 25 mm"
YES_NO = "Is there a nodule in the left upper lobe? (a) yes (b) no"
NODE = "What is enlarged? (a) the thyroid (b) a lymph node of 5-10 mm (c) the thymus"
COMPOUND = "Which findings are present? (a) emphysema (b) atelectasis (c) Both (a) and (b) (d) None of the above"
ALL = "Which lobes are affected? (a) upper (b) middle (c) lower (d) All of the above"

ANSWERS = [
    # explicit letters leading the answer
    (LUNG, "(b) the left lung", "B"),
    (LUNG, "(B) The left lung.", "B"),
    (LUNG, "b) the left lung", "B"),
    (LUNG, "b. the left lung", "B"),
    (LUNG, "B", "B"),
    (LUNG, "  c ", "C"),
    (LUNG, "**D**", "D"),
    (LUNG, "B is correct", "B"),
    (LUNG, "b is the answer.", "B"),
    (M3D, "B. Pneumothorax", "B"),
    (M3D, "D.", "D"),
    (M3D, "C: Normal lung", "C"),
    (M3D, "B Pneumothorax", "B"),
    # letters in letter-like positions elsewhere
    (LUNG, "The answer is (d).", "D"),
    (LUNG, "The correct answer is A", "A"),
    (LUNG, "The correct answer is a.", "A"),
    (LUNG, "Answer: c", "C"),
    (LUNG, "answer - b", "B"),
    (LUNG, "I would choose (c) because the volumes match.", "C"),
    (LUNG, "The answer is B because the left lung is larger.", "B"),
    (M3D, "Option B", "B"),
    (M3D, "I think option d", "D"),
    (M3D, "Looking at the lobe, C is correct.", "C"),
    # negations and several letters
    (LUNG, "(b) the left lung, not (c)", "B"),
    (LUNG, "It is (b), not (c).", "B"),
    (LUNG, "Not (a); the answer is (b)", "B"),
    (LUNG, "(a) or (b)", None),
    (LUNG, "Either (a) or (c)", None),
    (LUNG, "not (a)", None),
    # option text on word boundaries
    (LUNG, "the left lung", "B"),
    (LUNG, "The right lung has the larger volume.", "A"),
    (M3D, "pleural effusion", "A"),
    (M3D, "There is a pneumothorax.", "B"),
    (NORMAL, "Abnormal", "B"),
    (NORMAL, "The mediastinum is abnormal.", "B"),
    (NORMAL, "Normal.", "A"),
    (NORMAL, "normal, not abnormal", "A"),
    (PNEUMONIA, "Viral pneumonia", "B"),
    (PNEUMONIA, "This is pneumonia.", "A"),
    (PNEUMONIA, "Atelectasis rather than pneumonia.", "C"),
    (SIZE, "15 mm", "B"),
    (SIZE, "It measures 5 mm.", "A"),
    (SIZE, "About 25 mm in diameter", "C"),
    (YES_NO, "Yes, a nodule is seen", "A"),
    (YES_NO, "No, there is no nodule.", "B"),
    (YES_NO, "No", "B"),
    (NODE, "The answer is a lymph node of 5-10 mm", "B"),
    (NODE, "a lymph node of 5-10 mm", "B"),
    (NODE, "The thymus is not enlarged; the thyroid is.", "A"),
    # compound options
    (COMPOUND, "Both (a) and (b)", "C"),
    (COMPOUND, "(a) and (b)", "C"),
    (COMPOUND, "Both emphysema and atelectasis, so (c)", "C"),
    (COMPOUND, "None of the above", "D"),
    (COMPOUND, "(c) Both (a) and (b)", "C"),
    (ALL, "All of the above.", "D"),
    (ALL, "all lobes: (d)", "D"),
    # no single option
    (LUNG, "Both lungs are large.", None),
    (LUNG, "I cannot tell from this image.", None),
    (M3D, "A normal study.", None),  # a sentence starting with "A" is no letter answer
    (M3D, "", None),
]


def test_question_options_read_both_layouts():
    assert question_options(LUNG) == {"A": "the right lung", "B": "the left lung", "C": "equal",
                                      "D": "cannot be assessed"}  # fmt: skip
    assert question_options(M3D) == {"A": "Pleural effusion", "B": "Pneumothorax", "C": "Normal lung", "D": "Nodule"}


def test_question_options_keep_letters_inside_an_option_text():
    assert question_options(COMPOUND) == {"A": "emphysema", "B": "atelectasis", "C": "Both (a) and (b)",
                                          "D": "None of the above"}  # fmt: skip
    assert question_options("Is it normal?") == {}


def test_at_least_forty_answer_shapes_are_covered():
    assert len({(question, answer) for question, answer, _ in ANSWERS}) >= 40


@pytest.mark.parametrize(("question", "answer", "expected"), ANSWERS)
def test_multiple_choice_parsing(question, answer, expected):
    assert parse_choice(answer, question_options(question)) == expected


def test_letters_alone_without_options():
    assert parse_choice("(c)") == "C"
    assert parse_choice("the answer is b") == "B"
    assert parse_choice("the left lung") is None


def test_an_unreadable_reference_is_logged_counted_and_listed_never_dropped_silently(caplog):
    from MedVLSAM2Lib.evaluation.scoring import UNREADABLE_REFERENCE, choice_metrics

    options = question_options(LUNG)
    records = [{"id": "q1", "reference": "(b) the left lung", "choice": "B"},
               {"id": "q2", "reference": "(a) the right lung", "choice": None},
               {"id": "q3", "reference": "either lung", "choice": "A"}]  # fmt: skip
    for record in records:
        record["truth"] = parse_choice(record["reference"], options)
    with caplog.at_level("ERROR"):
        metrics = choice_metrics(records)
    assert metrics["cases"] == 2 and metrics["accuracy"] == 0.5 and metrics["unparsed"] == 1
    assert metrics["unreadable_references"] == 1
    assert metrics["skipped"]["samples"] == [{"id": "q3", "reason": UNREADABLE_REFERENCE}]
    assert "q3" in caplog.text and UNREADABLE_REFERENCE in caplog.text
