"""Report and long-answer metrics, in the two protocols the paper's baselines use.

* ``corpus`` (CT-CHAT, ``evaluations/new_llm_metrics.py``): ``pycocoevalcap`` with its PTB tokenizer, BLEU-1..4,
  METEOR, ROUGE-L and CIDEr computed over the whole corpus.
* ``sample`` (M3D, ``Bench/eval/eval_caption.py``): scores per sample, then averaged: BLEU-1..4 and METEOR from
  ``pycocoevalcap``'s per-sample scores (M3D used Hugging Face ``evaluate``, which is not installable offline
  with its metric scripts), ROUGE-1 and ROUGE-L from ``rouge-score`` (what ``evaluate``'s rouge wraps).

The output names its protocol. METEOR and the PTB tokenizer run Java (``java`` on the PATH).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping

import numpy as np

from ..errors import InputError

__all__ = ["PROTOCOLS", "text_scores", "rouge_scores"]

PROTOCOLS = ("corpus", "sample")
BLEU_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")


def _check(references: Mapping[str, str], predictions: Mapping[str, str]) -> None:
    if not references:
        raise InputError("no references to score against.")
    if set(references) != set(predictions):
        missing, extra = sorted(set(references) - set(predictions)), sorted(set(predictions) - set(references))
        raise InputError(f"predictions and references differ: missing {missing[:5]}, unexpected {extra[:5]}.")
    if shutil.which("java") is None:
        raise InputError("METEOR and the PTB tokenizer need Java: install a JRE (e.g. apt install default-jre).")


def rouge_scores(reference: str, prediction: str) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F-measure of one pair (``rouge-score``, stemming as ``evaluate`` does)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = scorer.score(reference, prediction)
    return {"ROUGE-1": scores["rouge1"].fmeasure, "ROUGE-L": scores["rougeL"].fmeasure}


def text_scores(references: Mapping[str, str], predictions: Mapping[str, str], protocol: str = "corpus") -> dict:
    """Scores of ``predictions`` against ``references`` (both keyed by sample id) under ``protocol``.

    Returns:
        ``{"protocol": ..., "samples": n, metric name: value}``; values are in [0, 1] except CIDEr.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if protocol not in PROTOCOLS:
        raise InputError(f"unknown text-metric protocol {protocol!r}; choose one of {list(PROTOCOLS)}.")
    _check(references, predictions)
    keys = sorted(references)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": references[k]}] for k in keys})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in keys})
    bleu, bleu_per_sample = Bleu(4).compute_score(gts, res, verbose=0)
    meteor, meteor_per_sample = Meteor().compute_score(gts, res)
    result: dict = {"protocol": protocol, "samples": len(keys)}
    if protocol == "corpus":
        result.update(dict(zip(BLEU_NAMES, map(float, bleu), strict=True)))
        result["METEOR"] = float(meteor)
        result["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        result["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        return result
    result.update({name: float(np.mean(values)) for name, values in zip(BLEU_NAMES, bleu_per_sample, strict=True)})
    result["METEOR"] = float(np.mean(meteor_per_sample))
    rouge = [rouge_scores(references[k], predictions[k]) for k in keys]
    result.update({name: float(np.mean([r[name] for r in rouge])) for name in ("ROUGE-1", "ROUGE-L")})
    return result
