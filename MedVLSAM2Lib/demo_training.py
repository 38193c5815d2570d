"""The demo's fine-tuning: a one-volume training corpus built from a CT and its Slicer segmentation, and a
short stage-3 run of the tiny preset on it through the real trainer.

The corpus holds every task the engine serves: semantic, referring (descriptions from
``resources/demo_terms.json``), interactive (points or a box, with or without the name), a report and a
multiple-choice question. The report and the answer are measurements of the shipped segmentation (lung
volumes), written as text: the demo has no radiologist's report, and a measured statement is one the
model can be checked against.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .config import preset
from .data.cache import CacheItem, prepare
from .errors import InputError
from .preprocess import GridConfig
from .segmentation import Segmentation
from .training.config import TrainConfig
from .training.trainer import train
from .volume import Volume

__all__ = [
    "DEMO_STRUCTURES",
    "DemoCorpus",
    "demo_terms_path",
    "write_corpus",
    "fine_tune",
    "phase_steps",
    "lung_question",
    "measurements",
]

DEMO_STRUCTURES = ("right lung", "left lung")
VOLUME_NAME = "demo_ct"
FAST = 1e-3
# The recipe, in five phases of these steps (the default fine-tune, ``demo.DEFAULT_STEPS``, is their sum; another
# length scales them all). Measured on 2 CPU cores:
# 1. text (stage 2, fast): the report and the choice answer; cheap steps (no SAM2 pass).
# 2. lungs by name (stage 3): the decoder first learns "a lung" for either name (Dice ~0.6 for each, both lungs
#    in every mask) and stays there until it tells the two sides apart: 150-200 steps on every CPU kernel
#    measured now that the random SAM2 trunk has a position embedding (``model/segmenter.py``; without it one
#    kernel set never left the plateau). The LLM's LoRA is fast here: with a slow LLM the [SEG] states of
#    "right lung" and "left lung" stayed ~10 % apart. The report is rehearsed so that it is not forgotten, and
#    the rate is constant so that a late escape is not starved by the decay.
# 3. every task (cosine decay): referring and interactive samples join (half of the interactive ones with the
#    name, half with the points or box alone).
# 4. points on one slice: SAM2's prompt path (random, unlike SAM2.1's) learns to follow three points on the
#    slice they are on; a step sees one slice, so it is cheap. With 150 steps the right lung's points also took
#    part of the left lung on some CPU kernels (Dice 0.64-0.69); 400 steps fixed it on all three
#    (``bench/results/points_phase_trials.md``).
# 5. prompts through the volume: the prompted slice's object pointer, the tracked slices' object token
#    (``SegmenterConfig.prompt_object_token``), learns to say which lung; names are rehearsed. Four slices per
#    sample teach it as well as eight did, at half the cost.
# Phases 4 and 5 ask for both lungs per sample by their prompts alone and keep the language side frozen (its
# [SEG] states are not used by prompts alone; freezing it also spares the LLM's backward pass).
# SAM2 sees 8 consecutive slices of the 16 per sample (``slice_window``; 1 and 4 in phases 4 and 5), which halves
# a step's cost. SAM2's slice encoder stays as initialised, its memory path trains in phase 5 only (both train in
# the paper's recipe).
# What had made points alone fail (``bench/results/points_alone_trials.md``): with the generic question's [SEG]
# state as their token, the tracked slices followed the lung that state had come to mean; with no token at all,
# the random memory path did not carry which lung the points were on beyond 2-3 slices.
# The interactive text shares are pinned at the values the recipe was measured with (half the interactive samples
# named, none described), not the paper's defaults of TrainConfig: the demo's data stream stays as validated.
COMMON = {"preset": "tiny", "objects_per_sample": 2, "phrasings": 1, "augmentation": False,
          "samples_per_epoch": 100000, "warmup_ratio": 0.03, "slice_window": 8, "prompt_only_share": 0.5,
          "interactive_referring_share": 0.0}  # fmt: skip
SEGMENTATION = {"stage": 3, "lr": 1e-4, "lr_per_part": {"seg_projector": 3 * FAST, "sam_decoder": FAST, "lora": FAST}}
PROMPTS_ALONE = {"stage": 3, "lr": FAST, "frozen_parts": ["vision", "projector", "lora", "seg_projector"],
                 "prompt_only_share": 1.0, "interactive_objects": 2}  # fmt: skip
PHASES = (
    ("reports and answers", 70, {"stage": 2, "lr": FAST, "task_weights": {"report": 1.0, "vqa": 1.0}}),
    ("lungs by name", 360, {**SEGMENTATION, "schedule": "constant",
                            "task_weights": {"semantic": 1.0, "report": 0.3, "vqa": 0.1}}),
    ("every task", 210, {**SEGMENTATION, "task_weights": {"semantic": 1.0, "referring": 1.0, "interactive": 1.0,
                                                          "report": 0.5, "vqa": 0.2}}),
    ("points on one slice", 400, {**PROMPTS_ALONE, "schedule": "constant", "slice_window": 1, "point_share": 1.0,
                                  "task_weights": {"interactive": 1.0}}),
    ("prompts through the volume", 150, {**PROMPTS_ALONE, "train_sam_memory": True, "slice_window": 4,
                                         "point_share": 0.75, "task_weights": {"interactive": 2.0, "semantic": 1.0}}),
)  # fmt: skip


@dataclass
class DemoCorpus:
    """Files of the demo's training corpus (all inside one folder)."""

    cache: Path
    reports_csv: Path
    vqa_json: Path
    terms: Path
    report: str
    question: str
    answer: str


def demo_terms_path() -> Path:
    """The packaged descriptions of the demo structures (M3D term-dictionary format)."""
    return Path(str(resources.files("MedVLSAM2Lib").joinpath("resources/demo_terms.json")))


def lung_question() -> str:
    return "Which lung has the larger volume on this scan? (a) the right lung (b) the left lung"


def measurements(volume: Volume, segmentation: Segmentation) -> tuple[str, str]:
    """A findings/impression report of the lung volumes and the answer to :func:`lung_question`."""
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    right, left = (float(segmentation.mask(f"{side} lung").sum()) * voxel_ml for side in ("right", "left"))
    larger = "right" if right >= left else "left"
    report = f"Findings: Right lung {right:.0f} mL, left lung {left:.0f} mL. Impression: The {larger} lung is larger."
    return report, f"({'a' if larger == 'right' else 'b'}) the {larger} lung"


def write_corpus(volume: Volume, segmentation: Segmentation, folder: Path) -> DemoCorpus:
    """Cache the volume on the tiny grid with its demo structures; write the report, question and terms."""
    missing = [name for name in DEMO_STRUCTURES if name not in segmentation.names()]
    if missing:
        raise InputError(f"the demo segmentation needs segments {list(DEMO_STRUCTURES)}; missing {missing}.")
    config = preset("tiny")
    masks = {name.replace(" ", "_"): segmentation.mask(name) for name in DEMO_STRUCTURES}
    item = CacheItem(VOLUME_NAME, lambda: (volume, masks))
    prepare([item], folder / "cache", GridConfig(spatial_size=config.vision.img_size), config.segmenter.window)
    report, answer = measurements(volume, segmentation)
    reports_csv = folder / "reports.csv"
    with reports_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"])
        findings, impression = report.removeprefix("Findings: ").split(" Impression: ")
        writer.writerow([f"{VOLUME_NAME}.nii.gz", "Not given.", "Not given.", findings, impression])
    vqa_json = folder / "vqa.json"
    turns = [
        {"from": "human", "value": f"<image>\n{lung_question()} <multiple_choice>"},
        {"from": "gpt", "value": answer},
    ]
    record = {"id": "multiple_choice_0", "image": f"{VOLUME_NAME}.nii.gz", "conversations": turns}
    vqa_json.write_text(json.dumps([record], indent=1))
    return DemoCorpus(folder / "cache", reports_csv, vqa_json, demo_terms_path(), report, lung_question(), answer)


def phase_steps(steps: int) -> list[int]:
    """Steps of each phase in a fine-tune of ``steps`` in all: :data:`PHASES`' counts scaled (largest remainders),
    each at least one."""
    if steps < len(PHASES):
        raise InputError(f"fine-tuning steps must be >= {len(PHASES)}, got {steps}.")
    exact = np.array([count for _, count, _ in PHASES], dtype=float) * steps / sum(c for _, c, _ in PHASES)
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact)[: steps - counts.sum()]] += 1
    for empty in np.flatnonzero(counts == 0):
        counts[empty], counts[counts.argmax()] = 1, counts.max() - 1
    return [int(c) for c in counts]


def fine_tune(corpus: DemoCorpus, output: Path, steps: int, seed: int = 0,
              on_step: Callable[[int, int, dict], None] | None = None,
              on_phase: Callable[[str], None] | None = None) -> Path:  # fmt: skip
    """Train the tiny preset for ``steps`` optimiser steps in all on the corpus (:data:`PHASES`); returns the
    final checkpoint. ``metrics.csv`` in ``output`` holds the curves of every phase, steps numbered throughout.
    ``on_step(step, steps, metrics)`` follows every step, ``on_phase(message)`` announces each phase."""
    sources = {"text_cache": str(corpus.cache), "seg_cache": str(corpus.cache), "reports_csv": str(corpus.reports_csv),
               "vqa_json": str(corpus.vqa_json), "term_dictionary": str(corpus.terms)}  # fmt: skip
    done, checkpoint, rows = 0, None, []
    for n, ((name, _, settings), count) in enumerate(zip(PHASES, phase_steps(steps), strict=True)):
        if on_phase:
            on_phase(f"fine-tune phase {n + 1}/{len(PHASES)}: {name} (steps {done + 1}-{done + count} of {steps})")
        run = output / f"phase{n + 1}"
        config = TrainConfig(**{**COMMON, **settings}, **sources, max_steps=count, seed=seed, save_every=count,
                             init_from=checkpoint, output_dir=str(run))  # fmt: skip
        offset = done

        def progress(step: int, total: int, metrics: dict, offset: int = offset) -> None:
            if on_step:
                on_step(offset + step, steps, metrics)

        checkpoint = str(train(config, on_step=progress, print_parameters=False).final_checkpoint)
        with (run / "metrics.csv").open() as handle:
            for row in csv.DictReader(handle):
                rows.append({"phase": n + 1, **row, "step": int(row["step"]) + offset})
        done += count
    with (output / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return Path(checkpoint)
