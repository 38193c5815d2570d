"""Training on accelerate with the tiny preset and real CTs: config errors, exact resume after SIGKILL,
a two-process gloo run mixing segmentation and text batches across ranks."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from corpus import ORGANS, load_pair, prepare_text_cache

from MedVLSAM2Lib.data.cache import CacheItem, prepare
from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.model.weights import load_checkpoint
from MedVLSAM2Lib.preprocess import GridConfig
from MedVLSAM2Lib.training.config import TrainConfig, load_train_config
from MedVLSAM2Lib.training.trainer import latest_checkpoint, train

pytestmark = [pytest.mark.realdata, pytest.mark.slow]
LOSSES = ("loss", "text_loss", "bce_loss", "dice_loss", "object_loss")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, data_dir, subject_a, total_labels):
    """Caches of real CTs (subject A with four organs; subject B's CT for report text) and a stage-3 config."""
    root = tmp_path_factory.mktemp("train")
    grid, window = GridConfig(spatial_size=(16, 64, 64)), (-160.0, 240.0)
    names = {n: total_labels[n] for n in ORGANS}
    seg = partial(load_pair, subject_a / "example_ct_sm.nii.gz", subject_a / "example_seg.nii.gz", names)
    prepare([CacheItem("subjectA_sm", seg)], root / "seg", grid, window)
    prepare_text_cache(root, data_dir, grid, window)
    config = {
        "stage": 3, "preset": "tiny", "text_cache": str(root / "text"), "seg_cache": str(root / "seg"),
        "reports_csv": str(root / "reports.csv"), "term_dictionary": str(data_dir / "m3d" / "term_dictionary.json"),
        "task_weights": {"report": 1, "semantic": 1, "referring": 1, "interactive": 1},
        "samples_per_epoch": 8, "epochs": 3, "lr": 0.001, "save_every": 2, "seed": 3,
    }  # fmt: skip
    (root / "stage3.yaml").write_text(json.dumps(config))  # JSON is YAML
    return root


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "MedVLSAM2Lib.cli", *args]


def _losses(run: Path) -> list[dict[str, float]]:
    with (run / "metrics.csv").open() as handle:
        return [{k: float(row[k]) for k in ("step", *LOSSES)} for row in csv.DictReader(handle)]


def _tensorboard_scalars(run: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_bad_configs_stop_before_any_work(workspace, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((workspace / "stage3.yaml").read_text().replace('"seed"', '"seeds"'))
    with pytest.raises(InputError, match=r"bad\.yaml: unknown key\(s\) \['seeds'\]"):
        load_train_config(path)
    path.write_text((workspace / "stage3.yaml").read_text().replace(str(workspace / "seg"), str(tmp_path / "nowhere")))
    with pytest.raises(InputError, match=r"seg_cache = .*nowhere does not exist"):
        load_train_config(path)
    path.write_text((workspace / "stage3.yaml").read_text().replace('"seed"', '"phrasings": -2, "seed"'))
    with pytest.raises(InputError, match="phrasings must be >= 0"):
        load_train_config(path)
    path.write_text((workspace / "stage3.yaml").read_text().replace('"seed"', '"point_share": 2, "seed"'))
    with pytest.raises(InputError, match=r"point_share must be in \[0, 1\], got 2"):
        load_train_config(path)


def test_resume_after_sigkill_continues_on_the_same_loss_curve(workspace, tmp_path):
    config = str(workspace / "stage3.yaml")
    straight = tmp_path / "straight"
    subprocess.run(_cli("train", "--config", config, "--max-steps", "6", "--output-dir", str(straight)),
                   check=True, cwd=tmp_path, capture_output=True)  # fmt: skip
    logged = _tensorboard_scalars(straight, "loss")
    assert logged == pytest.approx({int(r["step"]): r["loss"] for r in _losses(straight)}, rel=1e-6)
    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli("train", "--config", config, "--max-steps", "6", "--output-dir", str(killed)),
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "step-00000002" / "trainer_state.json").is_file():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "final").exists()
    # a kill in the middle of writing the next checkpoint leaves a partial folder, which resume ignores
    (killed / "checkpoints" / ".step-00000004.partial").mkdir(exist_ok=True)
    assert latest_checkpoint(killed).name in ("step-00000002", "step-00000004")
    subprocess.run(_cli("train", "--config", config, "--max-steps", "6", "--output-dir", str(killed), "--resume"),
                   check=True, cwd=tmp_path, capture_output=True)  # fmt: skip
    expected, resumed = _losses(straight), _losses(killed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, resumed, strict=True):
        for key in LOSSES:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    assert load_checkpoint(killed / "final").config.name == "tiny"


def test_two_process_gloo_run_mixes_text_and_segmentation_batches(workspace, tmp_path):
    run = tmp_path / "ddp"
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--module",
               "MedVLSAM2Lib.cli", "train", "--config", str(workspace / "stage3.yaml"), "--max-steps", "4",
               "--output-dir", str(run)]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    launch = json.loads((run / "launch.json").read_text())
    assert launch["processes"] == 2 and launch["distributed_type"] == "DistributedType.MULTI_CPU"
    rows = _losses(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # losses are averaged over the ranks: some steps combine a text-only rank with a segmentation rank
    assert any(0 < r["dice_loss"] for r in rows) and all(r["loss"] == r["loss"] for r in rows)
    assert (run / "final" / "model.safetensors").is_file()


def test_three_stages_chain_and_each_lowers_its_text_loss(workspace, tmp_path):
    settings = json.loads((workspace / "stage3.yaml").read_text())
    settings.update(samples_per_epoch=40, epochs=1, batch_size=2, save_every=1000, augmentation=False)
    tasks = {1: {"report": 1}, 2: {"report": 1}, 3: {"report": 0.3, "semantic": 1, "interactive": 0.3}}
    curves, previous = {}, None
    for stage in (1, 2, 3):
        output = tmp_path / f"stage{stage}"
        config = TrainConfig(**{**settings, "stage": stage, "task_weights": tasks[stage], "init_from": previous,
                                "output_dir": str(output)})  # fmt: skip
        previous = str(train(config).final_checkpoint)
        curves[stage] = _losses(output)
        assert [r["step"] for r in curves[stage]] == list(range(1, 21))

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    for stage in (1, 2):
        assert mean(curves[stage][-5:], "text_loss") < mean(curves[stage][:5], "text_loss") - 0.1
    # each stage starts where the previous one ended, not from random weights
    assert curves[2][0]["text_loss"] < curves[1][0]["text_loss"] - 0.2
    assert any(r["dice_loss"] > 0 for r in curves[3])
