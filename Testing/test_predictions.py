"""Prediction files: resume after a kill (a cut-off last line dropped), nothing duplicated or lost, another
checkpoint's or another setting's file refused (the term dictionary found among them)."""

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


def test_seg_header_records_the_term_dictionary_found_and_a_resume_without_it_is_refused(tmp_path):
    from MedVLSAM2Lib.evaluation.evaluate import EvaluationSettings, _terms_path

    data = tmp_path / "M3D_Seg"
    data.mkdir()
    settings = EvaluationSettings(modes=["box", "points"])
    assert _terms_path(data, None, settings.modes) is None  # box and point cases fall back to class names
    without = settings.header("seg", None)["settings"]
    assert without["terms"] is None and without["interactive_text"] == "semantic"
    (tmp_path / "term_dictionary.json").write_text("{}")
    found = _terms_path(data, None, settings.modes)
    assert found == (tmp_path / "term_dictionary.json").resolve()
    with_terms = settings.header("seg", found)
    assert with_terms["settings"] == {**without, "terms": str(found), "interactive_text": "referring"}
    path = tmp_path / "predictions.jsonl"
    PredictionLog(path, {**with_terms, "model": "preset:tiny"}).append({"id": "a"})
    with pytest.raises(InputError, match=r"differs in \['settings'\]"):
        PredictionLog(path, {**settings.header("seg", None), "model": "preset:tiny"})
