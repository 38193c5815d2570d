"""``metrics.json`` → tables in the paper's shape (Markdown and CSV) and PNG plots of one evaluation folder.

Tables 2-5 have the paper's layout: methods as rows, the paper's columns, scores ×100 except CIDEr. Table 2
(report generation) and Table 3 (VQA: long and short answers, multiple-choice accuracy) give one row per text
protocol; Table 4 (semantic and referring) and Table 5 (those two rows as its baselines, then box and points)
give Dice per M3D-Seg dataset. Tables S1 and S2 are ours, not the paper's: every score, count, false-positive
rate and skip behind them. With ``--compare`` (the paper's ``paper-facts.json``) the paper's rows join the
tables of the same number on the same scale, and every column that does not match is named under the table.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import InputError
from ..jsonfile import read_json

__all__ = ["Table", "tables_for", "read_compare", "write_outputs", "paper_scale"]

REPORT_COLUMNS = ("BLEU-1", "ROUGE", "METEOR", "CIDEr", "BERTScore")  # Table 2's names; Table 3 says "BLEU"
PROTOCOL_ROWS = {"ctchat": "CT-CHAT protocol", "m3d": "M3D protocol"}
DATASETS = {"0012": "CTOrg", "0003": "ACT-1K", "0011": "TotalSegmentator"}
MODE_ROWS = {"semantic": "semantic", "referring": "referring", "box": "bbox prompt", "points": "points prompt"}
SEG_TABLES = {"4": ("Referring segmentation on M3D-Seg (Dice)", ("semantic", "referring")),
              "5": ("Interactive segmentation on M3D-Seg (Dice; the referring text plus a box or three points)",
                    ("semantic", "referring", "box", "points"))}  # fmt: skip
COUNT_COLUMNS = ("cases", "skipped", "empty-truth cases", "false positives")


def paper_scale(column: str, value: float | None) -> float | None:
    """A [0, 1] score on the paper's scale: ×100, except CIDEr (unscaled) and counts."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if "CIDEr" in column or column in COUNT_COLUMNS:
        return value
    return 100.0 * value


class Table:
    """A titled grid: ``columns``, rows of ``(name, {column: value})`` and notes printed under it."""

    def __init__(self, number: str, title: str, columns: Sequence[str]) -> None:
        self.number, self.title, self.columns = number, title, list(columns)
        self.rows: list[tuple[str, dict]] = []
        self.notes: list[str] = []

    def add(self, name: str, values: dict) -> None:
        self.rows.append((name, {c: values.get(c) for c in self.columns}))

    def markdown(self) -> str:
        lines = [f"**Table {self.number}. {self.title}**", "", "| | " + " | ".join(self.columns) + " |",
                 "|---|" + "---:|" * len(self.columns)]  # fmt: skip
        for name, values in self.rows:
            lines.append(f"| {name} | " + " | ".join(_cell(c, values[c]) for c in self.columns) + " |")
        lines += [""] + [f"- {note}" for note in self.notes] if self.notes else []
        return "\n".join(lines) + "\n"

    def csv_rows(self) -> list[list]:
        return [[self.number, name, column, values[column]] for name, values in self.rows for column in self.columns]


def _cell(column: str, value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if "CIDEr" in column else f"{value:.2f}"
    return str(value)


def _text_values(metrics: dict, protocol: str, prefix: str = "") -> dict:
    scores = metrics.get(protocol, {})
    bert = metrics.get("bertscore", {})
    values = {"BLEU" if prefix else "BLEU-1": scores.get("BLEU-1"), "ROUGE": scores.get("ROUGE"),
              "METEOR": scores.get("METEOR"), "CIDEr": scores.get("CIDEr"), "BERTScore": bert.get("F1")}  # fmt: skip
    return {f"{prefix}{name}": paper_scale(name, value) for name, value in values.items()}


def _text_notes(parts: dict[str, dict]) -> list[str]:
    notes = ["BLEU is BLEU-1. ROUGE is ROUGE-L in CT-CHAT's protocol (pycocoevalcap on raw strings), ROUGE-1 in "
             "M3D's (Hugging Face evaluate, per-sample mean); M3D computes no CIDEr."]  # fmt: skip
    for name, metrics in parts.items():
        meteor = metrics.get("m3d", {}).get("METEOR variant")
        if meteor:
            notes.append(f"{name}METEOR in M3D's protocol: {meteor}.")
        bert = metrics.get("bertscore", {})
        if "F1" in bert:
            notes.append(f"{name}BERTScore: {bert['model']}, layer {bert['layer']} (the paper's baselines: "
                         "roberta-large, layer 17).")  # fmt: skip
        elif bert.get("skipped"):
            notes.append(f"{name}BERTScore not computed ({bert['skipped']}).")
    return notes


def _skip_note(metrics: dict) -> list[str]:
    skipped = metrics.get("skipped", {})
    if not skipped.get("count"):
        return []
    reasons = "; ".join(f"{count} {reason}" for reason, count in skipped["by_reason"].items())
    return [f"Skipped samples: {skipped['count']} ({reasons}); metrics.json lists them by id."]


def _report_tables(metrics: dict, model: str) -> list[Table]:
    table = Table("2", "Report generation on CT-RATE", REPORT_COLUMNS)
    for protocol, label in PROTOCOL_ROWS.items():
        if protocol in metrics:
            table.add(f"{model} ({label})", _text_values(metrics, protocol))
    table.notes = _text_notes({"": metrics}) + _skip_note(metrics)
    return [table]


def _vqa_tables(metrics: dict, model: str) -> list[Table]:
    names = ["BLEU", *REPORT_COLUMNS[1:]]
    columns = [f"{kind} {name}" for kind in ("long", "short") for name in names] + ["multiple-choice accuracy"]
    table = Table("3", "Visual question answering on CT-RATE", columns)
    choice = metrics.get("choice", {})
    for protocol, label in PROTOCOL_ROWS.items():
        values = {"multiple-choice accuracy": paper_scale("accuracy", choice.get("accuracy"))}
        for kind in ("long", "short"):
            if protocol in metrics.get(kind, {}):
                values.update(_text_values(metrics[kind], protocol, f"{kind} "))
        table.add(f"{model} ({label})", values)
    notes = _text_notes({f"{kind} answers: ": metrics[kind] for kind in ("long", "short") if kind in metrics})
    if choice:
        notes.append(f"Multiple choice: {choice['cases']} scored, {choice['unparsed']} answers naming no single "
                     f"option (wrong), {choice['unreadable_references']} unreadable references (skipped).")  # fmt: skip
    table.notes = notes + _skip_note(metrics)
    return [table]


def _seg_tables(metrics: dict, model: str) -> list[Table]:
    datasets = [code for code in DATASETS if code in metrics["by_mode"]] + sorted(
        code for code in metrics["by_mode"] if code not in DATASETS)  # fmt: skip
    columns = [DATASETS.get(code, code) for code in datasets]
    tables = []
    for number, (title, modes) in SEG_TABLES.items():
        if not any(mode in metrics["overall"] for mode in modes):
            continue
        table = Table(number, title, columns)
        for mode in modes:
            if mode in metrics["overall"]:
                values = {DATASETS.get(code, code): paper_scale("Dice", metrics["by_mode"][code].get(mode, {}).get(
                    "dice")) for code in datasets}  # fmt: skip
                table.add(f"{model} ({MODE_ROWS[mode]})", values)
        tables.append(table)
    tolerance = metrics.get("settings", {}).get("tolerance_voxels", 1.0)
    surface = f"surface Dice ({tolerance:g} voxel)"
    details = Table("S1", "Segmentation details (ours, not in the paper)",
                    ["Dice", "soft Dice (M3D)", surface, *COUNT_COLUMNS, "false-positive rate"])  # fmt: skip
    skipped = metrics.get("skipped", {}).get("samples", [])
    for code in datasets:
        by_mode = metrics["by_mode"][code]
        for mode, summary in sorted(by_mode.items(), key=lambda item: list(MODE_ROWS).index(item[0])):
            prefix = f"{code}/"
            skips = sum(s["id"].startswith(prefix) and s["id"].endswith(f"/{mode}") for s in skipped)
            details.add(f"{DATASETS.get(code, code)} ({code}), {mode}", {
                "Dice": paper_scale("Dice", summary["dice"]),
                "soft Dice (M3D)": paper_scale("Dice", summary["soft_dice"]),
                surface: paper_scale("Dice", summary["surface_dice"]), "cases": summary["cases"],
                "empty-truth cases": summary["empty_truth_cases"],
                "false positives": summary["false_positive_cases"],
                "false-positive rate": paper_scale("rate", summary["false_positive_rate"]),
                "skipped": skips})  # fmt: skip
    details.notes = [
        "Scores ×100. Dice and surface Dice on the thresholded mask; soft Dice is M3D's BinaryDice on probabilities, "
        "2·Σpt / (Σp + Σt + 1). A structure absent from a case (empty truth) has no Dice and is left out of the "
        "means; the false-positive rate is the share of those cases with any predicted voxel (both empty is a "
        "true negative).",
        f"M3D-Seg stores no voxel spacing, so the surface-Dice tolerance is {tolerance:g} voxel, not millimetres.",
    ] + _skip_note(metrics)  # fmt: skip
    return tables + [details]


def tables_for(metrics: dict, model: str) -> list[Table]:
    """The tables of one task's metrics; this run's rows are named after ``model``."""
    task = metrics["task"]
    if task == "report":
        return _report_tables(metrics, model)
    if task == "vqa":
        return _vqa_tables(metrics, model)
    return _seg_tables(metrics, model)


def read_compare(path: str | os.PathLike) -> dict:
    """The paper's rows: ``paper-facts.json``'s ``tables``, each ``{"<number>_<name>": {"columns": [...],
    "rows": {method: [values]}}}`` on the paper's scale."""
    data = read_json(path, "paper rows")
    tables = data.get("tables") if isinstance(data, dict) else None
    good = isinstance(tables, dict) and tables and all(
        isinstance(t, dict) and isinstance(t.get("columns"), list) and isinstance(t.get("rows"), dict)
        and all(isinstance(v, list) and len(v) == len(t["columns"]) for v in t["rows"].values())
        for t in tables.values())  # fmt: skip
    if not good:
        raise InputError(f"{path}: expected the paper's tables as in paper-facts.json: {{'tables': {{'2_name': "
                         f"{{'columns': [...], 'rows': {{method: [one value per column]}}}}}}}}.")  # fmt: skip
    return data


def _add_paper_rows(tables: list[Table], compare: dict) -> None:
    """The paper's rows of each table's number, and notes naming the columns that do not match."""
    for table in tables:
        paper = next((t for key, t in compare["tables"].items() if key.split("_", 1)[0] == table.number), None)
        if paper is None:
            continue
        for method, values in paper["rows"].items():
            table.add(f"paper: {method}", dict(zip(paper["columns"], values, strict=True)))
        theirs, ours = [c for c in paper["columns"] if c not in table.columns], [
            c for c in table.columns if c not in paper["columns"]]  # fmt: skip
        if theirs:
            table.notes.append(f"Paper columns with no counterpart here: {', '.join(theirs)}.")
        if ours:
            table.notes.append(f"Columns the paper does not report: {', '.join(ours)}.")


def write_outputs(metrics: dict, out: str | os.PathLike, model: str, compare: dict | None = None) -> list[Path]:
    """Write ``metrics.json``, ``tables.md``, ``tables.csv`` and the plots into ``out``; returns the paths.

    ``compare``: the paper's rows (see :func:`read_compare`), added to the tables of the same number."""
    out = Path(out)
    tables = tables_for(metrics, model)
    if compare:
        _add_paper_rows(tables, compare)
    written = []
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    written.append(out / "metrics.json")
    with atomic_path(out / "tables.md") as tmp:
        tmp.write_text("\n".join(table.markdown() for table in tables))
    written.append(out / "tables.md")
    with atomic_path(out / "tables.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["table", "row", "column", "value"])
        for table in tables:
            writer.writerows(table.csv_rows())
    written.append(out / "tables.csv")
    written += plot(metrics, out)
    return written


def _number(value: float | None) -> float:
    """A bar height: missing values are NaN, which matplotlib leaves blank (never 0)."""
    return float("nan") if value is None else float(value)


def _bars(axis, names: Sequence[str], series: dict[str, list[float | None]]) -> None:  # noqa: ANN001
    width = 0.8 / max(len(series), 1)
    for n, (label, values) in enumerate(series.items()):
        axis.bar(np.arange(len(names)) + n * width, [_number(v) for v in values], width, label=label)
    axis.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, fontsize=7)
    axis.legend(fontsize=6)


def plot(metrics: dict, out: Path) -> list[Path]:
    """PNG plots. Text: scores ×100 beside CIDEr on its own axis. Segmentation: Dice by prompt type, Dice per
    structure, overlays. Missing values are left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if metrics["task"] in ("report", "vqa"):
        parts = {"report": metrics} if metrics["task"] == "report" else {
            f"{k} answers": metrics[k] for k in ("long", "short") if k in metrics}  # fmt: skip
        if parts:
            scored = [c for c in REPORT_COLUMNS if c != "CIDEr"]
            series = {f"{name}, {label}": [_text_values(part, protocol)[c] for c in REPORT_COLUMNS]
                      for name, part in parts.items() for protocol, label in PROTOCOL_ROWS.items()
                      if protocol in part}  # fmt: skip
            figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), width_ratios=[4, 1])
            _bars(left, scored, {k: [v[REPORT_COLUMNS.index(c)] for c in scored] for k, v in series.items()})
            left.set_ylim(0, 100)
            left.set_ylabel("score ×100")
            _bars(right, ["CIDEr"], {k: [v[REPORT_COLUMNS.index("CIDEr")]] for k, v in series.items()})
            right.set_ylabel("CIDEr (unscaled)")
            figure.suptitle("Text scores (blank: not computed by that protocol)", fontsize=9)
            paths.append(_save(figure, out / "plots" / "text_scores.png"))
        return paths
    modes = sorted(metrics["overall"])
    figure, axis = plt.subplots(figsize=(7, 3.5))
    _bars(axis, modes, {DATASETS.get(d, d): [paper_scale("Dice", by_mode.get(m, {}).get("dice")) for m in modes]
                        for d, by_mode in metrics["by_mode"].items()})  # fmt: skip
    axis.set_ylim(0, 100)
    axis.set_ylabel("mean Dice ×100")
    axis.set_title("Dice by prompt type")
    paths.append(_save(figure, out / "plots" / "dice_by_prompt.png"))
    for dataset, by_mode in metrics["by_structure"].items():
        structures = sorted({s for mode in by_mode.values() for s in mode})
        figure, axis = plt.subplots(figsize=(max(6, 0.35 * len(structures) * len(by_mode)), 3.5))
        _bars(axis, structures, {mode: [paper_scale("Dice", rows.get(s, {}).get("dice")) for s in structures]
                                 for mode, rows in sorted(by_mode.items())})  # fmt: skip
        axis.set_ylim(0, 100)
        axis.set_ylabel("mean Dice ×100")
        axis.set_title(f"Dice per structure: {DATASETS.get(dataset, dataset)} ({dataset}); blank: absent or skipped")
        paths.append(_save(figure, out / "plots" / f"dice_per_structure_{dataset}.png"))
    examples = sorted((out / "examples").glob("*.npz"))
    if examples:
        paths.append(_overlays(examples, out))
    return paths


def _overlays(examples: list[Path], out: Path) -> Path:
    import matplotlib.pyplot as plt

    columns = min(4, len(examples))
    rows = -(-len(examples) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.ravel()[len(examples) :]:
        axis.axis("off")
    for axis, path in zip(axes.ravel(), examples, strict=False):
        with np.load(path) as example:
            axis.imshow(example["image"], cmap="gray")
            axis.contour(example["truth"], levels=[0.5], colors="lime", linewidths=0.8)
            if example["predicted"].any():
                axis.contour(example["predicted"], levels=[0.5], colors="red", linewidths=0.8)
            axis.set_title(f"{example['id']}\nslice {int(example['slice'])}", fontsize=6)
        axis.axis("off")
    figure.suptitle("green: ground truth, red: prediction", fontsize=8)
    return _save(figure, out / "plots" / "overlays.png")


def _save(figure, path: Path) -> Path:  # noqa: ANN001
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        figure.tight_layout()
        figure.savefig(tmp, dpi=110)
    plt.close(figure)
    return path
