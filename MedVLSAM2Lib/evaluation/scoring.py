"""Metrics of a finished run, from its prediction records (the content of ``metrics.json``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from .bertscore import bertscore
from .cases import Skipped
from .seg_metrics import summarize
from .text_metrics import PROTOCOLS, text_scores

__all__ = ["text_metrics", "choice_metrics", "seg_metrics", "task_metrics", "skipped_summary"]

logger = logging.getLogger(__name__)
UNREADABLE_REFERENCE = "the reference answer names no single option of its question"


def _seconds(records: Sequence[dict]) -> float | None:
    times = [r["seconds"] for r in records if r.get("seconds") is not None]
    return float(np.mean(times)) if times else None


def text_metrics(records: Sequence[dict], protocols: Sequence[str] = PROTOCOLS,
                 bertscore_model: str | os.PathLike | None = None, use_bertscore: bool = True,
                 bertscore_layer: int | None = None) -> dict:  # fmt: skip
    """Text scores of report or long/short-answer records under each protocol, and BERTScore F1."""
    references = {r["id"]: r["reference"] for r in records}
    predictions = {r["id"]: r["prediction"] for r in records}
    metrics: dict = {"cases": len(records), "seconds_per_case": _seconds(records)}
    for protocol in protocols:
        metrics[protocol] = text_scores(references, predictions, protocol)
    metrics["bertscore"] = (
        bertscore(references, predictions, bertscore_model, bertscore_layer)
        if use_bertscore
        else {"skipped": "--bertscore-model none"}
    )
    return metrics


def choice_metrics(records: Sequence[dict]) -> dict:
    """Multiple-choice accuracy: an answer is right when the option it picks is the reference's option; an
    answer naming no option or several counts as wrong (``unparsed``). A reference whose option cannot be read
    is an error in the log, counted (``unreadable_references``) and listed by id (``skipped``)."""
    scored = [r for r in records if r.get("truth")]
    unreadable = [r for r in records if not r.get("truth")]
    for record in unreadable:
        logger.error("%s: %s: %r", record["id"], UNREADABLE_REFERENCE, record["reference"])
    right = sum(r["choice"] == r["truth"] for r in scored)
    return {"cases": len(scored), "accuracy": right / len(scored) if scored else None,
            "unparsed": sum(r["choice"] is None for r in scored), "unreadable_references": len(unreadable),
            "skipped": skipped_summary([Skipped(r["id"], UNREADABLE_REFERENCE) for r in unreadable]),
            "seconds_per_case": _seconds(records)}  # fmt: skip


def skipped_summary(skipped: Sequence[Skipped]) -> dict:
    """Skipped samples: their number, the count per reason and every id with its reason."""
    reasons: dict[str, int] = {}
    for item in skipped:
        reasons[item.reason] = reasons.get(item.reason, 0) + 1
    return {"count": len(skipped), "by_reason": reasons,
            "samples": [{"id": item.id, "reason": item.reason} for item in skipped]}  # fmt: skip


def seg_metrics(records: Sequence[dict]) -> dict:
    """Mean Dice, soft Dice and surface Dice per dataset and mode (``by_mode``), per structure within them
    (``by_structure``) and per mode over all datasets (``overall``); empty-truth and skipped cases counted."""
    scored = [r for r in records if "skipped" not in r]
    by_mode: dict = {}
    by_structure: dict = {}
    for dataset in sorted({r["dataset"] for r in scored}):
        rows = [r for r in scored if r["dataset"] == dataset]
        by_mode[dataset] = summarize(rows, by="mode")
        by_structure[dataset] = {mode: summarize([r for r in rows if r["mode"] == mode], by="structure")
                                 for mode in sorted({r["mode"] for r in rows})}  # fmt: skip
    return {"cases": len(records), "overall": summarize(scored, by="mode"), "by_mode": by_mode,
            "by_structure": by_structure, "seconds_per_case": _seconds(scored)}  # fmt: skip


def task_metrics(task: str, records: Sequence[dict], skipped: Sequence[Skipped] = (),
                 **text_options) -> dict:  # noqa: ANN003  # fmt: skip
    """``metrics.json`` content of ``task`` (``report``, ``vqa`` or ``seg``); ``skipped`` are the samples the
    case lists left out (seg cases skipped while predicting, and unreadable choice references, join them)."""
    skipped = list(skipped) + [Skipped(r["id"], r["skipped"]) for r in records if "skipped" in r]
    if task == "report":
        return {"task": task, **text_metrics(records, **text_options), "skipped": skipped_summary(skipped)}
    if task == "vqa":
        metrics: dict = {"task": task, "skipped": skipped_summary(skipped)}
        for kind in ("short", "long"):
            rows = [r for r in records if r["kind"] == kind]
            if rows:
                metrics[kind] = text_metrics(rows, **text_options)
        rows = [r for r in records if r["kind"] == "choice"]
        if rows:
            metrics["choice"] = choice_metrics(rows)
            unreadable = [Skipped(**item) for item in metrics["choice"]["skipped"]["samples"]]
            metrics["skipped"] = skipped_summary(skipped + unreadable)
        return metrics
    return {"task": task, **seg_metrics(records), "skipped": skipped_summary(skipped)}
