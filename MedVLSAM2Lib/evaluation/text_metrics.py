"""Report and long/short-answer metrics, in the two protocols of the paper's baselines, each as its source runs it.

``ctchat`` — CT-CHAT, ``evaluations/new_llm_metrics.py``: ``pycocoevalcap``'s Bleu(4), Meteor, Rouge and Cider
called **on raw strings** (no PTB tokenizer): ``gts[i] = [reference]``, ``res[i] = [prediction]`` with
``<s>``, ``</s>``, ``<|eot_id|>`` and newlines removed from the prediction only. BLEU-1 is the corpus BLEU's
first order (CT-CHAT keeps only that one); METEOR is the corpus score of Java METEOR 1.5; ROUGE-L and CIDEr are
pycocoevalcap's means over samples (CIDEr's IDF comes from the scored references). One departure: a newline
inside a reference is replaced by a space, because the METEOR jar reads one segment per line.

``m3d`` — M3D, ``Bench/eval/eval_caption.py`` and ``eval_vqa.py``: Hugging Face ``evaluate`` (0.4.1) per sample,
then the mean over samples, on ``strip()``-ed strings:

* BLEU-1: ``bleu.compute(max_order=1)``: the 13a tokenizer (``sacrebleu``'s, case kept), tensorflow/nmt's
  ``compute_bleu`` without smoothing, brevity penalty against the reference. (An empty prediction makes
  ``evaluate`` divide by zero; here it scores 0.)
* ROUGE: ``rouge.compute(rouge_types=["rouge1"])``: ROUGE-1 F-measure of ``rouge-score`` **without stemming**
  (``evaluate``'s default).
* METEOR: ``meteor.compute()``: nltk's ``single_meteor_score`` (alpha 0.9, beta 3, gamma 0.5, lower case,
  Porter stems, WordNet synonyms) on ``word_tokenize``. nltk's WordNet and punkt data cannot be downloaded here:
  when they are not installed, synonyms are not matched and sentences are split at ``. ! ?`` instead of by punkt,
  and the result's ``METEOR variant`` says so.
* M3D computes no CIDEr.

The result names its protocol and every substitution. Java METEOR needs ``java`` on the PATH.
"""

from __future__ import annotations

import functools
import math
import re
import shutil
from collections import Counter
from collections.abc import Mapping

import numpy as np

from ..errors import InputError

__all__ = ["PROTOCOLS", "text_scores", "m3d_bleu1", "m3d_rouge1", "m3d_meteor", "meteor_variant"]

PROTOCOLS = ("ctchat", "m3d")
_CTCHAT_TOKENS = ("<s>", "</s>", "<|eot_id|>", "\n")


def _check(references: Mapping[str, str], predictions: Mapping[str, str], protocol: str) -> None:
    if not references:
        raise InputError("no references to score against.")
    if set(references) != set(predictions):
        missing, extra = sorted(set(references) - set(predictions)), sorted(set(predictions) - set(references))
        raise InputError(f"predictions and references differ: missing {missing[:5]}, unexpected {extra[:5]}.")
    if protocol == "ctchat" and shutil.which("java") is None:
        raise InputError("CT-CHAT's METEOR (METEOR 1.5) needs Java: install a JRE (e.g. apt install default-jre).")


def m3d_bleu1(reference: str, prediction: str) -> float:
    """``evaluate``'s ``bleu`` with ``max_order=1`` on one pair: 13a tokens, clipped unigram precision times
    tensorflow/nmt's brevity penalty (``exp(1 - 1 / ratio)`` when the prediction is shorter)."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    reference_tokens, prediction_tokens = tokenize(reference).split(), tokenize(prediction).split()
    if not prediction_tokens or not reference_tokens:
        return 0.0
    matches = sum((Counter(prediction_tokens) & Counter(reference_tokens)).values())
    precision = matches / len(prediction_tokens)
    ratio = len(prediction_tokens) / len(reference_tokens)
    penalty = 1.0 if ratio > 1.0 else math.exp(1.0 - 1.0 / ratio)
    return precision * penalty


def m3d_rouge1(reference: str, prediction: str) -> float:
    """``evaluate``'s ``rouge`` with ``rouge_types=["rouge1"]`` on one pair: ``rouge-score``'s ROUGE-1
    F-measure without stemming."""
    from rouge_score import rouge_scorer

    return float(
        rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False).score(reference, prediction)["rouge1"].fmeasure
    )


class _NoSynonyms:
    """A WordNet stand-in with no synonyms (nltk's METEOR still matches exact words and stems)."""

    @staticmethod
    def synsets(word: str) -> list:
        return []


def _nltk_data(path: str) -> bool:
    import nltk

    try:
        nltk.data.find(path)
    except LookupError:
        return False
    return True


@functools.cache
def _nltk_resources() -> tuple[bool, bool]:
    """Whether nltk's WordNet and punkt data are installed (looked up once per process)."""
    wordnet = _nltk_data("corpora/wordnet") or _nltk_data("corpora/wordnet.zip")
    return wordnet, _nltk_data("tokenizers/punkt_tab/english/")


def meteor_variant() -> str:
    """What :func:`m3d_meteor` runs on this machine (recorded with every result)."""
    wordnet, punkt = _nltk_resources()
    if wordnet and punkt:
        return "nltk METEOR as evaluate runs it"
    found = (("no WordNet synonyms", wordnet), ("sentences split at . ! ? instead of by punkt", punkt))
    changes = [change for change, ok in found if not ok]
    return f"nltk METEOR with {' and '.join(changes)} (nltk data not installed; evaluate downloads it)"


def _word_tokens(text: str, punkt: bool) -> list[str]:
    from nltk.tokenize import word_tokenize

    if punkt:
        return word_tokenize(text)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    return [token for sentence in sentences for token in word_tokenize(sentence, preserve_line=True)]


def m3d_meteor(reference: str, prediction: str) -> float:
    """``evaluate``'s ``meteor`` on one pair: nltk's ``single_meteor_score`` with its defaults on word tokens
    (see :func:`meteor_variant` for what runs where nltk's data is missing)."""
    from nltk.translate.meteor_score import single_meteor_score

    has_wordnet, punkt = _nltk_resources()
    if has_wordnet:
        from nltk.corpus import wordnet
    else:
        wordnet = _NoSynonyms()
    return float(single_meteor_score(_word_tokens(reference, punkt), _word_tokens(prediction, punkt),
                                     wordnet=wordnet))  # fmt: skip


def _ctchat(references: Mapping[str, str], predictions: Mapping[str, str], keys: list[str]) -> dict:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    def clean(text: str) -> str:
        for token in _CTCHAT_TOKENS:
            text = text.replace(token, "")
        return text

    gts = {n: [references[k].replace("\n", " ")] for n, k in enumerate(keys)}
    res = {n: [clean(predictions[k])] for n, k in enumerate(keys)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"BLEU-1": float(bleu[0]), "BLEU-4": float(bleu[3]), "METEOR": float(Meteor().compute_score(gts, res)[0]),
            "ROUGE": float(Rouge().compute_score(gts, res)[0]), "CIDEr": float(Cider().compute_score(gts, res)[0]),
            "ROUGE variant": "ROUGE-L (pycocoevalcap)", "METEOR variant": "Java METEOR 1.5, corpus score"}  # fmt: skip


def _m3d(references: Mapping[str, str], predictions: Mapping[str, str], keys: list[str]) -> dict:
    pairs = [(references[k].strip(), predictions[k].strip()) for k in keys]
    return {"BLEU-1": float(np.mean([m3d_bleu1(r, p) for r, p in pairs])),
            "ROUGE": float(np.mean([m3d_rouge1(r, p) for r, p in pairs])),
            "METEOR": float(np.mean([m3d_meteor(r, p) for r, p in pairs])), "CIDEr": None,
            "ROUGE variant": "ROUGE-1 (rouge-score, no stemming)", "METEOR variant": meteor_variant()}  # fmt: skip


def text_scores(references: Mapping[str, str], predictions: Mapping[str, str], protocol: str = "ctchat") -> dict:
    """Scores of ``predictions`` against ``references`` (both keyed by sample id) under ``protocol``
    (``ctchat`` or ``m3d``).

    Returns:
        ``{"protocol", "samples", "BLEU-1", "ROUGE", "METEOR", "CIDEr", "ROUGE variant", "METEOR variant"}``
        (``ctchat`` adds ``BLEU-4``); scores on [0, 1] except CIDEr, ``None`` where the protocol has none.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown text-metric protocol {protocol!r}; choose one of {list(PROTOCOLS)}.")
    _check(references, predictions, protocol)
    keys = sorted(references)
    scores = _ctchat(references, predictions, keys) if protocol == "ctchat" else _m3d(references, predictions, keys)
    return {"protocol": protocol, "samples": len(keys), **scores}
