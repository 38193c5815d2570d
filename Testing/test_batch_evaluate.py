"""``MedVLSAM2/Scripts/batch_evaluate.py`` (installed with the extension) in plain Python on the slicer-core wheel:
the module Logic over an M3D-Seg-layout split and a folder of real CTs writes .seg.nrrd files, reports and a
metrics table; a rerun keeps what exists."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from eval_fixtures import build_m3dseg

from MedVLSAM2Lib.data.m3dseg import M3DSegDataset
from MedVLSAM2Lib.metrics import dice
from MedVLSAM2Lib.segmentation import read_segmentation

pytestmark = [pytest.mark.slicer, pytest.mark.realdata, pytest.mark.slow]

SCRIPT = [sys.executable, str(REPO / "MedVLSAM2" / "Scripts" / "batch_evaluate.py")]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SCRIPT, *args], capture_output=True, text=True, timeout=600)


def test_batch_over_an_m3dseg_split_writes_segments_and_true_dice(tmp_path, data_dir):
    root = build_m3dseg(tmp_path / "m3d", data_dir)
    out = tmp_path / "out"
    args = ["--m3dseg", str(root), "--datasets", "0011", "--structures", "liver,spleen", "--preset", "tiny",
            "--answer", "It is [SEG].", "--out", str(out)]  # fmt: skip
    result = _run(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {(r["case"], r["structure"]) for r in rows} == {(f"0011_{c}", s) for c in ("case_full", "case_sm")
                                                           for s in ("liver", "spleen")}  # fmt: skip
    cases = {f"0011_{case.name}": case for case in M3DSegDataset(root, "0011").cases("test")}
    for row in rows:
        case = cases[row["case"]]
        saved = read_segmentation(out / f"{row['case']}.seg.nrrd")
        segment = next(s for s in saved.segments if s.name == row["structure"])
        truth = case.mask(row["structure"]).transpose(2, 1, 0)
        assert segment.mask.shape == truth.shape and int(segment.mask.sum()) == int(row["voxels"])
        assert float(row["dice"]) == pytest.approx(dice(truth > 0, segment.mask > 0), abs=1e-6)
    assert "| liver | 2 |" in (out / "metrics.md").read_text()
    # a rerun keeps every written case and the table
    before = (out / "metrics.csv").read_text()
    again = _run(*args)
    assert again.returncode == 0 and again.stdout.count("done earlier, kept") == 2
    assert (out / "metrics.csv").read_text() == before


def test_batch_over_a_folder_writes_reports_and_names_failures(tmp_path, data_dir):
    folder = tmp_path / "cts"
    folder.mkdir()
    shutil.copy(data_dir / "totalsegmentator" / "subjectA_abdomen_pelvis_native" / "example_ct_sm.nii.gz", folder)
    (folder / "broken.nrrd").write_bytes(b"NRRD0004\nnot really\n")
    out = tmp_path / "out"
    result = _run("--folder", str(folder), "--structures", "liver", "--report", "--preset", "tiny",
                  "--answer", "It is [SEG].", "--out", str(out))  # fmt: skip
    assert result.returncode == 1 and "failed broken:" in result.stderr
    assert (out / "example_ct_sm.report.txt").read_text().strip()
    (segment,) = read_segmentation(out / "example_ct_sm.seg.nrrd").segments
    assert segment.name == "liver" and segment.mask.shape == (30, 101, 122)
    assert not list(out.glob("*partial*")) and not (out / "broken.seg.nrrd").exists()


def test_arguments_reach_the_script_as_slicer_hands_them_over(monkeypatch):
    """``Slicer --no-main-window --python-script batch_evaluate.py ARGS``: the script sees ``sys.argv[1:]`` = ARGS
    (with or without a leading ``--``), exactly what its ``__main__`` passes to ``main``."""
    sys.path.insert(0, str(REPO / "MedVLSAM2" / "Scripts"))
    import batch_evaluate

    readme = (REPO / "README.md").read_text()
    start = "Slicer --no-main-window --python-script MedVLSAM2/Scripts/batch_evaluate.py"
    command = readme.split(start, 1)[1].split("\n.venv")[0]
    args = command.replace("\\\n", " ").split()
    for argv in (["batch_evaluate.py", *args], ["batch_evaluate.py", "--", *args]):
        monkeypatch.setattr(sys, "argv", argv)
        parsed = batch_evaluate.parse(sys.argv[1:])
        assert (parsed.m3dseg, parsed.datasets, parsed.structures) == ("M3D-Seg/M3D_Seg", "0011", "liver,spleen")
        assert (parsed.weights, parsed.out) == ("DIR", "batch/")
