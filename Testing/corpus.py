"""Training caches built from the real corpus in ../shared/data (tests only)."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

from MedVLSAM2Lib.data.cache import CacheItem, prepare
from MedVLSAM2Lib.preprocess import GridConfig
from MedVLSAM2Lib.volume import read_volume

ORGANS = ("liver", "spleen", "kidney_left", "kidney_right")


def load_pair(ct_path: Path, labels_path: Path, names: dict[str, int]):  # noqa: ANN201
    """A CT and one boolean mask per named label value."""
    labels = read_volume(labels_path).array
    return read_volume(ct_path), {name: labels == value for name, value in names.items()}


def _ct_only(path: Path):  # noqa: ANN202
    return read_volume(path), None


def prepare_text_cache(root: Path, data_dir: Path, grid: GridConfig, window: tuple[float, float]) -> None:
    """``root/text``: subject B's CT standing in for CT-RATE volume ``valid_1_a_1``, with a real CT-RATE
    report in ``root/reports.csv`` (CT-RATE's column layout)."""
    ct_b = data_dir / "totalsegmentator" / "subjectB_chest_cta_aorta_crop" / "ct_cropped.nii.gz"
    prepare([CacheItem("valid_1_a_1", partial(_ct_only, ct_b))], root / "text", grid, window)
    report = next(csv.DictReader((data_dir / "ct_rate" / "ctclip_text_classifier" / "val.csv").open()))["report_text"]
    with (root / "reports.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"])
        writer.writerow(["valid_1_a_1.nii.gz", "Not given.", "Not given.", report, "Not given."])
