"""The training loop on Hugging Face ``accelerate``: one process, DDP, FSDP or DeepSpeed from the launch config.

Reads top to bottom: config → accelerator → model with the stage's freeze plan → data → optimiser and
schedule → ``prepare`` → resume → loop. Checkpoints are accelerate state (model, optimiser, scheduler,
per-process RNG) plus ``trainer_state.json`` (step, epoch, position in the epoch), written to a temporary
folder and renamed, so a kill at any moment leaves the previous checkpoint intact; resuming continues on
the same loss curve because sample ``i`` of an epoch is a pure function of ``(seed, epoch, i)``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..config import preset
from ..data.cache import VolumeCache
from ..data.ctrate import iter_reports, iter_vqa
from ..data.mixture import TaskMixture, collate
from ..distributed import cpu_multiprocess
from ..model.medvlsam2 import MedVLSAM2Model
from ..model.weights import build_model, load_checkpoint, save_checkpoint
from ..templates import TermDictionary, vqa_question
from .config import TrainConfig
from .stages import trainable_report

__all__ = ["TrainResult", "train", "latest_checkpoint", "parameter_groups"]

logger = logging.getLogger(__name__)

METRICS = ("loss", "text_loss", "bce_loss", "dice_loss", "object_loss")
CHECKPOINT_PREFIX = "step-"


@dataclass
class TrainResult:
    """Where the run ended."""

    steps: int
    output_dir: Path
    final_checkpoint: Path | None


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (partial ones from a kill are ignored)."""
    folder = output_dir / "checkpoints"
    done = sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def _build_model(config: TrainConfig) -> MedVLSAM2Model:
    if config.init_from:
        model = load_checkpoint(config.init_from)
    else:
        model = build_model(preset(config.preset), config.base_weights)
    model.config.vision.gradient_checkpointing = config.gradient_checkpointing
    model.set_trainable(config.trainable_parts())
    return model


def _open_cache(path: str | None) -> VolumeCache | None:
    """A prepared cache, every file checked against its checksum before any training work starts."""
    if not path:
        return None
    cache = VolumeCache(path)
    cache.verify()
    return cache


def _dataset(config: TrainConfig, model: MedVLSAM2Model) -> TaskMixture:
    reports = (
        {r.volume_name.split(".")[0]: r.text for r in iter_reports(config.reports_csv)} if config.reports_csv else {}
    )
    vqa: dict[str, list[tuple[str, str]]] = {}
    for sample in iter_vqa(config.vqa_json) if config.vqa_json else ():
        vqa.setdefault(sample.image.split(".")[0], []).extend((vqa_question(t.question, t.kind), t.answer)
                                                         for t in sample.turns)  # fmt: skip
    return TaskMixture(
        model.config, model.tokenizer, config.task_weights, config.samples_per_epoch, seed=config.seed,
        text_cache=_open_cache(config.text_cache), reports=reports, vqa=vqa, seg_cache=_open_cache(config.seg_cache),
        terms=TermDictionary.load(config.term_dictionary) if config.term_dictionary else None,
        augmentation=config.augmentation, objects_per_sample=config.objects_per_sample, phrasings=config.phrasings,
        slice_window=config.slice_window, prompt_only_share=config.prompt_only_share, point_share=config.point_share,
        interactive_objects=config.interactive_objects, interactive_referring_share=config.interactive_referring_share,
    )  # fmt: skip


def parameter_groups(model: MedVLSAM2Model, lr: float, lr_per_part: dict[str, float]) -> list[dict]:
    """AdamW groups of the trainable parameters: one per part of ``lr_per_part`` at its rate, the rest at ``lr``."""
    groups, assigned = [], set()
    for part, part_lr in lr_per_part.items():
        params = [p for p in model.part_parameters(part) if p.requires_grad and id(p) not in assigned]
        assigned.update(id(p) for p in params)
        groups.append({"params": params, "lr": part_lr})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in assigned]
    groups.append({"params": rest, "lr": lr})
    return [g for g in groups if g["params"]]


def _optimizer(config: TrainConfig, model: MedVLSAM2Model) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.lr, config.lr_per_part)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


@contextlib.contextmanager
def _tied_weights_notice_silenced() -> Iterator[None]:
    """accelerate warns on every save that it dropped the LM head's copy of the tied embedding rows (safetensors
    stores shared tensors once); loading re-ties them, which the exact-resume test checks. Hide that notice only."""
    notice = logging.getLogger("accelerate.utils.other")

    def keep(record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()

    notice.addFilter(keep)
    try:
        yield
    finally:
        notice.removeFilter(keep)


def _save(accelerator, output_dir: Path, state: dict, keep: int) -> None:  # noqa: ANN001
    """accelerate state + our trainer state, into a temporary folder renamed at the end."""
    final = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{state['step']:08d}"
    tmp = final.with_name(f".{final.name}.partial")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with _tied_weights_notice_silenced():
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank has written its RNG state before the folder is published
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = sorted(p for p in final.parent.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]
        for path in old:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()


def _metrics_writer(path: Path, resume_step: int) -> Callable[[dict], None]:
    """Append rows to metrics.csv, first dropping rows a killed run logged after the checkpoint it resumes."""
    rows = []
    if path.is_file() and resume_step:
        with path.open() as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
    columns = ["step", "epoch", *METRICS, "lr", "samples_per_s"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def write(row: dict) -> None:
        with path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=columns).writerow(row)

    return write


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[int, int, dict], None] | None = None,
    print_parameters: bool = True,
) -> TrainResult:
    """Run one stage. ``on_step(step, total_steps, metrics)`` is called on the main process after each step;
    ``print_parameters`` prints the trainable parameters per module at the start."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    output_dir = Path(config.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision,
                              log_with="tensorboard", project_dir=str(output_dir), cpu=cpu_multiprocess())  # fmt: skip
    set_seed(config.seed)
    model = _build_model(config)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        launch = {"processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
                  "device": str(accelerator.device), "torch": torch.__version__}  # fmt: skip
        (output_dir / "launch.json").write_text(json.dumps(launch, indent=2))
        for module, trainable, total in trainable_report(model) if print_parameters else ():
            accelerator.print(f"trainable {module:<18}{trainable:>14,} / {total:,}")
    dataset = _dataset(config, model)
    # Its own generator: creating a DataLoader iterator draws a seed, which must not shift the global RNG that
    # dropout uses (a resumed run creates one more iterator than an uninterrupted one).
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=False,
                                         collate_fn=partial(collate, pad_id=model.tokens.pad),
                                         generator=torch.Generator().manual_seed(config.seed))  # fmt: skip
    optimizer = _optimizer(config, model)
    steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / config.grad_accum)
    total = config.max_steps or steps_per_epoch * config.epochs
    warmup = int(config.warmup_ratio * total)
    if config.schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0}
    checkpoint = latest_checkpoint(output_dir) if resume else None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    log = _metrics_writer(output_dir / "metrics.csv", state["step"]) if accelerator.is_main_process else None
    accelerator.init_trackers("tensorboard")

    model.train()
    started, samples = time.monotonic(), 0
    while state["step"] < total and state["epoch"] < config.epochs:
        dataset.set_epoch(state["epoch"])
        skip = state["batches_in_epoch"]
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            with accelerator.accumulate(model):
                out = model(batch.to(accelerator.device))
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and config.clip_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.clip_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state["batches_in_epoch"] += 1
            samples += batch.input_ids.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            values = accelerator.gather(torch.stack([getattr(out, m).detach().float() for m in METRICS])[None])
            metrics = dict(zip(METRICS, values.mean(dim=0).tolist(), strict=True))
            metrics["lr"] = scheduler.get_last_lr()[-1]
            metrics["samples_per_s"] = samples / max(time.monotonic() - started, 1e-9)
            if log and state["step"] % config.log_every == 0:
                log({"step": state["step"], "epoch": state["epoch"], **metrics})
                accelerator.log(metrics, step=state["step"])
            if on_step and accelerator.is_main_process:
                on_step(state["step"], total, metrics)
            if state["step"] % config.save_every == 0 or state["step"] >= total:
                _save(accelerator, output_dir, state, config.keep_checkpoints)
            if state["step"] >= total:
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0

    final = None
    for tracker in accelerator.trackers:  # not end_training(): it destroys the process group the caller may own
        tracker.finish()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = save_checkpoint(
            accelerator.unwrap_model(model), output_dir / "final", config.base_weights, overwrite=True
        )
    accelerator.wait_for_everyone()
    return TrainResult(state["step"], output_dir, final)
