"""``metrics.json`` → the paper-style tables (Markdown and CSV) and PNG plots of one evaluation folder.

Tables: 2 report generation (CT-RATE), 3 VQA (CT-RATE), 4 semantic and referring segmentation (M3D-Seg),
5 interactive segmentation from the referring text plus boxes or points (M3D-Seg). Every row is this run's
checkpoint; rows quoted from the paper are added only from a ``--compare`` JSON file the user provides, and are
marked as quoted (the paper's numbers are not bundled: they could not be read offline when this was written).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import InputError
from ..jsonfile import read_json

__all__ = ["Table", "tables_for", "read_compare", "write_outputs"]

TEXT_COLUMNS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-1", "ROUGE-L", "CIDEr", "BERTScore-F1")
PROTOCOL_NAMES = {"corpus": "corpus (CT-CHAT)", "sample": "per-sample mean (M3D)"}
DATASET_NAMES = {"0003": "AbdomenCT-1K (0003)", "0011": "TotalSegmentator (0011)", "0012": "CT-ORG (0012)"}
SEG_SCORES = (("Dice", "dice"), ("soft Dice", "soft_dice"), ("surface Dice", "surface_dice"))
SEG_TABLES = {"4": ("Semantic and referring segmentation", ("semantic", "referring")),
              "5": ("Interactive segmentation (the referring text plus a box or three points)",
                    ("box", "points"))}  # fmt: skip


class Table:
    """A titled grid: ``columns`` and rows of ``(name, {column: value})``."""

    def __init__(self, number: str, title: str, columns: Sequence[str]) -> None:
        self.number, self.title, self.columns = number, title, list(columns)
        self.rows: list[tuple[str, dict]] = []

    def add(self, name: str, values: dict) -> None:
        self.rows.append((name, {c: values.get(c) for c in self.columns}))

    def markdown(self) -> str:
        lines = [f"**Table {self.number}. {self.title}**", "", "| | " + " | ".join(self.columns) + " |",
                 "|---|" + "---:|" * len(self.columns)]  # fmt: skip
        for name, values in self.rows:
            lines.append(f"| {name} | " + " | ".join(_cell(values[c]) for c in self.columns) + " |")
        return "\n".join(lines) + "\n"

    def csv_rows(self) -> list[list]:
        return [[self.number, name, column, values[column]] for name, values in self.rows for column in self.columns]


def _cell(value: object) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _text_row(metrics: dict, protocol: str) -> dict:
    row = dict(metrics[protocol])
    if "F1" in metrics.get("bertscore", {}):
        row["BERTScore-F1"] = metrics["bertscore"]["F1"]
    return row


def _text_table(number: str, title: str, parts: dict[str, dict]) -> Table:
    table = Table(number, title, TEXT_COLUMNS)
    for name, metrics in parts.items():
        for protocol in (p for p in PROTOCOL_NAMES if p in metrics):
            table.add(f"{name}, {PROTOCOL_NAMES[protocol]}", _text_row(metrics, protocol))
    return table


def tables_for(metrics: dict, model: str) -> list[Table]:
    """The tables of one task's metrics; rows are named after ``model``."""
    task = metrics["task"]
    if task == "report":
        return [_text_table("2", "Report generation on CT-RATE (validation)", {model: metrics})]
    if task == "vqa":
        parts = {f"{model}, {kind} answers": metrics[kind] for kind in ("long", "short") if kind in metrics}
        tables = [_text_table("3", "Visual question answering on CT-RATE (validation)", parts)] if parts else []
        if "choice" in metrics:
            choice = Table("3", "Multiple-choice VQA on CT-RATE (validation)", ("accuracy", "cases", "unparsed"))
            choice.add(model, metrics["choice"])
            tables.append(choice)
        return tables
    tables = []
    for number, (title, modes) in SEG_TABLES.items():
        columns = [f"{mode} {score}" for mode in modes for score, _ in SEG_SCORES] + ["cases", "empty-truth cases"]
        table = Table(number, f"{title} on M3D-Seg (test): {model}", columns)
        for dataset, by_mode in metrics["by_mode"].items():
            values = {f"{mode} {score}": by_mode.get(mode, {}).get(key) for mode in modes
                      for score, key in SEG_SCORES}  # fmt: skip
            first = next((by_mode[m] for m in modes if m in by_mode), {})
            values.update({"cases": first.get("cases"), "empty-truth cases": first.get("empty_truth_cases")})
            table.add(DATASET_NAMES.get(dataset, dataset), values)
        if table.rows and any(mode in metrics["overall"] for mode in modes):
            tables.append(table)
    return tables


def _is_quoted_row(row: object) -> bool:
    return isinstance(row, dict) and isinstance(row.get("method"), str) and isinstance(row.get("values"), dict)


def read_compare(path: str | os.PathLike) -> dict:
    """Rows quoted from a paper, checked: ``{"source": ..., "tables": {"2": [{"method": ..., "values": {...}}]}}``."""
    data = read_json(path, "comparison rows")
    tables = data.get("tables") if isinstance(data, dict) else None
    groups = list(tables.values()) if isinstance(tables, dict) else []
    if not groups or not all(isinstance(group, list) and all(map(_is_quoted_row, group)) for group in groups):
        raise InputError(f"{path}: expected {{'source': ..., 'tables': {{'2': [{{'method': ..., 'values': "
                         f"{{column: value}}}}]}}}}.")  # fmt: skip
    return data


def _add_quoted(tables: list[Table], compare: dict) -> None:
    """Each quoted row joins the tables of its number that have one of its columns."""
    source = compare.get("source", "the paper")
    for table in tables:
        for row in compare["tables"].get(table.number, []):
            if any(column in row["values"] for column in table.columns):
                table.add(f"{row['method']} (quoted from {source})", row["values"])


def write_outputs(metrics: dict, out: str | os.PathLike, model: str, compare: dict | None = None) -> list[Path]:
    """Write ``metrics.json``, ``tables.md``, ``tables.csv`` and the plots into ``out``; returns the paths.

    ``compare``: rows quoted from a paper (see :func:`read_compare`), added to the tables."""
    out = Path(out)
    tables = tables_for(metrics, model)
    if compare:
        _add_quoted(tables, compare)
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


def plot(metrics: dict, out: Path) -> list[Path]:
    """PNG plots: text scores (report/VQA); per-structure Dice, Dice by prompt type and overlays (segmentation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if metrics["task"] in ("report", "vqa"):
        parts = {"report": metrics} if metrics["task"] == "report" else {
            k: metrics[k] for k in ("short", "long") if k in metrics}  # fmt: skip
        if parts:
            figure, axis = plt.subplots(figsize=(8, 3.5))
            width = 0.8 / len(parts)
            for n, (name, part) in enumerate(parts.items()):
                row = _text_row(part, "corpus")
                values = [row.get(c) or 0.0 for c in TEXT_COLUMNS]
                axis.bar(np.arange(len(TEXT_COLUMNS)) + n * width, values, width, label=name)
            axis.set_xticks(np.arange(len(TEXT_COLUMNS)) + 0.4 - width / 2, TEXT_COLUMNS, rotation=30)
            axis.set_title("Text scores (corpus protocol)")
            axis.legend()
            paths.append(_save(figure, out / "plots" / "text_scores.png"))
        return paths
    modes = sorted(metrics["overall"])
    figure, axis = plt.subplots(figsize=(7, 3.5))
    datasets = list(metrics["by_mode"])
    width = 0.8 / max(len(datasets), 1)
    for n, dataset in enumerate(datasets):
        values = [metrics["by_mode"][dataset].get(m, {}).get("dice") or 0.0 for m in modes]
        axis.bar(np.arange(len(modes)) + n * width, values, width, label=DATASET_NAMES.get(dataset, dataset))
    axis.set_xticks(np.arange(len(modes)) + 0.4 - width / 2, modes)
    axis.set_ylim(0, 1)
    axis.set_ylabel("mean Dice")
    axis.set_title("Dice by prompt type")
    axis.legend(fontsize=7)
    paths.append(_save(figure, out / "plots" / "dice_by_prompt.png"))
    for dataset, by_mode in metrics["by_structure"].items():
        structures = sorted({s for mode in by_mode.values() for s in mode})
        figure, axis = plt.subplots(figsize=(max(6, 0.35 * len(structures) * len(by_mode)), 3.5))
        width = 0.8 / max(len(by_mode), 1)
        for n, (mode, rows) in enumerate(sorted(by_mode.items())):
            values = [rows.get(s, {}).get("dice") or 0.0 for s in structures]
            axis.bar(np.arange(len(structures)) + n * width, values, width, label=mode)
        axis.set_xticks(np.arange(len(structures)) + 0.4 - width / 2, structures, rotation=60, fontsize=7)
        axis.set_ylim(0, 1)
        axis.set_ylabel("mean Dice")
        axis.set_title(f"Dice per structure: {DATASET_NAMES.get(dataset, dataset)}")
        axis.legend(fontsize=7)
        paths.append(_save(figure, out / "plots" / f"dice_per_structure_{dataset}.png"))
    examples = sorted((out / "examples").glob("*.npz"))
    if examples:
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
        paths.append(_save(figure, out / "plots" / "overlays.png"))
    return paths


def _save(figure, path: Path) -> Path:  # noqa: ANN001
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        figure.tight_layout()
        figure.savefig(tmp, dpi=110)
    plt.close(figure)
    return path
