"""Prediction files: resume after a kill (a cut-off last line dropped), nothing duplicated or lost, another
checkpoint's file refused."""

from __future__ import annotations

import json

import pytest

from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.evaluation.predictions import PredictionLog, model_fingerprint

HEADER = {"task": "seg", "model": "preset:tiny", "settings": {"seed": 0}}


def test_a_reopened_log_skips_finished_cases_and_drops_a_cut_off_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    log = PredictionLog(path, HEADER)
    for n in range(3):
        log.append({"id": f"case{n}", "dice": n / 10})
    with path.open("a") as handle:
        handle.write('{"id": "case3", "di')  # killed while writing
    again = PredictionLog(path, HEADER)
    assert sorted(again.done) == ["case0", "case1", "case2"] and "case3" not in again
    again.append({"id": "case3", "dice": 0.3})
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1]) == {"id": "case3", "dice": 0.3}
    assert [r["id"] for r in PredictionLog(path, HEADER)] == ["case0", "case1", "case2", "case3"]


def test_another_checkpoint_or_setting_is_refused(tmp_path):
    path = tmp_path / "predictions.jsonl"
    PredictionLog(path, HEADER).append({"id": "a"})
    with pytest.raises(InputError, match=r"differs in \['model'\].*never mixed"):
        PredictionLog(path, {**HEADER, "model": "sha256:0123"})
    with pytest.raises(InputError, match=r"differs in \['settings'\]"):
        PredictionLog(path, {**HEADER, "settings": {"seed": 1}})


def test_fingerprints_name_presets_and_hash_checkpoints(tmp_path):
    assert model_fingerprint("tiny") == "preset:tiny"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="model.safetensors is missing"):
        model_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    first = model_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert first.startswith("sha256:") and model_fingerprint(tmp_path) != first
