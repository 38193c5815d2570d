"""Learning is real: the tiny preset, trained through the three stages on the real corpus, lowers its text
loss and segments liver, spleen and both kidneys of its training CTs (Dice >= 0.7) within 10 CPU-minutes.

The recipe is the paper's stage plan at toy scale, with two documented departures that a randomly
initialised 128-wide LLM needs (see ``Training/README.md``): one phrasing of the segmentation
question/answer (``phrasings: 1``) and no flips (a flip swaps which kidney is on the left).
"""

from __future__ import annotations

import csv
import time
from functools import partial

import pytest
from corpus import ORGANS, load_pair, prepare_text_cache
from organ_dice import organ_dice

from MedVLSAM2Lib.data.cache import CacheItem, prepare
from MedVLSAM2Lib.model.weights import load_checkpoint
from MedVLSAM2Lib.preprocess import GridConfig
from MedVLSAM2Lib.training.config import TrainConfig
from MedVLSAM2Lib.training.trainer import train
from MedVLSAM2Lib.volume import read_volume

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

FAST = 1e-3  # parts that start from random in stage 3 (SAM2 decoder, [SEG] projector, toy SAM2 encoder)
STAGES = {
    1: {"task_weights": {"report": 1}, "max_steps": 30, "batch_size": 2, "lr": 1e-3},
    2: {"task_weights": {"report": 1}, "max_steps": 30, "batch_size": 2, "lr": 1e-3},
    # the LLM's LoRA fast too (with the report rehearsed): a slow LLM left each organ's [SEG] state ~10 % from the
    # others and whether the decoder ever told them apart depended on the CPU's rounding (see Training/README §5)
    3: {"task_weights": {"semantic": 1, "report": 0.3}, "max_steps": 1500, "lr": 1e-4, "objects_per_sample": 4,
        "phrasings": 1, "slice_window": 8, "extra_parts": ["sam_image_encoder"],
        "lr_per_part": {"seg_projector": FAST, "sam_decoder": FAST, "sam_image_encoder": FAST, "lora": FAST}},
}  # fmt: skip


@pytest.fixture(scope="module")
def volumes(subject_a, total_labels):
    """Subject A's two CTs (upper abdomen at full resolution, abdomen-pelvis) with their organ labels."""
    names = {n: total_labels[n] for n in ORGANS}
    return {
        "subjectA_sm": partial(load_pair, subject_a / "example_ct_sm.nii.gz", subject_a / "example_seg.nii.gz", names),
        "subjectA": partial(
            load_pair, subject_a / "example_ct.nii.gz", subject_a / "example_seg_fast_force_split.nii.gz", names
        ),
    }


def _curves(run) -> list[dict[str, str]]:  # noqa: ANN001
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def _mean(rows: list[dict[str, str]], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows)


def test_three_stages_learn_text_and_four_organs(data_dir, subject_a, total_labels, volumes,
                                                                     tmp_path):  # fmt: skip
    grid, window = GridConfig(spatial_size=(16, 64, 64)), (-160.0, 240.0)
    start = time.monotonic()
    prepare([CacheItem(name, load) for name, load in volumes.items()], tmp_path / "seg", grid, window)
    prepare_text_cache(tmp_path, data_dir, grid, window)
    common = {"preset": "tiny", "text_cache": str(tmp_path / "text"), "seg_cache": str(tmp_path / "seg"),
              "reports_csv": str(tmp_path / "reports.csv"), "samples_per_epoch": 100000, "augmentation": False,
              "save_every": 100000, "seed": 0}  # fmt: skip
    previous, curves = None, {}
    for stage, settings in STAGES.items():
        output = tmp_path / f"stage{stage}"
        config = TrainConfig(**common, **settings, stage=stage, init_from=previous, output_dir=str(output))
        previous = str(train(config).final_checkpoint)
        curves[stage] = _curves(output)
    elapsed = time.monotonic() - start

    model = load_checkpoint(previous)
    organs = {n: total_labels[n] for n in ORGANS}
    scores = {}
    for name, load in volumes.items():
        ct, _ = load()
        labels = read_volume(subject_a / load.args[1].name).array
        scores[name] = organ_dice(model, ct, labels, organs)
    print(f"three stages in {elapsed:.0f} s; Dice {scores}")

    for stage in (1, 2):
        assert _mean(curves[stage][-5:], "text_loss") < _mean(curves[stage][:5], "text_loss") - 0.1, stage
    seg_rows = [r for r in curves[3] if float(r["dice_loss"]) > 0]
    assert _mean(seg_rows[-20:], "dice_loss") < _mean(seg_rows[:20], "dice_loss") - 0.2
    for name, results in scores.items():
        for organ, (score, answer) in results.items():
            assert score >= 0.7, f"{name} {organ}: Dice {score:.3f} (answer {answer!r})"
