"""Evaluation end to end on fixture datasets in the real CT-RATE and M3D-Seg layouts (built from
../shared/data) with the tiny preset: every runner writes predictions, metrics, tables and plots; a killed run
resumes without losing or repeating a case; two accelerate processes give the metrics of one; the seeded
prompt protocol reproduces interactive Dice; bad input is refused with a message."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from eval_fixtures import SEG_STRUCTURES, build_ctrate, build_m3dseg
from PIL import Image

from MedVLSAM2Lib.engine import InferenceEngine
from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.evaluation.evaluate import EvaluationSettings, evaluate
from MedVLSAM2Lib.evaluation.seg_metrics import score_mask
from MedVLSAM2Lib.evaluation.tasks import Shard

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

SEG_ARGS = ("--datasets", "0011", "--forced-answer", "--device", "cpu")
SEG_CASES = 2 * len(SEG_STRUCTURES) * 4  # cases × structures × modes


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-data")
    return {"ctrate": build_ctrate(root / "ctrate", data_dir), "m3d": build_m3dseg(root / "m3d", data_dir)}


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    return InferenceEngine.load("tiny")


@pytest.fixture(scope="module")
def seg_run(datasets, engine, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("seg-run")
    settings = EvaluationSettings(datasets=["0011"], forced_answer=True, seed=3)
    return out, evaluate("seg", "tiny", datasets["m3d"], out, settings, engine=engine, shard=Shard())


def _records(out: Path) -> list[dict]:
    lines = [line for part in sorted((out / "predictions").glob("part-*.jsonl")) for line in part.open()]
    return [json.loads(line) for line in lines if '"id"' in line]


def _assert_same_scores(found: dict, expected: dict) -> None:
    assert found["overall"].keys() == expected["overall"].keys()
    for mode, summary in expected["overall"].items():
        for key in ("dice", "soft_dice", "surface_dice", "cases", "empty_truth_cases"):
            assert found["overall"][mode][key] == pytest.approx(summary[key], abs=1e-6), (mode, key)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "MedVLSAM2Lib.cli", *args]


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def test_segmentation_runner_scores_every_case_and_counts_empty_truth(seg_run, datasets):
    out, metrics = seg_run
    records = _records(out)
    assert len(records) == len({r["id"] for r in records}) == SEG_CASES == metrics["cases"]
    empty = [r for r in records if r.get("empty_truth")]
    # the bladder is absent from the upper-abdomen case: one empty case per mode, never scored as Dice 1
    assert {r["structure"] for r in empty} == {"urinary bladder"} and len(empty) == 4
    assert all(r["dice"] is None for r in empty)
    for mode in ("semantic", "referring", "box", "points"):
        summary = metrics["overall"][mode]
        scored = [r for r in records if r["mode"] == mode and not r.get("empty_truth")]
        assert summary["cases"] == len(scored) == 7 and summary["empty_truth_cases"] == 1
        assert summary["dice"] == pytest.approx(np.mean([r["dice"] for r in scored]), abs=1e-12)
        assert all(0.0 <= r["dice"] <= 1.0 and r["masks"] == 1 for r in scored)
    referring = [r for r in records if r["mode"] == "referring" and "prompt" in r]
    assert all(r["prompt"]["description"] in r["prompt"]["text"] for r in referring)
    boxes = [r["prompt"]["boxes"][0] for r in records if r["mode"] == "box" and "prompt" in r]
    assert all(b[2] == b[5] for b in boxes)  # one slice thick
    table = (out / "tables.md").read_text()
    assert "Table 4" in table and "Table 5" in table and "TotalSegmentator (0011)" in table
    assert f"| {metrics['by_mode']['0011']['box']['dice']:.4f} |" in table
    rows = (out / "tables.csv").read_text().splitlines()
    assert rows[0] == "table,row,column,value" and len(rows) == 1 + 2 * (6 + 2)
    for name in ("dice_by_prompt.png", "dice_per_structure_0011.png", "overlays.png"):
        width, height = _png(out / "plots" / name)
        assert width > 300 and height > 200


def test_recorded_dice_is_the_dice_of_the_engine_mask(seg_run, datasets, engine):
    """Recompute one box case by hand: the seeded prompt in the record gives the same mask and Dice."""
    from MedVLSAM2Lib.data.m3dseg import M3DSegDataset
    from MedVLSAM2Lib.prompts import BoxPrompt

    out, _ = seg_run
    record = next(r for r in _records(out) if r["id"] == "0011/case_full/liver/box")
    case = next(c for c in M3DSegDataset(datasets["m3d"], "0011").cases("test") if c.name == "case_full")
    volume, truth = case.to_volume(), case.mask("liver").transpose(2, 1, 0)
    box, text = record["prompt"]["boxes"][0], record["prompt"]["text"]  # Table 5: the referring text plus the box
    assert record["prompt"]["text_kind"] == "referring" and record["prompt"]["description"] in text
    result = engine.segment(engine.encode(volume, intensity="normalized"), text, (),
                            [BoxPrompt(box[:3], box[3:])], answer="It is [SEG].", probabilities=True)  # fmt: skip
    # hard Dice on the engine's own mask (thresholded in float32), soft Dice on the float16 probabilities it keeps
    (obj,) = result.objects
    scores = score_mask(obj.probabilities.astype(np.float32), truth, volume.spacing[::-1], mask=obj.mask)
    assert record["dice"] == pytest.approx(scores.dice, abs=1e-9) and record["soft_dice"] == scores.soft_dice
    assert record["truth_voxels"] == int(truth.sum())


def test_same_seed_same_dice_other_seed_other_prompts(seg_run, datasets, engine, tmp_path):
    out, metrics = seg_run
    settings = EvaluationSettings(datasets=["0011"], forced_answer=True, seed=3, modes=["box", "points"],
                                  structures=["liver", "spleen"])  # fmt: skip
    again = evaluate("seg", "tiny", datasets["m3d"], tmp_path / "again", settings, engine=engine, shard=Shard())
    first = {r["id"]: r for r in _records(out)}
    for record in _records(tmp_path / "again"):
        assert record["prompt"] == first[record["id"]]["prompt"]
        assert record["dice"] == pytest.approx(first[record["id"]]["dice"], abs=1e-9)
    assert again["cases"] == 2 * 2 * 2
    settings.seed = 4
    evaluate("seg", "tiny", datasets["m3d"], tmp_path / "other", settings, engine=engine, shard=Shard())
    other = {r["id"]: r["prompt"] for r in _records(tmp_path / "other")}
    assert sum(other[i] != first[i]["prompt"] for i in other) >= len(other) - 1


def test_killed_run_resumes_without_losing_or_repeating_a_case(seg_run, datasets, tmp_path):
    out, metrics = seg_run
    target = tmp_path / "killed"
    command = _cli("evaluate", "seg", "--preset", "tiny", "--data", str(datasets["m3d"]), "--out", str(target),
                   "--seed", "3", *SEG_ARGS)  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = target / "predictions" / "part-000.jsonl"
    deadline = time.monotonic() + 240
    while not (part.is_file() and part.read_text().count("\n") >= 6):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = len(_records(target))
    assert 5 <= before < SEG_CASES and not (target / "metrics.json").exists()
    with part.open("a") as handle:
        handle.write('{"id": "0011/case_full/liver/se')  # a line cut off by the kill
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = _records(target)
    assert len(records) == len({r["id"] for r in records}) == SEG_CASES
    _assert_same_scores(json.loads((target / "metrics.json").read_text()), metrics)
    assert "Table 4" in result.stdout


def test_two_processes_give_the_metrics_of_one(seg_run, datasets, tmp_path):
    out, metrics = seg_run
    target = tmp_path / "sharded"
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--module",
               "MedVLSAM2Lib.cli", "evaluate", "seg", "--preset", "tiny", "--data", str(datasets["m3d"]),
               "--out", str(target), "--seed", "3", *SEG_ARGS]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = sorted((target / "predictions").glob("part-*.jsonl"))
    assert [p.name for p in parts] == ["part-000.jsonl", "part-001.jsonl"]
    counts = [sum(1 for line in p.open()) - 1 for p in parts]
    assert counts == [SEG_CASES // 2, SEG_CASES // 2]
    _assert_same_scores(json.loads((target / "metrics.json").read_text()), metrics)


def test_report_and_vqa_runners_write_metrics_tables_and_plots(datasets, engine, tmp_path):
    report = evaluate("report", "tiny", datasets["ctrate"], tmp_path / "report", engine=engine, shard=Shard())
    assert report["cases"] == 2 and report["corpus"]["protocol"] == "corpus"
    assert report["sample"]["protocol"] == "sample" and 0 <= report["corpus"]["BLEU-1"] <= 1
    assert report["bertscore"]["model"].startswith("all-MiniLM-L6-v2") and -1 <= report["bertscore"]["F1"] <= 1
    records = _records(tmp_path / "report")
    assert all(r["reference"].startswith("Findings: ") and r["tokens"] >= 1 for r in records)
    assert "Table 2" in (tmp_path / "report" / "tables.md").read_text()
    quoted = {"source": "a fixture", "tables": {"3": [{"method": "Baseline", "values": {"BLEU-1": 0.25}},
                                                      {"method": "Guess", "values": {"accuracy": 0.5}}]}}  # fmt: skip
    (tmp_path / "quoted.json").write_text(json.dumps(quoted))
    settings = EvaluationSettings(bertscore_model="none", compare=str(tmp_path / "quoted.json"))
    vqa = evaluate("vqa", "tiny", datasets["ctrate"], tmp_path / "vqa", settings, engine=engine, shard=Shard())
    assert vqa["short"]["cases"] == vqa["long"]["cases"] == vqa["choice"]["cases"] == 2
    assert vqa["short"]["bertscore"] == {"skipped": "--bertscore-model none"}
    choice = [r for r in _records(tmp_path / "vqa") if r["kind"] == "choice"]
    assert [r["truth"] for r in choice] == ["A", "A"]
    right = sum(r["choice"] == "A" for r in choice)
    assert vqa["choice"]["accuracy"] == right / 2
    long_turns = [r for r in _records(tmp_path / "vqa") if r["kind"] == "long"]
    assert all("Where is" in r["question"] and "<long_answer>" not in r["question"] for r in long_turns)
    tables = (tmp_path / "vqa" / "tables.md").read_text()
    assert "long answers, corpus (CT-CHAT)" in tables and "Multiple-choice" in tables
    # each quoted row lands once, in the table that has its column, marked as quoted
    assert tables.count("Baseline (quoted from a fixture) | 0.2500 |") == 1
    assert tables.count("Guess (quoted from a fixture) | 0.5000 |") == 1
    rows = list(csv.reader((tmp_path / "vqa" / "tables.csv").open()))
    assert ["3", "Baseline (quoted from a fixture)", "BLEU-1", "0.25"] in rows
    assert _png(tmp_path / "vqa" / "plots" / "text_scores.png")[0] > 300


def test_bad_input_is_refused_with_a_message(seg_run, datasets, engine, tmp_path):
    out, _ = seg_run
    with pytest.raises(InputError, match=r"validation_reports\.csv: no CT-RATE validation reports CSV"):
        evaluate("report", "tiny", tmp_path, tmp_path / "o", engine=engine, shard=Shard())
    (tmp_path / "rows.json").write_text('{"tables": {"2": [{"values": {"BLEU-1": 0.1}}]}}')
    settings = EvaluationSettings(compare=str(tmp_path / "rows.json"))
    with pytest.raises(InputError, match=r"rows\.json: expected \{'source'"):
        evaluate("seg", "tiny", datasets["m3d"], tmp_path / "o", settings, engine=engine, shard=Shard())
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match=r"0012\.json: no dataset JSON"):
        evaluate("seg", "tiny", datasets["m3d"], tmp_path / "o", engine=engine, shard=Shard())
    # predictions of another checkpoint (or other settings) in the output folder are never mixed in
    settings = EvaluationSettings(datasets=["0011"], forced_answer=True, seed=3)
    with pytest.raises(InputError, match=r"part-000\.jsonl: written for another run \(differs in \['model'\]"):
        evaluate("seg", "small", datasets["m3d"], out, settings, engine=engine, shard=Shard())
    settings.seed = 5
    with pytest.raises(InputError, match=r"differs in \['settings'\]"):
        evaluate("seg", "tiny", datasets["m3d"], out, settings, engine=engine, shard=Shard())
    result = subprocess.run(_cli("evaluate", "seg", "--preset", "tiny", "--data", str(tmp_path / "none"), "--out",
                                 str(tmp_path / "o")), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("none: no such data folder.")
