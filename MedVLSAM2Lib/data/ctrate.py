"""CT-RATE readers: report CSVs, scan metadata, CT-CHAT VQA JSON and the volume folder layout.

Everything here streams: reports and metadata are read row by row, VQA records one by one, and
volumes are only located (a path), never loaded, until the caller asks.

Intensity rule: CT-RATE v2 volumes (folders ``train_fixed`` / ``valid_fixed``) are already in HU.
Applying the metadata ``RescaleSlope``/``RescaleIntercept`` to them again double-rescales (a known
CT-CLIP pitfall), so :func:`load_ctrate_volume` only rescales v1 volumes and says which it did.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..jsonfile import read_json
from ..volume import Volume, read_volume

__all__ = [
    "REPORT_COLUMNS",
    "ABNORMALITY_LABELS",
    "CTRateReport",
    "LabeledReport",
    "ScanMetadata",
    "VQATurn",
    "VQASample",
    "iter_reports",
    "iter_labeled_reports",
    "read_accession_map",
    "iter_metadata",
    "load_metadata",
    "iter_vqa",
    "volume_path",
    "is_fixed_volume",
    "load_ctrate_volume",
    "cache_items",
]

logger = logging.getLogger(__name__)

REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
ABNORMALITY_LABELS = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)
METADATA_COLUMNS = ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")
VOLUME_NAME = re.compile(
    r"^(?P<split>train|valid)_(?P<patient>\d+)_(?P<scan>[a-z]+)_(?P<recon>\d+)(?:\.nii(?:\.gz)?)?$"
)
NOT_GIVEN = "Not given."


def _rows(path: str | os.PathLike, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Stream CSV rows as dicts after checking the header holds ``required``; yields (line number, row)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such CSV file.")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        try:
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: missing column(s) {missing}; the header is {reader.fieldnames}.")
            for row in reader:
                short = [c for c in required if row.get(c) is None]
                if short:
                    raise InputError(f"{path}, line {reader.line_num}: the row ends before column(s) {short}.")
                yield reader.line_num, row
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: not UTF-8 text ({err}); re-save the CSV as UTF-8.") from err


def _text(value: str | None) -> str:
    value = (value or "").strip()
    return "" if value == NOT_GIVEN else value


@dataclass(frozen=True)
class CTRateReport:
    """One row of ``train_reports.csv`` / ``validation_reports.csv`` ("Not given." becomes "")."""

    volume_name: str
    clinical_information: str
    technique: str
    findings: str
    impressions: str

    @property
    def text(self) -> str:
        """Findings and impression as CT-CHAT joins them for report generation."""
        return f"Findings: {self.findings} Impression: {self.impressions}"


def iter_reports(path: str | os.PathLike) -> Iterator[CTRateReport]:
    """Stream a CT-RATE report CSV (columns ``REPORT_COLUMNS``)."""
    for _, row in _rows(path, REPORT_COLUMNS):
        yield CTRateReport(row["VolumeName"].strip(), *(_text(row[c]) for c in REPORT_COLUMNS[1:]))


@dataclass(frozen=True)
class LabeledReport:
    """A report text with CT-RATE's 18 binary abnormality labels (CT-CLIP text-classifier files)."""

    accession: str
    text: str
    labels: dict[str, int]


def iter_labeled_reports(path: str | os.PathLike) -> Iterator[LabeledReport]:
    """Stream CT-CLIP's ``AccessionNo, report_text, <18 labels>`` CSV."""
    for line, row in _rows(path, ("AccessionNo", "report_text") + ABNORMALITY_LABELS):
        try:
            labels = {name: int(float(row[name])) for name in ABNORMALITY_LABELS}
        except ValueError as err:
            raise InputError(f"{path}, line {line}: abnormality labels must be 0/1 ({err}).") from err
        yield LabeledReport(row["AccessionNo"].strip(), row["report_text"].strip(), labels)


def read_accession_map(path: str | os.PathLike) -> dict[str, str | None]:
    """``AccessionNo`` → CT-RATE scan name (``train_17051_a``), ``None`` where "not in CT-RATE"."""
    mapping: dict[str, str | None] = {}
    for _, row in _rows(path, ("AccessionNo", "NameinCTRATE")):
        name = row["NameinCTRATE"].strip()
        mapping[row["AccessionNo"].strip()] = None if name == "not in CT-RATE" else name
    return mapping


@dataclass(frozen=True)
class ScanMetadata:
    """The fields of CT-RATE's metadata CSV the pipeline needs (spacing in mm, i/j then k)."""

    volume_name: str
    rescale_slope: float
    rescale_intercept: float
    xy_spacing: tuple[float, float]
    z_spacing: float
    manufacturer: str = ""
    rows: int | None = None
    columns: int | None = None
    number_of_slices: int | None = None


def _float(value: str, path: str | os.PathLike, line: int, column: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise InputError(f"{path}, line {line}: column {column} must be a number, got {value!r}.") from err


def _optional_int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except ValueError:
        return None


def iter_metadata(path: str | os.PathLike) -> Iterator[ScanMetadata]:
    """Stream CT-RATE's metadata CSV; ``XYSpacing`` strings such as ``"[0.75, 0.75]"`` are parsed."""
    for line, row in _rows(path, METADATA_COLUMNS):
        try:
            xy = json.loads(row["XYSpacing"])
            xy_spacing = (float(xy[0]), float(xy[1]))
        except (ValueError, TypeError, IndexError, json.JSONDecodeError) as err:
            raise InputError(
                f"{path}, line {line}: XYSpacing must look like '[0.75, 0.75]', got {row['XYSpacing']!r}."
            ) from err
        yield ScanMetadata(
            volume_name=row["VolumeName"].strip(),
            rescale_slope=_float(row["RescaleSlope"], path, line, "RescaleSlope"),
            rescale_intercept=_float(row["RescaleIntercept"], path, line, "RescaleIntercept"),
            xy_spacing=xy_spacing,
            z_spacing=_float(row["ZSpacing"], path, line, "ZSpacing"),
            manufacturer=row.get("Manufacturer", "").strip(),
            rows=_optional_int(row.get("Rows")),
            columns=_optional_int(row.get("Columns")),
            number_of_slices=_optional_int(row.get("NumberofSlices")),
        )


def load_metadata(path: str | os.PathLike) -> dict[str, ScanMetadata]:
    """All metadata rows keyed by ``VolumeName`` (a few MB for the full CT-RATE; text only)."""
    return {m.volume_name: m for m in iter_metadata(path)}


# ---------------------------------------------------------------- VQA (CT-CHAT format)

KIND_TAGS = {
    "<short_answer>": "short",
    "<short_answe>": "short",  # CT-CHAT's llava/constants.py spells it so
    "<long_answer>": "long",
    "<multiple_choice>": "choice",
    "<report_generation>": "report",
}
KIND_TYPES = {
    "free_response": "long",
    "description": "long",
    "conversation": "long",
    "multiple_choice": "choice",
    "report_generation": "report",
}


@dataclass(frozen=True)
class VQATurn:
    """One question/answer exchange; ``kind`` is ``short``, ``long``, ``choice`` or ``report``."""

    question: str
    answer: str
    kind: str


@dataclass(frozen=True)
class VQASample:
    """One CT-CHAT record: the volume file name and its conversation turns."""

    id: str
    image: str
    turns: tuple[VQATurn, ...]


def _turn_kind(question: str, declared_type: str | None) -> tuple[str, str]:
    """Strip the task tag and ``<image>`` from a question; the kind comes from the tag, else the ``type`` field."""
    kind = None
    for tag, tag_kind in KIND_TAGS.items():
        if tag in question:
            kind = kind or tag_kind
            question = question.replace(tag, "")
    if kind is None:
        kind = KIND_TYPES.get(declared_type or "", "short")
    return question.replace("<image>", "").strip(), kind


def _parse_vqa_record(record: object, where: str) -> VQASample:
    if not isinstance(record, dict) or "image" not in record or "conversations" not in record:
        raise InputError(f"{where}: a VQA record needs 'image' and 'conversations'.")
    messages = record["conversations"]
    if not isinstance(messages, list) or len(messages) % 2:
        raise InputError(f"{where}: 'conversations' must be a list of human/gpt pairs.")
    turns = []
    for n in range(0, len(messages), 2):
        human, gpt = messages[n], messages[n + 1]
        if not isinstance(human, dict) or not isinstance(gpt, dict):
            raise InputError(f"{where}: messages {n} and {n + 1} must be objects with 'from' and 'value'.")
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise InputError(f"{where}: message {n} must come 'from' human and message {n + 1} from gpt.")
        question, kind = _turn_kind(str(human.get("value", "")), human.get("type"))
        turns.append(VQATurn(question, str(gpt.get("value", "")).strip(), kind))
    return VQASample(str(record.get("id", "")), str(record["image"]), tuple(turns))


def iter_vqa(path: str | os.PathLike) -> Iterator[VQASample]:
    """Read a CT-CHAT VQA JSON file (a list of records) and yield parsed samples.

    Raises:
        InputError: the file is missing, not JSON, or a record does not follow the CT-CHAT schema
            (the message names the record index).
    """
    path = Path(path)
    records = read_json(path, "VQA")
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of VQA records.")
    for index, record in enumerate(records):
        yield _parse_vqa_record(record, f"{path}, record {index}")


# ---------------------------------------------------------------- volumes


def volume_path(root: str | os.PathLike, volume_name: str, *, fixed: bool = True) -> Path:
    """Where CT-RATE keeps a volume: ``root/<split>[_fixed]/<split>_<p>/<split>_<p>_<s>/<name>.nii.gz``.

    Args:
        root: the ``dataset`` folder of a CT-RATE download.
        volume_name: e.g. ``valid_53_a_1`` (with or without ``.nii.gz``).
        fixed: look in the v2 ``*_fixed`` folders (already HU) rather than the v1 ones.
    """
    match = VOLUME_NAME.match(volume_name)
    if not match:
        raise InputError(f"{volume_name!r} is not a CT-RATE volume name like 'train_12_a_1'.")
    split, patient, scan = match["split"], match["patient"], match["scan"]
    stem = f"{split}_{patient}_{scan}_{match['recon']}"
    folder = f"{split}_fixed" if fixed else split
    return Path(root) / folder / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / f"{stem}.nii.gz"


def is_fixed_volume(path: str | os.PathLike) -> bool:
    """Whether a file belongs to CT-RATE v2 (a ``*_fixed`` folder or name), whose values are already HU."""
    return any(part.endswith("_fixed") or "_fixed." in part for part in Path(path).parts)


def load_ctrate_volume(path: str | os.PathLike, metadata: ScanMetadata | None = None) -> Volume:
    """Read a CT-RATE volume in HU.

    v2 (``*_fixed``) volumes are returned as stored: their values are already HU and their headers
    correct, so ``metadata`` is not applied to them. v1 volumes need ``metadata``: values become
    ``slope · x + intercept`` and the voxel spacing is taken from ``XYSpacing``/``ZSpacing``.

    Raises:
        InputError: a v1 volume without metadata, or metadata of another volume.
    """
    volume = read_volume(path)
    if is_fixed_volume(path):
        volume.metadata["hu_rescale"] = "none (CT-RATE v2 volumes are already HU)"
        return volume
    if metadata is None:
        raise InputError(
            f"{path}: a CT-RATE v1 volume needs its metadata row (RescaleSlope/Intercept, spacing); "
            "pass metadata=, or use the v2 *_fixed volumes, which are already HU."
        )
    name = Path(path).name.split(".")[0]
    if metadata.volume_name.split(".")[0] != name:
        raise InputError(f"{path}: metadata row is for {metadata.volume_name!r}, not {name!r}.")
    hu = volume.array.astype(np.float32) * metadata.rescale_slope + metadata.rescale_intercept
    affine = volume.ijk_to_ras.copy()
    spacing = np.array([metadata.xy_spacing[0], metadata.xy_spacing[1], metadata.z_spacing])
    affine[:3, :3] = affine[:3, :3] / volume.spacing * spacing
    volume = Volume(hu, affine, dict(volume.metadata))
    volume.metadata["hu_rescale"] = f"{metadata.rescale_slope} * x + {metadata.rescale_intercept} (v1 metadata)"
    return volume


def _load_for_cache(path: Path, metadata: ScanMetadata | None) -> tuple[Volume, None]:
    return load_ctrate_volume(path, metadata), None


def cache_items(root: str | os.PathLike, reports: str | os.PathLike, *, fixed: bool = True,
                metadata: dict[str, ScanMetadata] | None = None) -> list:  # fmt: skip
    """Cache items for the volumes named in a reports CSV (v2 ``*_fixed`` by default; v1 needs ``metadata``).

    Raises:
        InputError: a listed volume file does not exist (named), before anything is converted.
    """
    from functools import partial

    from .cache import CacheItem

    items = []
    for report in iter_reports(reports):
        name = report.volume_name.split(".")[0]
        path = volume_path(root, name, fixed=fixed)
        if not path.is_file():
            raise InputError(f"{path}: volume {name!r} listed in {reports} is missing.")
        items.append(CacheItem(name, partial(_load_for_cache, path, (metadata or {}).get(name))))
    return items
