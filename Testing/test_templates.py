"""Instruction templates and the real M3D term dictionary."""

from __future__ import annotations

import numpy as np
import pytest

from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.templates import SEG_TOKEN, TermDictionary, load_templates, report_prompt, segmentation_prompt


def test_packaged_templates_hold_every_kind_with_seg_in_answers():
    templates = load_templates()
    assert len(templates.report_questions) >= 40
    assert all(SEG_TOKEN in a for a in templates.semantic_answers + templates.referring_answers)
    assert all("{}" in q for q in templates.semantic_questions + templates.referring_questions)
    assert "Can you segment the {} in this image?" in templates.semantic_questions


def test_semantic_prompt_names_the_class_and_answers_with_seg(rng):
    question, answer = segmentation_prompt("liver", rng)
    assert "liver" in question and SEG_TOKEN in answer
    question, answer = segmentation_prompt("liver", rng, present=False)
    assert SEG_TOKEN not in answer and "liver" in answer


@pytest.mark.realdata
def test_real_term_dictionary_drives_referring_prompts(data_dir, rng):
    terms = TermDictionary.load(data_dir / "m3d" / "term_dictionary.json")
    assert len(terms) == 223 and "liver" in terms
    question, answer = segmentation_prompt("liver", rng, terms=terms)
    assert any(d in question for d in terms.descriptions("liver"))
    assert "liver" in answer and SEG_TOKEN in answer
    with pytest.raises(InputError, match="no category 'heartbeat'"):
        terms.descriptions("heartbeat")


def test_term_dictionary_rejects_bad_files(tmp_path):
    path = tmp_path / "terms.json"
    path.write_text('{"liver": []}')
    with pytest.raises(InputError, match="non-empty list"):
        TermDictionary.load(path)
    path.write_text("{oops")
    with pytest.raises(InputError, match="not valid JSON"):
        TermDictionary.load(path)


def test_report_prompt_is_seeded():
    assert report_prompt(np.random.default_rng(5)) == report_prompt(np.random.default_rng(5))
    first = load_templates().report_questions[0]
    assert {report_prompt(np.random.default_rng(s), phrasings=1) for s in range(20)} == {first}
