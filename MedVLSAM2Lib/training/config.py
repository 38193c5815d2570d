"""The training configuration: one YAML file per stage (``Training/stage{1,2,3}.yaml``), strictly validated.

Every problem (unknown key, missing path, bad value) is reported with the field's name before any model is
built or any GPU work starts.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import PRESETS, strict_from_dict
from ..errors import InputError
from ..model.medvlsam2 import ALL_PARTS
from .stages import stage_plan

__all__ = ["TrainConfig", "load_train_config"]


@dataclass
class TrainConfig:
    """Settings of one training stage.

    Attributes:
        stage: 1, 2 or 3 (see :mod:`MedVLSAM2Lib.training.stages`).
        preset: model preset when starting from scratch (``tiny``, ``small``, ``paper``).
        init_from: our checkpoint folder to start from (the previous stage's output), or ``None``.
        base_weights: local pretrained files: ``vision`` (M3D-CLIP .bin), ``language`` (folder), ``sam2`` (.pt).
        output_dir: where checkpoints, ``metrics.csv`` and TensorBoard logs go.
        text_cache, seg_cache: prepared caches (``medvlsam2 prepare``) of CT-RATE and M3D-Seg volumes.
        reports_csv, vqa_json, term_dictionary: CT-RATE reports, CT-CHAT VQA and the M3D term dictionary.
        task_weights: sampling weight per task (``report``, ``vqa``, ``semantic``, ``referring``, ``interactive``).
        samples_per_epoch, epochs, max_steps: run length (``max_steps`` > 0 caps optimiser steps).
        batch_size, grad_accum: per-device batch and gradient-accumulation steps.
        lr, lr_per_part: base learning rate and overrides per trainable part.
        weight_decay, warmup_ratio, clip_norm: AdamW / warmup / gradient clipping.
        schedule: ``cosine`` (decay to 0 after warmup) or ``constant`` (after warmup).
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (accelerate).
        gradient_checkpointing: recompute ViT blocks in backward.
        augmentation: M3D's random rotation/flips/intensity changes (see ``data/augment.py``).
        objects_per_sample: structures asked about per semantic/referring sample, one turn each (LISA's 3).
        interactive_objects: structures per interactive sample, each with prompts of its own (one turn each).
        phrasings: segmentation questions/answers drawn from the first N templates only (0: all, the paper).
            Random toy LLMs cannot learn paraphrase-invariant ``[SEG]`` states in minutes; pretrained ones bring it.
        slice_window: SAM2 runs on this many consecutive model-grid slices of each segmentation sample, at a
            random depth (0: all slices). Cuts the cost of a step in proportion; the ViT still sees the whole volume.
        prompt_only_share: share of interactive samples whose points or box segment alone, without a ``[SEG]``
            state (SAM2's interactive mode: what a user's clicks without text get). 0 (the paper): every
            interactive sample carries the text of semantic or referring segmentation plus its prompts, as the
            paper's interactive protocol (Table 5) gives them.
        point_share: share of interactive samples prompted with points (the rest with a box).
        interactive_referring_share: share of the interactive samples with text whose text is a referring
            description (term dictionary) rather than the class name; Table 5 evaluates with the referring text.
        train_sam_memory: stage 3 also trains SAM2's memory path.
        extra_parts: more trainable parts on top of the stage plan (e.g. ``sam_image_encoder`` for toy models).
        frozen_parts: parts of the stage plan kept frozen (e.g. the language side while SAM2's prompt path learns).
        seed: one seed for model init, sampling and dropout.
        save_every, log_every, keep_checkpoints: checkpoint/log cadence (optimiser steps), checkpoints kept.
    """

    stage: int = 1
    preset: str = "paper"
    init_from: str | None = None
    base_weights: dict[str, str] = field(default_factory=dict)
    output_dir: str = "runs/stage1"
    text_cache: str | None = None
    seg_cache: str | None = None
    reports_csv: str | None = None
    vqa_json: str | None = None
    term_dictionary: str | None = None
    task_weights: dict[str, float] = field(default_factory=lambda: {"report": 1.0})
    samples_per_epoch: int = 1000
    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    lr_per_part: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    clip_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    augmentation: bool = True
    objects_per_sample: int = 3
    interactive_objects: int = 1
    phrasings: int = 0
    slice_window: int = 0
    prompt_only_share: float = 0.0
    point_share: float = 0.5
    interactive_referring_share: float = 0.5
    train_sam_memory: bool = False
    extra_parts: list[str] = field(default_factory=list)
    frozen_parts: list[str] = field(default_factory=list)
    seed: int = 0
    save_every: int = 100
    log_every: int = 1
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise InputError(f"train config: stage must be 1, 2 or 3, got {self.stage!r}.")
        if self.preset not in PRESETS:
            raise InputError(f"train config: preset must be one of {sorted(PRESETS)}, got {self.preset!r}.")
        if self.schedule not in ("cosine", "constant"):
            raise InputError(f"train config: schedule must be cosine or constant, got {self.schedule!r}.")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise InputError(f"train config: mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}.")
        unknown_parts = set(self.lr_per_part) | set(self.extra_parts) | set(self.frozen_parts)
        if unknown_parts - ALL_PARTS:
            raise InputError(
                f"train config: unknown part(s) {sorted(unknown_parts - ALL_PARTS)}; parts are {sorted(ALL_PARTS)}."
            )
        if not self.trainable_parts():
            raise InputError(f"train config: frozen_parts {sorted(self.frozen_parts)} leave stage {self.stage} "
                             "nothing to train.")  # fmt: skip
        unknown_weights = set(self.base_weights) - {"vision", "language", "sam2"}
        if unknown_weights:
            raise InputError(f"train config: base_weights has unknown key(s) {sorted(unknown_weights)}.")
        for name in (
            "samples_per_epoch",
            "epochs",
            "batch_size",
            "grad_accum",
            "save_every",
            "log_every",
            "objects_per_sample",
            "interactive_objects",
        ):
            if int(getattr(self, name)) < 1:
                raise InputError(f"train config: {name} must be >= 1, got {getattr(self, name)}.")
        if self.phrasings < 0:
            raise InputError(f"train config: phrasings must be >= 0 (0 = every template), got {self.phrasings}.")
        if self.slice_window < 0:
            raise InputError(f"train config: slice_window must be >= 0 (0 = every slice), got {self.slice_window}.")
        for name in ("prompt_only_share", "point_share", "interactive_referring_share"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise InputError(f"train config: {name} must be in [0, 1], got {getattr(self, name)}.")

    def trainable_parts(self) -> frozenset[str]:
        """The stage's plan with ``extra_parts`` added and ``frozen_parts`` taken out."""
        plan = stage_plan(self.stage, train_sam_memory=self.train_sam_memory).parts
        return frozenset((plan | set(self.extra_parts)) - set(self.frozen_parts))

    def check_paths(self) -> None:
        """Raise :class:`InputError` naming the first configured path that does not exist."""
        paths = {k: getattr(self, k) for k in ("init_from", "text_cache", "seg_cache", "reports_csv", "vqa_json",
                                                "term_dictionary")}  # fmt: skip
        paths.update({f"base_weights.{k}": v for k, v in self.base_weights.items()})
        for name, value in paths.items():
            if value and not Path(value).exists():
                raise InputError(f"train config: {name} = {value} does not exist.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_train_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a stage YAML, apply ``overrides`` (CLI flags), validate keys, values and paths.

    Relative paths in the file are taken relative to the current directory (where ``medvlsam2 train`` runs).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such training config.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err}).") from err
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of settings.")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    config = strict_from_dict(TrainConfig, data, str(path))
    config.check_paths()
    return config
