"""Instruction templates and the real M3D term dictionary."""

from __future__ import annotations

import numpy as np
import pytest

from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.templates import SEG_TOKEN, TermDictionary, load_templates, report_prompt, segmentation_prompt


def test_packaged_templates_are_the_papers_figures_5_to_7_as_printed(paper_facts):
    paper, templates = paper_facts["templates"], load_templates()
    assert list(templates.report_questions) == paper["report_questions_fig5"]  # duplicates kept, order kept
    semantic = [q.replace("{class_name}", "{}") for q in paper["semantic_questions_fig6"]]
    assert list(templates.semantic_questions) == semantic
    assert list(templates.semantic_answers) == paper["semantic_answers_fig6"]
    assert list(templates.referring_questions) == paper["referring_questions_fig7"]
    assert list(templates.referring_answers) == paper["referring_answers_fig7"]
    assert all(SEG_TOKEN in a for a in templates.semantic_answers + templates.referring_answers)
    assert all(q.count("{}") == 1 for q in templates.semantic_questions + templates.referring_questions)


def test_the_engines_default_questions_are_the_papers_first_templates(paper_facts):
    from MedVLSAM2Lib.engine import prompt_answer, segmentation_question

    paper = paper_facts["templates"]
    assert segmentation_question("liver") == paper["semantic_questions_fig6"][0].format(class_name="liver")
    described = "Large organ in the upper right abdomen with various metabolic functions."
    assert segmentation_question(described) == paper["referring_questions_fig7"][0].format(described)
    assert prompt_answer() == paper["semantic_answers_fig6"][0]
    assert load_templates().report_questions[0] == paper["report_questions_fig5"][0]  # InferenceEngine.report


@pytest.mark.realdata
def test_figure_8_descriptions_come_from_the_m3d_term_dictionary_and_its_kidneys_list_is_not_used(
    paper_facts, data_dir
):
    """Figure 8 prints entries of M3D's term dictionary, which training and evaluation read; its "Kidneys" list is
    the liver's, so kidneys get the dictionary's own descriptions."""
    terms = TermDictionary.load(data_dir / "m3d" / "term_dictionary.json")
    figure = paper_facts["templates"]["descriptions_fig8"]
    for structure in ("Liver", "Brain", "Lungs", "Spleen"):
        assert set(figure[structure]) <= set(terms.descriptions(structure))
    assert set(figure["Kidneys"]) <= set(terms.descriptions("liver"))
    assert not set(figure["Kidneys"]) & set(terms.descriptions("kidney") + terms.descriptions("kidneys"))


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
