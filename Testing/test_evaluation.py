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
from MedVLSAM2Lib.evaluation.tasks import NO_PROMPT_SKIPPED, Shard

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

SEG_ARGS = ("--datasets", "0011", "--forced-answer", "--device", "cpu")
SEG_CASES = 2 * len(SEG_STRUCTURES) * 4  # cases × structures × modes


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, data_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-data")
    return {"ctrate": build_ctrate(root / "ctrate", data_dir), "m3d": build_m3dseg(root / "m3d", data_dir)}


@pytest.fixture(scope="module")
def paper_facts(data_dir) -> Path:
    return data_dir.parent / "paper" / "paper-facts.json"


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
        for key in ("dice", "soft_dice", "surface_dice", "cases", "empty_truth_cases", "false_positive_cases"):
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
    # the bladder is absent from the upper-abdomen case: asked by name and by description it is run and scored
    # as a true negative or a false positive, never as Dice 1; no box or points can be drawn there (skipped)
    assert {(r["structure"], r["mode"]) for r in empty} == {("urinary bladder", "semantic"),
                                                            ("urinary bladder", "referring")}  # fmt: skip
    assert all(r["dice"] is None and r["false_positive"] == (r["predicted_voxels"] > 0) for r in empty)
    skipped = {r["id"]: r["skipped"] for r in records if "skipped" in r}
    assert set(skipped) == {"0011/case_sm/urinary bladder/box", "0011/case_sm/urinary bladder/points"}
    assert metrics["skipped"]["count"] == 2 and set(metrics["skipped"]["by_reason"]) == {NO_PROMPT_SKIPPED}
    for mode in ("semantic", "referring", "box", "points"):
        summary = metrics["overall"][mode]
        scored = [r for r in records if r["mode"] == mode and not r.get("empty_truth") and "skipped" not in r]
        assert summary["cases"] == len(scored) == 7
        assert summary["empty_truth_cases"] == (1 if mode in ("semantic", "referring") else 0)
        positives = [r["false_positive"] for r in empty if r["mode"] == mode]
        assert summary["false_positive_rate"] == (np.mean(positives) if positives else None)
        assert summary["dice"] == pytest.approx(np.mean([r["dice"] for r in scored]), abs=1e-12)
        assert all(0.0 <= r["dice"] <= 1.0 and r["masks"] == 1 for r in scored)
    referring = [r for r in records if r["mode"] == "referring" and "prompt" in r]
    assert all(r["prompt"]["description"] in r["prompt"]["text"] for r in referring)
    boxes = [r["prompt"]["boxes"][0] for r in records if r["mode"] == "box" and "prompt" in r]
    assert all(b[2] == b[5] for b in boxes)  # one slice thick
    table = (out / "tables.md").read_text()
    assert "Table 4" in table and "Table 5" in table and "| | TotalSegmentator |" in table
    assert f"| tiny (bbox prompt) | {100 * metrics['by_mode']['0011']['box']['dice']:.2f} |" in table
    assert "surface-Dice tolerance is 1 voxel" in table and "Skipped samples: 2" in table
    rows = (out / "tables.csv").read_text().splitlines()
    assert rows[0] == "table,row,column,value" and len(rows) == 1 + 2 + 4 + 4 * 8  # Tables 4, 5 and S1
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


def test_report_and_vqa_runners_write_metrics_tables_and_plots(datasets, engine, paper_facts, tmp_path):
    reports = datasets["ctrate"] / "radiology_text_reports" / "validation_reports.csv"
    with_empty = tmp_path / "reports.csv"
    with_empty.write_text(
        reports.read_text().rstrip("\n") + "\nvalid_9_a_1.nii.gz,Not given.,Not given.,Not given.,Not given.\n"
    )
    settings = EvaluationSettings(split_file=str(with_empty), compare=str(paper_facts))
    report = evaluate("report", "tiny", datasets["ctrate"], tmp_path / "report", settings, engine=engine, shard=Shard())
    assert report["cases"] == 2 and report["ctchat"]["protocol"] == "ctchat"
    assert report["m3d"]["protocol"] == "m3d" and 0 <= report["ctchat"]["BLEU-1"] <= 1
    assert report["skipped"]["samples"] == [{"id": "valid_9_a_1", "reason": "the report has neither findings nor an "
                                             "impression to score against"}]  # fmt: skip
    report_table = (tmp_path / "report" / "tables.md").read_text()
    assert f"| tiny (CT-CHAT protocol) | {100 * report['ctchat']['BLEU-1']:.2f} |" in report_table
    assert "| paper: CT-CHAT | 43.64 | 31.57 | 23.06 | 0.221 | 88.12 |" in report_table
    assert "no counterpart" not in report_table and "Skipped samples: 1" in report_table
    assert "layer 6" in report_table  # the BERTScore model and layer are named
    assert report["bertscore"]["model"].startswith("all-MiniLM-L6-v2") and -1 <= report["bertscore"]["F1"] <= 1
    records = _records(tmp_path / "report")
    assert all(r["reference"].startswith("Findings: ") and r["tokens"] >= 1 for r in records)
    settings = EvaluationSettings(bertscore_model="none", compare=str(paper_facts))
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
    assert tables.count("**Table 3.") == 1 and "| tiny (M3D protocol) |" in tables
    assert f"{100 * vqa['choice']['accuracy']:.2f} |" in tables.split("| tiny (CT-CHAT protocol) |")[1].split("\n")[0]
    # the paper's rows, on the paper's scale, in the table of their number
    assert "| paper: MedVL-SAM2 | 45.94 | 48.98 | 28.22 | 2.861 | 92.76 | 24.08 |" in tables
    rows = list(csv.reader((tmp_path / "vqa" / "tables.csv").open()))
    assert ["3", "paper: CT-CHAT", "multiple-choice accuracy", "83.73"] in rows
    assert _png(tmp_path / "vqa" / "plots" / "text_scores.png")[0] > 300


def test_bad_input_is_refused_with_a_message(seg_run, datasets, engine, tmp_path):
    out, _ = seg_run
    with pytest.raises(InputError, match=r"validation_reports\.csv: no CT-RATE validation reports CSV"):
        evaluate("report", "tiny", tmp_path, tmp_path / "o", engine=engine, shard=Shard())
    (tmp_path / "rows.json").write_text('{"tables": {"2": [{"values": {"BLEU-1": 0.1}}]}}')
    settings = EvaluationSettings(compare=str(tmp_path / "rows.json"))
    with pytest.raises(InputError, match=r"rows\.json: expected the paper's tables"):
        evaluate("seg", "tiny", datasets["m3d"], tmp_path / "o", settings, engine=engine, shard=Shard())
    assert not (tmp_path / "o").exists()
    wrong_split = EvaluationSettings(datasets=["0011"], split="validation")
    with pytest.raises(InputError, match=r"M3D-Seg has the splits \['train', 'test'\], not 'validation'"):
        evaluate("seg", "tiny", datasets["m3d"], tmp_path / "o", wrong_split, engine=engine, shard=Shard())
    with pytest.raises(InputError, match=r"CT-RATE has the splits \['train', 'validation'\], not 'test'"):
        evaluate("report", "tiny", datasets["ctrate"], tmp_path / "o", EvaluationSettings(split="test"), engine=engine,
                 shard=Shard())  # fmt: skip
    unknown = EvaluationSettings(datasets=["0011"], structures=["liver", "liver tumour"])
    with pytest.raises(InputError, match=r"--structures \['liver tumour'\] are categories of none of \['0011'\]"):
        evaluate("seg", "tiny", datasets["m3d"], tmp_path / "o", unknown, engine=engine, shard=Shard())
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
