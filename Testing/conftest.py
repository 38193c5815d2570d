"""Shared fixtures: the real corpus in ../shared/data (DESIGN.md §5) and offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    """Stop before any test when ATEN_CPU_CAPABILITY forces kernels this CPU lacks (torch would die mid-run of an
    illegal instruction)."""
    from MedVLSAM2Lib.machine import unsupported_capability

    unsupported = unsupported_capability()
    if unsupported:
        pytest.exit(unsupported, returncode=4)


REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real test corpus; tests that need it skip (saying why) when the folder is absent."""
    if not (DATA / "README.md").is_file():
        message = f"real test corpus not found at {DATA} (CI provides ../shared/data beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must not pass without it")
        pytest.skip(message)
    return DATA


@pytest.fixture(scope="session")
def subject_a(data_dir: Path) -> Path:
    return data_dir / "totalsegmentator" / "subjectA_abdomen_pelvis_native"


@pytest.fixture(scope="session")
def total_labels(data_dir: Path) -> dict[str, int]:
    """TotalSegmentator v2 class name -> label id."""
    import json

    names = json.loads((data_dir / "totalsegmentator" / "labels_total_v2.json").read_text())
    return {name: int(label) for label, name in names.items()}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def paper_facts() -> dict:
    """The paper's published numbers and settings, ``../shared/paper/paper-facts.json`` (see its README)."""
    import json

    path = REPO.parent / "shared" / "paper" / "paper-facts.json"
    if not path.is_file():
        message = f"paper facts not found at {path} (CI provides ../shared/paper beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must not pass without it")
        pytest.skip(message)
    return json.loads(path.read_text())


@pytest.fixture
def answer_without_seg(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make every engine's generation answer "No." (no [SEG]) for this test; returns that answer."""
    from MedVLSAM2Lib.engine import InferenceEngine

    def no_seg(self, entry, question, *rest):  # noqa: ANN001, ANN002, ANN202
        return self.model.prompt_ids(question), self.model.tokenizer("No.", add_special_tokens=False)["input_ids"]

    monkeypatch.setattr(InferenceEngine, "_generate", no_seg)
    return "No."
