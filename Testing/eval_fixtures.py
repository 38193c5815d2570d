"""Evaluation datasets in the real on-disk layouts, built from ../shared/data (tests only).

* CT-RATE ``dataset`` folder: two v2 volumes (TotalSegmentator subjects A and B standing in for ``valid_1_a_1``
  and ``valid_2_a_1``), real CT-RATE report texts in ``validation_reports.csv``, and a CT-CHAT-format
  ``valid_vqa.json`` whose short answers and findings come from real RadGenome-ChestCT rows.
* ``M3D_Seg`` root with dataset ``0011``: two test cases made like M3D-Seg's (SegVol z-scores, sparse masks):
  subject A's upper abdomen (the shared M3D-layout demo case) and its whole CT with the force-split labels.
  The ``urinary bladder`` category is absent from the first case (its mask is empty there).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import scipy.sparse

from MedVLSAM2Lib.volume import read_volume

SEG_STRUCTURES = {"liver": 5, "spleen": 1, "kidney left": 3, "urinary bladder": 21}


def _reports(data_dir: Path, count: int) -> list[str]:
    with (data_dir / "ct_rate" / "ctclip_text_classifier" / "val.csv").open() as handle:
        rows = csv.DictReader(handle)
        return [next(rows)["report_text"] for _ in range(count)]


def _findings(data_dir: Path, count: int) -> list[tuple[str, str]]:
    path = data_dir / "ct_rate" / "radgenome_chestct_subset" / "train_vqa_presence_20vols.csv"
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    seen, found = set(), []
    for row in rows:
        finding = row["Finding"].split(",")[0].strip()
        if finding and finding not in seen:
            seen.add(finding)
            found.append((finding, row["Anatomy"].split("/")[-1]))
    return found[:count]


def build_ctrate(root: Path, data_dir: Path) -> Path:
    """A CT-RATE ``dataset`` folder with two validation volumes, their reports and a VQA JSON."""
    subjects = data_dir / "totalsegmentator"
    volumes = {"valid_1_a_1": subjects / "subjectA_abdomen_pelvis_native" / "example_ct_sm.nii.gz",
               "valid_2_a_1": subjects / "subjectB_chest_cta_aorta_crop" / "ct_cropped.nii.gz"}  # fmt: skip
    for name, source in volumes.items():
        patient = "_".join(name.split("_")[:2])
        target = root / "valid_fixed" / patient / f"{patient}_a" / f"{name}.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    reports = root / "radiology_text_reports" / "validation_reports.csv"
    reports.parent.mkdir(parents=True)
    with reports.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"])
        for name, text in zip(volumes, _reports(data_dir, 2), strict=True):
            findings, _, impression = text.partition("IMPRESSION")
            writer.writerow([f"{name}.nii.gz", "Not given.", "Not given.", findings.strip(), impression.strip(" :")])
    records = []
    for n, ((finding, anatomy), name) in enumerate(zip(_findings(data_dir, 2), volumes, strict=True)):
        conversation = [
            (f"<image>\nIs there {finding} in the {anatomy}? <short_answer>", "Yes."),
            (f"Where is the {finding}? <long_answer>", f"The {finding} is seen in the {anatomy}."),
            (f"Which finding is present? (a) {finding} (b) pneumothorax (c) rib fracture <multiple_choice>",
             f"(a) {finding}"),
        ]  # fmt: skip
        messages = [m for q, a in conversation for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        records.append({"id": f"vqa_{n}", "image": f"{name}.nii.gz", "conversations": messages})
    (root / "vqa").mkdir()
    (root / "vqa" / "valid_vqa.json").write_text(json.dumps(records, indent=1))
    return root


def _zscore(image: np.ndarray) -> np.ndarray:
    """SegVol's normalisation as M3D-Seg applied it: percentiles of voxels above the mean, then z-score."""
    foreground = image[image > image.mean()]
    low, high = np.percentile(foreground, [0.05, 99.95])
    clipped = np.clip(image, low, high)
    inside = clipped[clipped > clipped.mean()]
    return ((clipped - inside.mean()) / inside.std()).astype(np.float32)


def _write_case(folder: Path, image_xyz: np.ndarray, labels_xyz: np.ndarray) -> None:
    folder.mkdir(parents=True)
    np.save(folder / "image.npy", image_xyz[None])
    masks = np.stack([labels_xyz == value for value in SEG_STRUCTURES.values()]).astype(np.uint8)
    shape = ", ".join(str(s) for s in masks.shape)
    sparse = scipy.sparse.csr_matrix(masks.reshape(masks.shape[0], -1))
    scipy.sparse.save_npz(folder / f"mask_({shape}).npz", sparse)


def build_m3dseg(root: Path, data_dir: Path) -> Path:
    """``root/M3D_Seg/0011`` (two test cases) and ``root/term_dictionary.json`` (M3D's, copied); returns the
    ``M3D_Seg`` folder."""
    subject = data_dir / "totalsegmentator" / "subjectA_abdomen_pelvis_native"
    seg_root = root / "M3D_Seg"
    code = seg_root / "0011"
    pairs = {"case_sm": ("example_ct_sm.nii.gz", "example_seg.nii.gz"),
             "case_full": ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz")}  # fmt: skip
    entries = []
    for name, (ct, seg) in pairs.items():
        image = read_volume(subject / ct).array.transpose(2, 1, 0).astype(np.float32)  # KJI → XYZ as M3D stores
        labels = read_volume(subject / seg).array.transpose(2, 1, 0)
        _write_case(code / name, _zscore(image), labels)
        shape = f"{len(SEG_STRUCTURES)}, " + ", ".join(str(s) for s in image.shape)
        entries.append({"image": f"0011/{name}/image.npy", "label": f"0011/{name}/mask_({shape}).npz"})
    labels = {"0": "background", **{str(n + 1): s for n, s in enumerate(SEG_STRUCTURES)}}
    description = {"name": "TotalSegmentator (fixture)", "labels": labels, "numTrain": 0, "numTest": 2,
                   "train": [], "test": entries}  # fmt: skip
    (code / "0011.json").write_text(json.dumps(description, indent=1))
    shutil.copyfile(data_dir / "m3d" / "term_dictionary.json", root / "term_dictionary.json")
    return seg_root
