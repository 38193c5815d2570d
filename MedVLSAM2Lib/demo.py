"""The embedded-default demo: a real chest CT and its Slicer segmentation, both shipped in ``slicerio``.

It reads the volume and the ``.seg.nrrd``, maps every segment to the model grid and back (Dice per
segment), synthesises point and box prompts on one target, and writes ``demo-output/``: the
target's round-tripped mask (NIfTI), all round-tripped segments (``.seg.nrrd``) and a PNG of an
axial slice with the masks and prompts drawn. Returns a :class:`DemoResult`; printing is the CLI's job.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .preprocess import GridConfig, GridRecord, mask_from_model, mask_to_model, to_model
from .prompts import BoxPrompt, PointPrompt, synthesize_box, synthesize_points
from .segmentation import Segment, Segmentation, read_segmentation, write_segmentation
from .volume import Volume, orientation_transform, read_volume, reorient_points, write_volume

__all__ = ["DemoResult", "run_demo", "dice"]

logger = logging.getLogger(__name__)

MARKER = ".medvlsam2-demo"  # marks a folder the demo may replace on the next run
DEFAULT_TARGET = "right lung"
DISPLAY_WINDOW_HU = (-1000.0, 400.0)


@dataclass
class DemoResult:
    """What the demo computed and wrote."""

    volume: Volume
    record: GridRecord
    dice_per_segment: dict[str, float]
    target: str
    points: list[PointPrompt]
    box: BoxPrompt
    points_model: list[PointPrompt]
    box_model: BoxPrompt
    files: list[Path] = field(default_factory=list)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


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


def _slice_rgb(
    display: Volume, masks: list[tuple[np.ndarray, tuple[float, float, float] | None]], k: int
) -> np.ndarray:
    low, high = DISPLAY_WINDOW_HU
    gray = np.clip((display.array[k].astype(np.float32) - low) / (high - low), 0, 1) * 255
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for mask, color in masks:
        rgb[mask[k]] = 0.55 * rgb[mask[k]] + 0.45 * np.asarray(color or (1.0, 0.0, 0.0)) * 255
    return rgb


def _overlay_png(
    volume: Volume, segmentation: Segmentation, points: list[PointPrompt], box: BoxPrompt, path: Path
) -> None:
    """Two axial slices in radiological display (patient right on the left), 4x enlarged: the points'
    slice with the points (green) and the box's slice with the box (yellow), masks tinted in segment colours."""
    from PIL import Image, ImageDraw

    transform = orientation_transform(volume.ijk_to_ras, "LPS")
    display = volume.reoriented("LPS")
    masks = [
        (Volume(s.mask.astype(np.uint8), volume.ijk_to_ras).reoriented("LPS").array.astype(bool), s.color)
        for s in segmentation.segments
    ]
    shown_points = reorient_points(np.array([p.ijk for p in points]), transform, volume.shape_ijk)
    corners = reorient_points(np.array([box.min_ijk, box.max_ijk]), transform, volume.shape_ijk)
    scale = 4
    panels = []
    for k in (int(round(shown_points[0, 2])), int(round(corners[0, 2]))):
        rgb = _slice_rgb(display, masks, k).astype(np.uint8)
        panels.append(Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST))
    image = Image.new("RGB", (panels[0].width * 2, panels[0].height))
    image.paste(panels[0], (0, 0))
    image.paste(panels[1], (panels[0].width, 0))
    draw = ImageDraw.Draw(image)
    for i, j, _ in shown_points:
        x, y = (i + 0.5) * scale, (j + 0.5) * scale
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=(0, 255, 0), width=2)
    (i0, j0), (i1, j1) = np.sort(corners[:, :2], axis=0)
    offset = panels[0].width
    draw.rectangle(
        [offset + (i0 + 0.5) * scale, (j0 + 0.5) * scale, offset + (i1 + 0.5) * scale, (j1 + 0.5) * scale],
        outline=(255, 255, 0),
        width=2,
    )
    image.save(path)


def run_demo(
    output: str | os.PathLike = "demo-output",
    *,
    volume_path: str | os.PathLike | None = None,
    segmentation_path: str | os.PathLike | None = None,
    target: str = DEFAULT_TARGET,
    seed: int = 0,
    config: GridConfig | None = None,
) -> DemoResult:
    """Run the demo on the packaged chest CT (or given files) and write the output folder atomically.

    Raises:
        InputError: unreadable inputs, grids that differ, an unknown ``target`` segment, or an
            ``output`` folder that exists and was not written by the demo.
    """
    default_volume, default_segmentation = default_inputs()
    volume = read_volume(volume_path or default_volume)
    segmentation = read_segmentation(segmentation_path or default_segmentation)
    if segmentation.segments[0].mask.shape != volume.array.shape or not np.allclose(
        segmentation.ijk_to_ras, volume.ijk_to_ras, atol=1e-3
    ):
        raise InputError("The segmentation is not on the volume's grid; resample it in Slicer first.")
    image, record = to_model(volume, config)
    logger.info("model grid %s, range %.3f..%.3f", image.shape, image.min(), image.max())

    round_trip, scores = [], {}
    for segment in segmentation.segments:
        back = mask_from_model(mask_to_model(segment.mask.astype(np.uint8), record), record).astype(bool)
        scores[segment.name] = dice(segment.mask, back)
        round_trip.append(Segment(segment.name, back, segment.color, segment.terminology))
    round_trip_segmentation = Segmentation(volume.ijk_to_ras.copy(), round_trip)

    rng = np.random.default_rng(seed)
    target_mask = segmentation.mask(target)
    points = synthesize_points(target_mask, rng)
    box = synthesize_box(target_mask, rng)
    points_model, boxes_model = record.prompts_to_model(tuple(points), (box,))

    output = Path(output)
    tmp = _prepare_output(output)
    try:
        slug = target.replace(" ", "_")
        write_volume(
            volume.with_array(round_trip_segmentation.mask(target).astype(np.uint8)), tmp / f"mask_{slug}.nii.gz"
        )
        write_segmentation(round_trip_segmentation, tmp / "segmentation_roundtrip.seg.nrrd")
        _overlay_png(volume, round_trip_segmentation, points, box, tmp / "overlay_axial.png")
        names = sorted(p.name for p in tmp.iterdir())
        _publish(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    files = [output / name for name in names]
    return DemoResult(volume, record, scores, target, points, box, points_model, boxes_model[0], files)
