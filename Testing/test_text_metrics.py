"""Report metrics, each protocol as its source runs it: CT-CHAT's (pycocoevalcap on raw strings, corpus BLEU-1)
and M3D's (Hugging Face ``evaluate``'s bleu/rouge/meteor defaults per sample, then the mean). Values are
computed by hand from each source's definition, and on real CT-RATE reports against pycocoevalcap called the
way CT-CHAT's ``evaluations/new_llm_metrics.py`` calls it."""

from __future__ import annotations

import csv
import math
import shutil

import pytest

from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.evaluation.text_metrics import m3d_bleu1, m3d_meteor, m3d_rouge1, meteor_variant, text_scores

java = pytest.mark.skipif(shutil.which("java") is None, reason="CT-CHAT's METEOR (METEOR 1.5) needs Java")


@pytest.fixture(scope="module")
def reports(data_dir) -> list[str]:
    path = data_dir / "ct_rate" / "ctclip_text_classifier" / "val.csv"
    with path.open() as handle:
        rows = csv.DictReader(handle)
        return [next(rows)["report_text"] for _ in range(12)]


@java
def test_ctchat_scores_raw_strings_with_corpus_bleu1():
    """No tokenizer: case and punctuation stay on the words; the prediction loses <|eot_id|>, not the reference."""
    references = {"a": "The lungs are clear.", "b": "No pleural effusion."}
    predictions = {"a": "the lungs are clear.", "b": "No pleural effusion<|eot_id|>"}
    scores = text_scores(references, predictions, "ctchat")
    # matches: lungs, are, clear. (3 of 4; "the" is not "The") + No, pleural (2 of 3; "effusion" is not
    # "effusion."); corpus BLEU-1 = 5 / 7, lengths equal so no brevity penalty
    assert scores["BLEU-1"] == pytest.approx(5 / 7, abs=1e-6)
    # ROUGE-L (beta 1.2) per pair: LCS 3 of 4 and 2 of 3 -> F = 0.75 and 2/3, averaged
    assert scores["ROUGE"] == pytest.approx((0.75 + 2 / 3) / 2, abs=1e-9)
    assert scores["protocol"] == "ctchat" and scores["samples"] == 2 and scores["ROUGE variant"].startswith("ROUGE-L")


@java
@pytest.mark.realdata
def test_ctchat_equals_pycocoevalcap_called_as_ctchat_calls_it(reports):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    references = {f"case{n}": text for n, text in enumerate(reports[:6])}
    predictions = {f"case{n}": text for n, text in enumerate(reports[6:12])}
    predictions["case0"] = references["case0"]
    # new_llm_metrics.py: a running counter as key, one-element lists, raw strings
    gts = {n: [references[k]] for n, k in enumerate(sorted(references))}
    res = {n: [predictions[k]] for n, k in enumerate(sorted(references))}
    expected = {"BLEU-1": Bleu(4).compute_score(gts, res)[0][0], "METEOR": Meteor().compute_score(gts, res)[0],
                "ROUGE": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0]}  # fmt: skip
    ours = text_scores(references, predictions, "ctchat")
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    assert 0 < ours["BLEU-1"] < 1


def test_m3d_bleu1_is_evaluates_bleu_with_max_order_1():
    # 13a tokens keep case and split the final period: "The heart is normal ." vs "the heart is normal ."
    assert m3d_bleu1("The heart is normal.", "the heart is normal.") == pytest.approx(4 / 5)
    # shorter prediction: "Cardiomegaly ." (2 tokens) against 5; only "." matches; nmt's brevity penalty
    assert m3d_bleu1("Mild cardiomegaly is seen.", "Cardiomegaly.") == pytest.approx(0.5 * math.exp(1 - 5 / 2))
    assert m3d_bleu1("Mild cardiomegaly is seen.", "") == 0.0


def test_m3d_rouge_is_unstemmed_rouge1():
    # without stemming "nodule" is not "nodules" and "is" is not "are": 1 of 3 words
    assert m3d_rouge1("nodules are seen", "nodule is seen") == pytest.approx(1 / 3)
    assert m3d_rouge1("The liver is normal.", "the liver is NORMAL") == pytest.approx(1.0)  # lower case, no punctuation


def test_m3d_meteor_is_nltks_with_evaluates_parameters():
    # 3 exact matches of 4 on both sides, one chunk: Fmean = 0.75, penalty 0.5 * (1/3)^3
    assert m3d_meteor("the liver is normal", "the liver is enlarged") == pytest.approx(0.75 * (1 - 0.5 / 27))
    # "nodule" matches "nodules" by its Porter stem, "seen" exactly: 2 of 3, two chunks: penalty 0.5 * 1^3
    assert m3d_meteor("nodules are seen", "nodule is seen") == pytest.approx((2 / 3) * 0.5)
    assert "METEOR" in meteor_variant()


@pytest.mark.realdata
def test_m3d_protocol_is_the_mean_of_per_sample_scores(reports):
    references = {f"case{n}": text for n, text in enumerate(reports[:4])}
    predictions = {f"case{n}": text for n, text in enumerate(reports[4:8])}
    ours = text_scores(references, predictions, "m3d")
    keys = sorted(references)
    assert ours["BLEU-1"] == pytest.approx(sum(m3d_bleu1(references[k], predictions[k]) for k in keys) / 4)
    assert ours["ROUGE"] == pytest.approx(sum(m3d_rouge1(references[k], predictions[k]) for k in keys) / 4)
    assert ours["CIDEr"] is None and ours["ROUGE variant"].startswith("ROUGE-1")
    same = text_scores({"a": reports[0]}, {"a": reports[0]}, "m3d")
    assert same["BLEU-1"] == pytest.approx(1.0) and same["ROUGE"] == pytest.approx(1.0)


def test_bad_input_is_named():
    with pytest.raises(InputError, match=r"missing \['b'\]"):
        text_scores({"a": "x", "b": "y"}, {"a": "x"}, "m3d")
    with pytest.raises(InputError, match="unknown text-metric protocol"):
        text_scores({"a": "x"}, {"a": "x"}, "mean")
