"""`medvlsam2 demo` and `medvlsam2 doctor` end to end."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import slicerio
from PIL import Image

from MedVLSAM2Lib.cli import main
from MedVLSAM2Lib.segmentation import read_segmentation


def test_demo_writes_mask_segmentation_and_overlay(tmp_path, capsys):
    output = tmp_path / "demo-output"
    assert main(["demo", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "128x128x34 voxels" in printed and "right lung" in printed
    scores = [float(line.split()[-1]) for line in printed.splitlines() if "lung " in line and line.strip()[0].isalpha()]
    assert len(scores) == 2 and min(scores) > 0.95
    assert sorted(p.name for p in output.iterdir()) == [
        ".medvlsam2-demo",
        "mask_right_lung.nii.gz",
        "overlay_axial.png",
        "segmentation_roundtrip.seg.nrrd",
    ]
    mask = nib.load(str(output / "mask_right_lung.nii.gz"))
    assert mask.shape == (128, 128, 34) and set(np.unique(np.asarray(mask.dataobj))) == {0, 1}
    source = read_segmentation(slicerio.get_testdata_file("Segmentation.seg.nrrd"))
    assert read_segmentation(output / "segmentation_roundtrip.seg.nrrd").names() == source.names()
    assert Image.open(output / "overlay_axial.png").size == (1024, 512)
    assert main(["demo", "--output", str(output), "--seed", "1"]) == 0  # its own folder is replaced
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_demo_never_overwrites_a_foreign_folder(tmp_path, capsys):
    output = tmp_path / "results"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    assert main(["demo", "--output", str(output)]) == 2
    assert "was not written by the demo" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["precious.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["results"]


def test_demo_unknown_target_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "o"), "--target", "pancreas"]) == 2
    assert "No segment named 'pancreas'" in capsys.readouterr().err


def test_doctor_reports_versions_and_import_checks(capsys):
    assert main(["doctor"]) == 0
    printed = capsys.readouterr().out
    for name in ("torch", "sam2", "monai", "transformers", "import ok     SAM2 modeling", "doctor: all checks passed"):
        assert name in printed


def test_doctor_prints_the_paper_preset_parameter_table(capsys):
    assert main(["doctor", "--preset", "paper"]) == 0
    printed = capsys.readouterr().out
    assert "paper: 2048 visual tokens -> projector (512, 2048)" in printed
    rows = {line.split()[0]: float(line.split()[1].rstrip("M")) for line in printed.splitlines()
            if line.split() and line.split()[0] in ("vision", "projector", "language", "segmentation")}  # fmt: skip
    assert rows["vision"] == pytest.approx(87.39, abs=0.01)  # M3D-CLIP ViT-B
    assert rows["language"] == pytest.approx(3090.37, abs=0.1)  # Qwen2.5-3B, tied embeddings
    assert rows["segmentation"] == pytest.approx(224.43 + 4.72, abs=0.05)  # SAM2.1-L + [SEG] projector


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as info:
        main(["train-everything"])
    assert info.value.code == 2
