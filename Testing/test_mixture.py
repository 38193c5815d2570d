"""Training samples from a real cache: several structures per conversation, referring without the class name,
interactive prompts inside their structure, samples a pure function of (seed, epoch, index)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_cache import _subject_items

from MedVLSAM2Lib.config import preset
from MedVLSAM2Lib.data.cache import VolumeCache, prepare
from MedVLSAM2Lib.data.mixture import TaskMixture
from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.model.language import build_tokenizer
from MedVLSAM2Lib.preprocess import GridConfig
from MedVLSAM2Lib.templates import TermDictionary, load_templates

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def seg_cache(subject_a, total_labels, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    prepare(
        _subject_items(subject_a, total_labels)[:1],
        root / "seg",
        GridConfig(spatial_size=(16, 64, 64)),
        (-160.0, 240.0),
    )
    return VolumeCache(root / "seg")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("tiny")


def _mixture(seg_cache, tokenizer, weights, terms=None, **options):
    return TaskMixture(preset("tiny"), tokenizer, weights, 40, seed=5, seg_cache=seg_cache, terms=terms, **options)


def _turns(tokenizer, ids):
    """(user text, assistant text) of each turn of a ChatML conversation."""
    text = tokenizer.decode(ids)
    users = [part.split("<|im_end|>")[0] for part in text.split("<|im_start|>user\n")[1:]]
    answers = [part.split("<|im_end|>")[0] for part in text.split("<|im_start|>assistant\n")[1:]]
    return list(zip(users, answers, strict=True))


def _names_by_voxel_count(seg_cache):
    """The four structures have distinct voxel counts on the model grid: a mask's count names its structure."""
    cached = seg_cache.load("subjectA_sm")
    names = {int(m.sum()): name.replace("_", " ") for name, m in zip(cached.categories, cached.masks, strict=True)}
    assert len(names) == 4
    return names


def test_semantic_samples_ask_about_several_structures_each_with_its_own_mask(seg_cache, tokenizer):
    mixture = _mixture(seg_cache, tokenizer, {"semantic": 1}, objects_per_sample=3)
    by_volume = _names_by_voxel_count(seg_cache)
    for index in range(6):
        sample = mixture[index]
        turns = _turns(tokenizer, sample.input_ids)
        assert len(sample.targets) == len(turns) == 3
        assert sum(t == tokenizer.convert_tokens_to_ids("[SEG]") for t in sample.input_ids) == 3
        named = [by_volume[int(t.mask.sum())] for t in sample.targets]
        assert len(set(named)) == 3
        for (question, answer), structure in zip(turns, named, strict=True):
            assert structure in question and "[SEG]" in answer
    again = _mixture(seg_cache, tokenizer, {"semantic": 1}, objects_per_sample=3)
    assert again[4].input_ids == mixture[4].input_ids


def test_referring_questions_use_a_description_and_answers_name_the_structure(seg_cache, tokenizer, data_dir):
    terms = TermDictionary.load(data_dir / "m3d" / "term_dictionary.json")
    mixture = _mixture(seg_cache, tokenizer, {"referring": 1}, terms=terms, objects_per_sample=2)
    names = _names_by_voxel_count(seg_cache)
    for index in range(6):
        sample = mixture[index]
        turns = _turns(tokenizer, sample.input_ids)
        assert len(turns) == len(sample.targets) == 2
        for (question, answer), target in zip(turns, sample.targets, strict=True):
            structure = names[int(target.mask.sum())]
            assert any(d in question for d in terms.descriptions(structure)), question
            assert structure in answer and "[SEG]" in answer


def test_interactive_samples_have_one_structure_with_prompts_inside_it(seg_cache, tokenizer):
    mixture = _mixture(seg_cache, tokenizer, {"interactive": 1}, objects_per_sample=3)
    kinds = set()
    for index in range(10):
        (target,) = mixture[index].targets
        mask = target.mask.numpy() > 0
        for point in target.points:
            i, j, k = (int(round(c)) for c in point.ijk)
            assert mask[k, j, i]
        for box in target.boxes:
            (i0, j0, k0), (i1, j1, k1) = box.min_ijk, box.max_ijk
            inside = mask[int(k0) : int(k1) + 1, int(j0) : int(j1) + 1, int(i0) : int(i1) + 1]
            assert inside.sum() > 0.5 * mask[int(k0) : int(k1) + 1].sum()
        kinds.add("points" if target.points else "box")
    assert kinds == {"points", "box"}


def test_task_weights_set_the_task_frequencies(seg_cache, tokenizer, data_dir):
    terms = TermDictionary.load(data_dir / "m3d" / "term_dictionary.json")
    mixture = TaskMixture(preset("tiny"), tokenizer, {"semantic": 3, "interactive": 1}, 400, seed=1,
                          seg_cache=seg_cache, terms=terms)  # fmt: skip
    prompted = np.mean([bool(mixture[i].targets[0].points or mixture[i].targets[0].boxes) for i in range(400)])
    assert prompted == pytest.approx(0.25, abs=0.06)


def test_phrasings_limit_the_templates_to_the_first_ones(seg_cache, tokenizer, data_dir):
    templates = load_templates()
    terms = TermDictionary.load(data_dir / "m3d" / "term_dictionary.json")
    weights = {"semantic": 1, "referring": 1}
    turns = {
        n: [turn for i in range(30) for turn in _turns(tokenizer, _mixture(seg_cache, tokenizer, weights, terms=terms,
                                                                            phrasings=n)[i].input_ids)]
        for n in (0, 2)
    }  # fmt: skip
    allowed_answers = {a.format(name) for a in templates.semantic_answers[:2] + templates.referring_answers[:2]
                       for name in ("liver", "spleen", "kidney left", "kidney right")}  # fmt: skip
    assert {answer for _, answer in turns[2]} <= allowed_answers
    openings = {q.split("{}")[0] for q in templates.semantic_questions[:2]}
    semantic_questions = [q.replace("<image>", "").lstrip("\n") for q, a in turns[2] if a in templates.semantic_answers]
    assert semantic_questions and all(any(q.startswith(o) for o in openings) for q in semantic_questions)
    assert len({answer for _, answer in turns[0]}) > len({answer for _, answer in turns[2]})


def test_bad_mixture_settings_are_named(seg_cache, tokenizer):
    with pytest.raises(InputError, match="objects_per_sample must be >= 1"):
        _mixture(seg_cache, tokenizer, {"semantic": 1}, objects_per_sample=0)
    with pytest.raises(InputError, match="phrasings must be >= 0"):
        _mixture(seg_cache, tokenizer, {"semantic": 1}, phrasings=-1)
    with pytest.raises(InputError, match=r"unknown task\(s\) \['segment'\]"):
        _mixture(seg_cache, tokenizer, {"segment": 1})
    with pytest.raises(InputError, match="needs the term dictionary"):
        _mixture(seg_cache, tokenizer, {"referring": 1})


def test_slice_window_cuts_sam2_input_and_masks_to_consecutive_slices_that_show_a_structure(seg_cache, tokenizer):
    cached = seg_cache.load("subjectA_sm")
    full = _mixture(seg_cache, tokenizer, {"semantic": 1, "interactive": 1}, objects_per_sample=2)
    window = _mixture(seg_cache, tokenizer, {"semantic": 1, "interactive": 1}, objects_per_sample=2, slice_window=5)
    starts = set()
    for index in range(12):
        sample, whole = window[index], full[index]
        assert sample.image.shape == whole.image.shape == (1, 16, 64, 64)  # the ViT keeps the whole volume
        assert sample.sam_image.shape == (5, 64, 64)
        # the window is a run of the cached slices: find where it starts
        start = next(z for z in range(12) if np.array_equal(sample.sam_image.numpy(), cached.sam_image[z : z + 5]))
        starts.add(start)
        for target in sample.targets:
            assert target.mask.shape == (5, 64, 64) and target.mask.sum() > 0
            for point in target.points:
                assert 0 <= point.ijk[2] < 5 and target.mask[int(point.ijk[2]), int(point.ijk[1]), int(point.ijk[0])]
            for box in target.boxes:
                assert 0 <= box.min_ijk[2] == box.max_ijk[2] < 5
    assert len(starts) > 2  # drawn at random depths
    with pytest.raises(InputError, match="slice_window must be >= 0"):
        _mixture(seg_cache, tokenizer, {"semantic": 1}, slice_window=-1)


def test_prompt_only_and_point_shares_set_how_interactive_samples_are_asked(seg_cache, tokenizer):
    names = set(_names_by_voxel_count(seg_cache).values())

    def kinds(**shares):
        mixture = _mixture(seg_cache, tokenizer, {"interactive": 1}, **shares)
        seen = []
        for index in range(40):
            sample = mixture[index]
            ((question, _),) = _turns(tokenizer, sample.input_ids)
            named = any(name in question for name in names)
            assert sample.targets[0].language == named  # prompts alone: SAM2 gets no [SEG] state
            seen.append(("named" if named else "prompts only", "points" if sample.targets[0].points else "box"))
        return seen

    assert set(kinds(prompt_only_share=1.0, point_share=1.0)) == {("prompts only", "points")}
    assert set(kinds(prompt_only_share=0.0, point_share=0.0)) == {("named", "box")}
    default = kinds()  # the paper's protocol: every prompt comes with text; half points, half boxes
    assert {k for k, _ in default} == {"named"} and 10 <= sum(p == "points" for _, p in default) <= 30
    mixed = kinds(prompt_only_share=0.5)
    assert 10 <= sum(k == "prompts only" for k, _ in mixed) <= 30
    for bad in ({"prompt_only_share": 1.5}, {"point_share": -0.1}, {"interactive_referring_share": 2.0}):
        with pytest.raises(InputError, match=f"{next(iter(bad))} must be in \\[0, 1\\]"):
            _mixture(seg_cache, tokenizer, {"interactive": 1}, **bad)


def test_interactive_samples_carry_semantic_or_referring_text_with_their_prompts(seg_cache, tokenizer, data_dir):
    terms = TermDictionary.load(data_dir / "m3d" / "term_dictionary.json")
    templates = load_templates()
    names = set(_names_by_voxel_count(seg_cache).values())
    referring_answers = {t.format(name) for t in templates.referring_answers for name in names}
    referring_questions = [re.escape(t).replace(r"\{\}", ".+") for t in templates.referring_questions]

    def texts(share: float) -> list[str]:
        mixture = _mixture(seg_cache, tokenizer, {"interactive": 1}, terms=terms, interactive_referring_share=share)
        seen = []
        for index in range(40):
            sample = mixture[index]
            assert sample.targets[0].points or sample.targets[0].boxes
            ((question, answer),) = _turns(tokenizer, sample.input_ids)
            if answer in referring_answers:  # a description asked, the class named in the answer
                asked = question.replace("<image>", "").lstrip("\n")
                assert any(re.fullmatch(pattern, asked) for pattern in referring_questions), asked
                seen.append("referring")
            else:
                assert answer in templates.semantic_answers and any(name in question for name in names)
                seen.append("semantic")
        return seen

    assert set(texts(0.0)) == {"semantic"}
    assert 10 <= texts(0.5).count("referring") <= 30  # the default share
    assert set(texts(1.0)) == {"referring"}  # every structure of this volume has a description in M3D's dictionary
