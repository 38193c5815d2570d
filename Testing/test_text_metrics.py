"""Report metrics on real CT-RATE report texts: corpus protocol equal to pycocoevalcap's COCOEvalCap, sample
protocol's ROUGE equal to rouge-score, hand-computed extremes, named protocols, bad input."""

from __future__ import annotations

import csv
import shutil

import pytest

from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.evaluation.text_metrics import rouge_scores, text_scores

pytestmark = [pytest.mark.realdata, pytest.mark.skipif(shutil.which("java") is None,
                                                       reason="METEOR and the PTB tokenizer need Java")]  # fmt: skip


@pytest.fixture(scope="module")
def reports(data_dir) -> list[str]:
    path = data_dir / "ct_rate" / "ctclip_text_classifier" / "val.csv"
    with path.open() as handle:
        rows = csv.DictReader(handle)
        return [next(rows)["report_text"] for _ in range(12)]


class _Captions:
    """The two things COCOEvalCap reads from a COCO object."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.imgToAnns = {k: [{"image_id": k, "caption": v}] for k, v in texts.items()}

    def getImgIds(self) -> list[str]:  # noqa: N802 (pycocotools' name)
        return list(self.imgToAnns)


class _NoSpice:
    """SPICE needs Stanford CoreNLP models fetched at run time; COCOEvalCap's other scores do not."""

    def compute_score(self, gts, res):  # noqa: ANN001, ANN201
        return 0.0, [0.0] * len(gts)

    def method(self) -> str:
        return "SPICE"


def test_corpus_protocol_equals_cocoevalcap(reports, monkeypatch):
    import pycocoevalcap.eval as coco_eval

    references = {f"case{n}": text for n, text in enumerate(reports[:6])}
    predictions = {f"case{n}": text for n, text in enumerate(reports[6:12])}
    predictions["case0"] = references["case0"]  # one exact match among real, different reports
    monkeypatch.setattr(coco_eval, "Spice", _NoSpice)
    reference_eval = coco_eval.COCOEvalCap(_Captions(references), _Captions(predictions))
    reference_eval.evaluate()
    ours = text_scores(references, predictions, "corpus")
    names = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4", "METEOR": "METEOR",
             "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}  # fmt: skip
    for ours_name, theirs in names.items():
        assert ours[ours_name] == pytest.approx(reference_eval.eval[theirs], abs=1e-6), ours_name
    assert ours["protocol"] == "corpus" and ours["samples"] == 6 and 0 < ours["BLEU-1"] < 1


def test_sample_protocol_averages_per_report_scores(reports):
    references = {f"case{n}": text for n, text in enumerate(reports[:4])}
    predictions = {f"case{n}": text for n, text in enumerate(reports[4:8])}
    ours = text_scores(references, predictions, "sample")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    expected = sum(scorer.score(references[k], predictions[k])["rougeL"].fmeasure for k in references) / 4
    assert ours["ROUGE-L"] == pytest.approx(expected, abs=1e-9) and ours["protocol"] == "sample"
    assert set(ours) >= {"BLEU-1", "BLEU-4", "METEOR", "ROUGE-1", "ROUGE-L"} and "CIDEr" not in ours


def test_hand_computed_extremes(reports):
    same = text_scores({"a": reports[0]}, {"a": reports[0]}, "sample")
    assert same["BLEU-1"] == pytest.approx(1.0) and same["ROUGE-L"] == pytest.approx(1.0)
    disjoint = text_scores({"a": "liver spleen kidney"}, {"a": "apple orange banana"}, "sample")
    assert disjoint["BLEU-1"] < 1e-6 and disjoint["ROUGE-1"] == 0.0
    assert rouge_scores("the liver is normal", "the liver is enlarged")["ROUGE-1"] == pytest.approx(0.75)


def test_bad_input_is_named():
    with pytest.raises(InputError, match=r"missing \['b'\]"):
        text_scores({"a": "x", "b": "y"}, {"a": "x"})
    with pytest.raises(InputError, match="unknown text-metric protocol"):
        text_scores({"a": "x"}, {"a": "x"}, "mean")
