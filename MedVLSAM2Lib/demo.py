"""The embedded-default demo: every task through :class:`InferenceEngine` on a real chest CT.

The CT and its Slicer segmentation ship inside ``slicerio``. Without ``weights`` the demo fine-tunes the tiny
preset on that one volume (:mod:`MedVLSAM2Lib.demo_training`); with ``weights`` it runs that model as is.
Then it asks for a report and a multiple-choice answer and segments both lungs four ways (semantic,
referring, box, points), scores each mask against the shipped segmentation (Dice) and writes
``demo-output/`` atomically. Returns a :class:`DemoResult`; printing is the CLI's job.

What it proves: the pipeline end to end (reading, grid mapping, generation, ``[SEG]`` → SAM2 masks, prompts
in the volume's IJK, outputs on its own grid). What it does not: clinical accuracy, which needs the trained
paper-scale weights (``--weights``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .metrics import dice
from .preprocess import GridConfig, mask_from_model, mask_to_model, to_model
from .prompts import BoxPrompt, PointPrompt, synthesize_box, synthesize_points
from .segmentation import Segment, Segmentation, read_segmentation, write_segmentation
from .templates import TermDictionary
from .terminology import lookup
from .volume import Volume, orientation_transform, read_volume, reorient_points, write_volume

__all__ = ["TaskResult", "DemoResult", "run_demo", "default_inputs", "DEFAULT_STEPS", "DICE_NEEDED"]

logger = logging.getLogger(__name__)

MARKER = ".medvlsam2-demo"  # marks a folder the demo may replace on the next run
TARGETS = ("right lung", "left lung")
DEFAULT_STEPS = 1190
# The Dice each task must reach on both lungs after the default fine-tune (the demo prints it, the test asserts it).
DICE_NEEDED = {"semantic": 0.85, "referring": 0.85, "box": 0.85, "points": 0.7}
DISPLAY_WINDOW_HU = (-1000.0, 400.0)


@dataclass
class TaskResult:
    """One segmentation run of the demo."""

    task: str
    target: str
    question: str
    answer: str
    dice: float
    score: float
    seconds: float
    points: list[list[float]] = field(default_factory=list)
    boxes: list[list[list[float]]] = field(default_factory=list)


@dataclass
class DemoResult:
    """What the demo computed and wrote."""

    volume: Volume
    model: str
    training_seconds: float
    report: str
    chat: list[dict]
    tasks: list[TaskResult]
    grid_dice: dict[str, float]
    files: list[Path] = field(default_factory=list)


def default_inputs() -> tuple[Path, Path]:
    """The chest CT and segmentation that ship inside the ``slicerio`` package."""
    import slicerio

    return Path(slicerio.get_testdata_file("CTChest4.nrrd")), Path(slicerio.get_testdata_file("Segmentation.seg.nrrd"))


def _prepare_output(output: Path) -> Path:
    """A fresh temporary folder beside ``output``; refuses to touch a non-demo folder that exists."""
    if output.exists() and any(output.iterdir()) and not (output / MARKER).exists():
        raise InputError(
            f"{output}: the folder exists and was not written by the demo; choose another --output or empty it."
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))


def _publish(tmp: Path, output: Path) -> None:
    """Replace ``output`` by ``tmp`` so readers see the old or the new folder, never a mix."""
    (tmp / MARKER).write_text("written by `medvlsam2 demo`; the next run replaces this folder\n")
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old)
    else:
        os.replace(tmp, output)


def _overlay_png(volume: Volume, truth: np.ndarray, predicted: np.ndarray, color: tuple[float, float, float],
                 points: list[PointPrompt], boxes: list[BoxPrompt], path: Path) -> None:  # fmt: skip
    """Shipped (left) and predicted (right) mask on one axial slice in radiological display, 4x enlarged:
    the prompts' slice, else the slice where the truth is largest; points green, boxes yellow."""
    from PIL import Image, ImageDraw

    transform = orientation_transform(volume.ijk_to_ras, "LPS")
    display = volume.reoriented("LPS")
    shown = [Volume(m.astype(np.uint8), volume.ijk_to_ras).reoriented("LPS").array.astype(bool)
             for m in (truth, predicted)]  # fmt: skip
    corners = [reorient_points(np.array([b.min_ijk, b.max_ijk]), transform, volume.shape_ijk) for b in boxes]
    dots = reorient_points(np.array([p.ijk for p in points]), transform, volume.shape_ijk) if points else None
    if dots is not None:
        k = int(round(dots[0, 2]))
    elif corners:
        k = int(round(corners[0][:, 2].mean()))
    else:
        k = int(np.argmax(shown[0].sum(axis=(1, 2))))
    low, high = DISPLAY_WINDOW_HU
    gray = np.clip((display.array[k].astype(np.float32) - low) / (high - low), 0, 1) * 255
    scale, panels = 4, []
    for mask in shown:
        rgb = np.repeat(gray[..., None], 3, axis=2)
        rgb[mask[k]] = 0.55 * rgb[mask[k]] + 0.45 * np.asarray(color) * 255
        image = Image.fromarray(rgb.astype(np.uint8))
        panels.append(image.resize((image.width * scale, image.height * scale), Image.NEAREST))
    canvas = Image.new("RGB", (panels[0].width * 2, panels[0].height))
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (panels[0].width, 0))
    draw, offset = ImageDraw.Draw(canvas), panels[0].width
    for i, j, _ in dots if dots is not None else ():
        x, y = offset + (i + 0.5) * scale, (j + 0.5) * scale
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=(0, 255, 0), width=2)
    for box in corners:
        (i0, j0), (i1, j1) = np.sort(box[:, :2], axis=0)
        draw.rectangle([offset + (i0 + 0.5) * scale, (j0 + 0.5) * scale, offset + (i1 + 0.5) * scale,
                        (j1 + 0.5) * scale], outline=(255, 255, 0), width=2)  # fmt: skip
    canvas.save(path)


def _grid_dice(volume: Volume, segmentation: Segmentation, size: tuple[int, int, int]) -> dict[str, float]:
    """The best Dice a model-grid mask can reach: each target mapped to the model grid and back."""
    _, record = to_model(volume, GridConfig(spatial_size=size))
    return {name: dice(segmentation.mask(name), mask_from_model(mask_to_model(segmentation.mask(name).astype(np.uint8),
            record), record)) for name in TARGETS}  # fmt: skip


def _read_inputs(volume_path: str | os.PathLike | None,
                 segmentation_path: str | os.PathLike | None) -> tuple[Volume, Segmentation]:  # fmt: skip
    default_volume, default_segmentation = default_inputs()
    volume = read_volume(volume_path or default_volume)
    segmentation = read_segmentation(segmentation_path or default_segmentation)
    if segmentation.segments[0].mask.shape != volume.array.shape or not np.allclose(
        segmentation.ijk_to_ras, volume.ijk_to_ras, atol=1e-3
    ):
        raise InputError("The segmentation is not on the volume's grid; resample it in Slicer first.")
    missing = [name for name in TARGETS if name not in segmentation.names()]
    if missing:
        raise InputError(f"the demo segments {list(TARGETS)}; the segmentation lacks {missing}.")
    return volume, segmentation


def run_demo(
    output: str | os.PathLike = "demo-output",
    *,
    volume_path: str | os.PathLike | None = None,
    segmentation_path: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    device: str = "cpu",
    on_step: Callable[[int, int, dict], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo on the packaged chest CT (or given files) and write the output folder atomically.

    ``on_step(step, total, metrics)`` follows the fine-tuning; ``on_phase(message)`` hears of each phase.

    Raises:
        InputError: unreadable inputs, grids that differ, lungs missing from the segmentation, or an
            ``output`` folder that exists and was not written by the demo.
        WeightsError: an unreadable ``weights`` folder.
    """
    import time

    say = on_phase or (lambda message: None)
    from .demo_training import DemoCorpus, demo_terms_path, fine_tune, lung_question, write_corpus
    from .engine import InferenceEngine

    volume, segmentation = _read_inputs(volume_path, segmentation_path)
    output = Path(output)
    tmp = _prepare_output(output)
    try:
        start = time.perf_counter()
        if weights is None:
            say("preparing the training corpus from the CT and its segmentation")
            corpus: DemoCorpus = write_corpus(volume, segmentation, tmp / "training")
            checkpoint = fine_tune(corpus, tmp / "training" / "run", steps, seed, on_step, on_phase)
            shutil.copytree(checkpoint, tmp / "model")
            shutil.copy(tmp / "training" / "run" / "metrics.csv", tmp / "training_curves.csv")  # all phases
            shutil.rmtree(tmp / "training")
            model_source = tmp / "model"
        else:
            model_source = Path(weights)
        training_seconds = time.perf_counter() - start
        say(
            f"running every task with {weights or 'the fine-tuned model'}: a report, a question, each lung segmented "
            "four ways"
        )
        engine = InferenceEngine.load(model_source, device=device)
        handle = engine.encode(volume)
        report = engine.report(handle)
        answer = engine.ask(handle, lung_question(), kind="choice")
        chat = [{"question": lung_question(), "kind": "choice", "answer": answer.text, "choice": answer.choice}]

        rng = np.random.default_rng(seed)
        terms = TermDictionary.load(demo_terms_path())
        tasks, segments = [], []
        for target in TARGETS:
            truth = segmentation.mask(target)
            runs = {
                "semantic": {"text": target},
                "referring": {"text": terms.descriptions(target)[0]},
                "box": {"text": target, "boxes": [synthesize_box(truth, rng)]},
                "points": {"points": synthesize_points(truth, rng)},
            }
            for task, prompt in runs.items():
                result = engine.segment(handle, **prompt)
                mask = result.objects[0].mask if result.objects else np.zeros(truth.shape, np.uint8)
                score = result.objects[0].score if result.objects else 0.0
                boxes, points = prompt.get("boxes", []), prompt.get("points", [])
                tasks.append(TaskResult(task, target, result.question, result.answer, dice(truth, mask), score,
                                        result.timings["total"], [list(p.ijk) + [p.label] for p in points],
                                        [[list(b.min_ijk), list(b.max_ijk)] for b in boxes]))  # fmt: skip
                slug = f"{task}_{target.replace(' ', '_')}"
                write_volume(volume.with_array(mask), tmp / "masks" / f"{slug}.nii.gz")
                color, terminology = lookup(target) or ((1.0, 0.0, 0.0), None)
                (tmp / "overlays").mkdir(exist_ok=True)
                _overlay_png(volume, truth, mask.astype(bool), color, points, boxes, tmp / "overlays" / f"{slug}.png")
                segments.append(Segment(f"{target} ({task})", mask.astype(bool), color, terminology))
        write_segmentation(Segmentation(volume.ijk_to_ras.copy(), segments), tmp / "segmentation.seg.nrrd")
        (tmp / "report.txt").write_text(report.text + "\n")
        (tmp / "chat.json").write_text(json.dumps(chat, indent=2) + "\n")
        grid = _grid_dice(volume, segmentation, engine.model.config.vision.img_size)
        summary = {"model": str(weights or "tiny preset fine-tuned on this volume (model/)"),
                   "training_seconds": round(training_seconds, 1), "steps": None if weights else steps,
                   "report": report.text, "chat": chat, "grid_ceiling_dice": grid,
                   "tasks": [asdict(t) for t in tasks]}  # fmt: skip
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        names = sorted(
            p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file() and "model" not in p.relative_to(tmp).parts
        )
        _publish(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    files = [output / name for name in names if name.name != MARKER]
    model_name = str(weights) if weights else str(output / "model")
    return DemoResult(volume, model_name, training_seconds, report.text, chat, tasks, grid, files)
