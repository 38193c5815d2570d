"""CT-RATE readers on the real text files, plus CT-RATE-layout fixtures built from real rows and a real CT."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest

from MedVLSAM2Lib.data.ctrate import (
    ABNORMALITY_LABELS,
    REPORT_COLUMNS,
    ScanMetadata,
    is_fixed_volume,
    iter_labeled_reports,
    iter_metadata,
    iter_reports,
    iter_vqa,
    load_ctrate_volume,
    load_metadata,
    read_accession_map,
    volume_path,
)
from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.volume import Volume, read_volume, write_volume

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def ct_rate(data_dir):
    return data_dir / "ct_rate"


def test_labeled_reports_parse_with_18_binary_labels(ct_rate):
    reports = list(iter_labeled_reports(ct_rate / "ctclip_text_classifier" / "train.csv"))
    assert len(reports) == 800
    assert reports[0].accession == "train_1" and reports[0].text.startswith("Trachea, both main bronchi are open.")
    assert all(set(r.labels) == set(ABNORMALITY_LABELS) and set(r.labels.values()) <= {0, 1} for r in reports)
    assert 0 < sum(r.labels["Lung nodule"] for r in reports) < 800


def test_accession_map_links_547_of_800_reports_to_ct_rate(ct_rate):
    mapping = read_accession_map(ct_rate / "ctclip_text_classifier" / "map_train_classifier.csv")
    assert len(mapping) == 800 and sum(v is not None for v in mapping.values()) == 547
    assert mapping["train_1"] == "train_17051_a" and mapping["train_2"] is None


def test_validation_metadata_parses_spacing_and_rescale(ct_rate):
    rows = list(iter_metadata(ct_rate / "ctchat_validation_metadata.csv"))
    assert len(rows) == 3039
    assert {r.rescale_slope for r in rows} == {1.0}
    intercepts = [r.rescale_intercept for r in rows]
    assert set(intercepts) == {-1024.0, -8192.0} and intercepts.count(-8192.0) == 850
    assert all(0.75 <= r.z_spacing <= 5.0 and len(r.xy_spacing) == 2 and r.xy_spacing[0] > 0 for r in rows)
    assert {r.rows for r in rows} <= {512, 768, 1024}
    by_name = load_metadata(ct_rate / "ctchat_validation_metadata.csv")
    assert by_name[rows[0].volume_name] == rows[0]


def test_reports_csv_in_the_official_layout_streams(ct_rate, tmp_path):
    source = itertools.islice(iter_labeled_reports(ct_rate / "ctclip_text_classifier" / "val.csv"), 5)
    path = tmp_path / "validation_reports.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(REPORT_COLUMNS)
        for n, report in enumerate(source):
            writer.writerow(
                [f"valid_{n + 1}_a_1.nii.gz", "Not given.", "Non-contrast chest CT.", report.text, "Not given."]
            )
    reports = list(iter_reports(path))
    assert [r.volume_name for r in reports][:2] == ["valid_1_a_1.nii.gz", "valid_2_a_1.nii.gz"]
    assert reports[0].clinical_information == "" and reports[0].technique == "Non-contrast chest CT."
    assert reports[0].text.startswith("Findings: ") and " Impression: " in reports[0].text


def test_short_rows_and_non_utf8_files_are_named(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("VolumeName,RescaleSlope,RescaleIntercept,XYSpacing,ZSpacing\nvalid_1_a_1,1,-1024\n")
    with pytest.raises(InputError, match=r"meta\.csv, line 2: the row ends before column\(s\) \['XYSpacing'"):
        list(iter_metadata(path))
    path.write_bytes("VolumeName,Findings_EN\nvalid_1_a_1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        list(iter_reports(path))


def test_csv_missing_a_column_names_it(tmp_path):
    path = tmp_path / "reports.csv"
    path.write_text("VolumeName,Findings_EN\nvalid_1_a_1,x\n")
    with pytest.raises(InputError, match=r"reports\.csv: missing column\(s\) \['ClinicalInformation_EN'"):
        list(iter_reports(path))


def _ctchat_fixture(ct_rate, tmp_path):
    """A CT-CHAT-format VQA file built from real RadGenome short answers and a real CT-RATE report."""
    rows = list(csv.DictReader((ct_rate / "radgenome_chestct_subset" / "train_vqa_presence_20vols.csv").open()))[:3]
    report = next(iter_labeled_reports(ct_rate / "ctclip_text_classifier" / "train.csv")).text
    records = [
        {
            "id": f"short_answer_{n}",
            "image": row["Volumename"],
            "conversations": [
                {
                    "from": "human",
                    "value": f"<image>\nIs there {row['Finding'].split(',')[0]} "
                    f"in the {row['Anatomy'].split('/')[-1]}? <short_answer>",
                },
                {"from": "gpt", "value": row["Presence"]},
            ],
        }
        for n, row in enumerate(rows)
    ]
    records.append(
        {
            "id": "report_generation_0",
            "image": "train_17051_a_1.nii.gz",
            "conversations": [
                {
                    "from": "human",
                    "value": "<image>\nGenerate the report. <report_generation>",
                    "type": "report_generation",
                },
                {"from": "gpt", "value": report},
                {"from": "human", "value": "Which finding is present? (a) effusion (b) none <multiple_choice>"},
                {"from": "gpt", "value": "(b) none"},
                {"from": "human", "value": "Describe the heart.", "type": "conversation"},
                {"from": "gpt", "value": "The heart is of normal size."},
            ],
        }
    )
    path = tmp_path / "valid_vqa.json"
    path.write_text(json.dumps(records))
    return path, rows


def test_ctchat_vqa_records_parse_with_answer_kinds(ct_rate, tmp_path):
    path, rows = _ctchat_fixture(ct_rate, tmp_path)
    samples = list(iter_vqa(path))
    assert len(samples) == 4 and samples[0].image == rows[0]["Volumename"]
    assert samples[0].turns[0].kind == "short" and samples[0].turns[0].answer == rows[0]["Presence"]
    assert "<image>" not in samples[0].turns[0].question and "<short_answer>" not in samples[0].turns[0].question
    assert [t.kind for t in samples[3].turns] == ["report", "choice", "long"]


def test_malformed_vqa_record_is_named(tmp_path):
    path = tmp_path / "vqa.json"
    path.write_text(
        json.dumps(
            [{"image": "a.nii.gz", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}]
        )
    )
    with pytest.raises(InputError, match=r"vqa\.json, record 0: message 0 must come 'from' human"):
        list(iter_vqa(path))


def test_volume_path_follows_the_ct_rate_folder_layout(tmp_path):
    assert (
        volume_path(tmp_path, "valid_53_a_1.nii.gz") == tmp_path / "valid_fixed/valid_53/valid_53_a/valid_53_a_1.nii.gz"
    )
    assert volume_path(tmp_path, "train_7_b_2", fixed=False) == tmp_path / "train/train_7/train_7_b/train_7_b_2.nii.gz"
    with pytest.raises(InputError, match="not a CT-RATE volume name"):
        volume_path(tmp_path, "patient7.nii.gz")


def test_fixed_volumes_are_never_rescaled_again_and_v1_volumes_are(subject_a, tmp_path):
    hu = read_volume(subject_a / "example_ct_sm.nii.gz")
    meta = ScanMetadata("valid_1_a_1", 1.0, -1024.0, (3.0, 3.0), 3.0)
    fixed_path = write_volume(hu, volume_path(tmp_path, "valid_1_a_1", fixed=True))
    stored = Volume((hu.array.astype(np.int32) + 1024).astype(np.int16), np.diag([-1.0, -1.0, 1.0, 1.0]))
    v1_path = write_volume(stored, volume_path(tmp_path, "valid_1_a_1", fixed=False))
    assert is_fixed_volume(fixed_path) and not is_fixed_volume(v1_path)

    fixed = load_ctrate_volume(fixed_path, meta)  # metadata given, and still not applied
    np.testing.assert_array_equal(fixed.array, hu.array)
    v1 = load_ctrate_volume(v1_path, meta)
    np.testing.assert_array_equal(v1.array, hu.array.astype(np.float32))
    np.testing.assert_allclose(v1.spacing, [3.0, 3.0, 3.0])
    with pytest.raises(InputError, match="v1 volume needs its metadata row"):
        load_ctrate_volume(v1_path)
    with pytest.raises(InputError, match="metadata row is for 'valid_2_a_1'"):
        load_ctrate_volume(v1_path, ScanMetadata("valid_2_a_1", 1.0, -1024.0, (3.0, 3.0), 3.0))
