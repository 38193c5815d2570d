"""Make the extension's screenshots (``EXTENSION_SCREENSHOTURLS`` in CMakeLists.txt) from real results.

``ct_masks.png``
    The demo's chest CT (``CTChest4.nrrd`` from ``slicerio``), axial and coronal, lung window, with the lungs
    that ``medvlsam2 demo`` segmented from the text prompts "right lung" / "left lung" filled in their Slicer
    terminology colours, the shipped segmentation drawn as a white outline, and every demo mask's Dice.
``module_panel.png``
    The Slicer panel ``MedVLSAM2/Resources/UI/MedVLSAM2.ui`` loaded by Qt offscreen (Slicer's ctk/qMRML widgets
    drawn by plain-Qt stand-ins), filled with what the engine computes on the same CT with the demo's model: the
    report and the multiple-choice answer (run again here through ``InferenceEngine``) and the demo's segments
    with their confidences.

The demo's model is the ``tiny`` preset fine-tuned on this one CT, so the report repeats what it was taught
about this CT (the lung volumes); both pictures say so. Nothing is drawn by hand.

Usage (Qt is needed by this script only)::

    .venv/bin/pip install PySide6-Essentials
    .venv/bin/python Screenshots/make_screenshots.py [--demo-output demo-output] [--rerun-demo]

A ``--demo-output`` folder holding a finished demo is reused; otherwise the demo runs there first (about two
minutes on two cores). The PNGs are written atomically next to this script and kept under ``MAX_BYTES``.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
UI_FILE = REPO / "MedVLSAM2" / "Resources" / "UI" / "MedVLSAM2.ui"
MODULE_FILE = REPO / "MedVLSAM2" / "MedVLSAM2.py"
OUTPUTS = ("ct_masks.png", "module_panel.png")  # the files EXTENSION_SCREENSHOTURLS points at, in this order
MAX_BYTES = 300_000  # per PNG; larger ones are reduced to a 256-colour palette
LUNG_WINDOW_HU = (-1350.0, 150.0)  # width 1500, level -600
SHOWN_TASK = "semantic"  # the demo task whose masks the CT picture fills (the text prompt is the structure name)
TASK_LABELS = {"semantic": "text prompt", "referring": "description", "box": "box", "points": "points"}
PANEL_WIDTH = 520


def _save_png(image, path: Path) -> int:  # noqa: ANN001 (a PIL image)
    """Write ``image`` to ``path`` atomically as an optimised PNG under :data:`MAX_BYTES`; returns its size."""
    from PIL import Image

    def encode(picture) -> bytes:  # noqa: ANN001
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()

    data = encode(image.convert("RGB"))
    if len(data) > MAX_BYTES:
        data = encode(image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE))
    if len(data) > MAX_BYTES:
        raise RuntimeError(f"{path.name}: {len(data)} bytes even as a palette PNG; make the picture smaller.")
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(data)


# ---------------------------------------------------------------------------------------------------- the demo


def _demo_output(folder: Path, rerun: bool) -> dict:
    """The demo's ``summary.json`` in ``folder``, running ``medvlsam2 demo`` there first when needed."""
    from MedVLSAM2Lib.demo import run_demo

    summary = folder / "summary.json"
    if rerun or not summary.is_file() or not (folder / "model").is_dir():
        print(f"running the demo into {folder} (fine-tunes the tiny preset; minutes on a CPU)", flush=True)
        run_demo(folder, on_phase=lambda message: print(f"  {message}", flush=True))
    else:
        print(f"reusing the demo in {folder}", flush=True)
    return json.loads(summary.read_text())


def _dice(summary: dict) -> dict[tuple[str, str], tuple[float, float]]:
    """``(task, target) -> (Dice against the shipped segmentation, model confidence)`` for every demo mask."""
    return {(t["task"], t["target"]): (t["dice"], t["score"]) for t in summary["tasks"]}


# ---------------------------------------------------------------------------------------------------- CT picture


def _lps_arrays(demo: Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """CT (HU), predicted and shipped lung masks, all KJI in LPS order (radiological display), and the spacing."""
    from MedVLSAM2Lib.demo import TARGETS, default_inputs
    from MedVLSAM2Lib.segmentation import read_segmentation
    from MedVLSAM2Lib.volume import read_volume

    volume_path, segmentation_path = default_inputs()
    volume = read_volume(volume_path)
    truth = read_segmentation(segmentation_path)
    predicted, shipped = {}, {}
    for target in TARGETS:
        mask = read_volume(demo / "masks" / f"{SHOWN_TASK}_{target.replace(' ', '_')}.nii.gz").array
        predicted[target] = volume.with_array(mask.astype(np.uint8)).reoriented("LPS").array > 0
        shipped[target] = volume.with_array(truth.mask(target).astype(np.uint8)).reoriented("LPS").array > 0
    lps = volume.reoriented("LPS")
    return lps.array.astype(np.float32), predicted, shipped, lps.spacing


def _draw_view(
    ax,
    image: np.ndarray,
    masks: dict,
    outlines: dict,
    colours: dict,
    extent: list[float],  # noqa: ANN001
    origin: str,
) -> None:
    """One slice view: CT in the lung window, each mask filled and outlined in its colour, the reference in white."""
    low, high = LUNG_WINDOW_HU
    ax.imshow(image, cmap="gray", vmin=low, vmax=high, extent=extent, origin=origin, interpolation="bilinear")
    rows, cols = image.shape
    x = np.linspace(extent[0], extent[1], cols, endpoint=False) + (extent[1] - extent[0]) / cols / 2
    y_row0, y_end = (extent[3], extent[2]) if origin == "upper" else (extent[2], extent[3])  # where row 0 sits
    y = np.linspace(y_row0, y_end, rows, endpoint=False) + (y_end - y_row0) / rows / 2
    for name, mask in masks.items():
        if mask.any():
            ax.contourf(x, y, mask.astype(float), levels=[0.5, 1.5], colors=[colours[name]], alpha=0.45)
            ax.contour(x, y, mask.astype(float), levels=[0.5], colors=[colours[name]], linewidths=1.6)
        if outlines[name].any():
            ax.contour(
                x, y, outlines[name].astype(float), levels=[0.5], colors="white", linewidths=0.9, linestyles="dashed"
            )
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_axis_off()


def make_ct_picture(demo: Path, summary: dict, path: Path) -> int:
    """Axial and coronal views of the demo's CT with its lung masks and a Dice table; returns the PNG's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from PIL import Image

    from MedVLSAM2Lib.demo import TARGETS
    from MedVLSAM2Lib.terminology import lookup

    ct, predicted, shipped, (si, sj, sk) = _lps_arrays(demo)
    colours = {target: lookup(target)[0] for target in TARGETS}
    both = np.logical_or(*predicted.values())
    k0 = int(np.argmax(both.sum(axis=(1, 2))))  # axial slice with the most lung
    j0 = int(np.argmax(both.sum(axis=(0, 2))))  # coronal slice with the most lung
    depth, rows, cols = ct.shape
    scores = _dice(summary)

    figure = plt.figure(figsize=(12, 7), dpi=100, facecolor="black")
    axial = figure.add_axes((0.005, 0.03, 0.375, 0.78))
    _draw_view(
        axial,
        ct[k0],
        {t: m[k0] for t, m in predicted.items()},
        {t: m[k0] for t, m in shipped.items()},
        colours,
        [0, cols * si, rows * sj, 0],
        "upper",
    )
    coronal = figure.add_axes((0.39, 0.03, 0.375, 0.78))
    _draw_view(
        coronal,
        ct[:, j0, :],
        {t: m[:, j0, :] for t, m in predicted.items()},
        {t: m[:, j0, :] for t, m in shipped.items()},
        colours,
        [0, cols * si, 0, depth * sk],
        "lower",
    )
    for ax, label in ((axial, f"axial, slice {k0}"), (coronal, f"coronal, slice {j0}")):
        ax.text(0.0, 1.01, label, transform=ax.transAxes, color="#ffd24a", fontsize=11, va="bottom")
        ax.text(0.01, 0.5, "R", transform=ax.transAxes, color="#ffd24a", fontsize=11, va="center")
        ax.text(0.99, 0.5, "L", transform=ax.transAxes, color="#ffd24a", fontsize=11, va="center", ha="right")

    steps = summary.get("steps")  # its seconds depend on the machine's load: the README's timings say those
    figure.text(
        0.01,
        0.97,
        "MedVLSAM2: both lungs segmented from the text prompts 'right lung' and 'left lung'",
        color="white",
        fontsize=15,
        weight="bold",
        va="top",
    )
    figure.text(
        0.01,
        0.92,
        "slicerio's chest CT (CTChest4), lung window. Filled: the model's masks; dashed white: "
        "the segmentation shipped with the CT.\nModel: `medvlsam2 demo`, the tiny preset fine-tuned on this CT "
        f"for {steps} steps on a CPU, not the paper's weights.",
        color="#c8c8c8",
        fontsize=10.5,
        va="top",
        linespacing=1.5,
    )

    legend = [
        Patch(
            facecolor=colours[t], edgecolor=colours[t], alpha=0.7, label=f"{t}  Dice {scores[(SHOWN_TASK, t)][0]:.3f}"
        )
        for t in TARGETS
    ]
    legend.append(Patch(facecolor="none", edgecolor="white", linestyle="--", label="shipped segmentation"))
    figure.legend(
        handles=legend,
        loc="upper left",
        bbox_to_anchor=(0.775, 0.80),
        frameon=False,
        labelcolor="white",
        fontsize=11,
        handlelength=1.4,
    )
    lines = ["Dice by prompt", f"{'':<12}{'right':>6}{'left':>6}"]
    for task, label in TASK_LABELS.items():
        lines.append(f"{label:<12}" + "".join(f"{scores[(task, t)][0]:>6.3f}" for t in TARGETS))
    figure.text(
        0.785, 0.57, "\n".join(lines), color="white", fontsize=10, family="monospace", va="top", linespacing=1.6
    )
    grid = "×".join(str(n) for n in (cols, rows, depth))
    spacing = "×".join(f"{size:.3g}" for size in (si, sj, sk))
    figure.text(
        0.785,
        0.30,
        f"Masks on the CT's own grid:\n{grid} voxels,\n{spacing} mm.\nBox and point prompts are\n"
        "drawn from the shipped\nsegmentation, seeded.\n\nMade by\nScreenshots/make_screenshots.py",
        color="#9a9a9a",
        fontsize=9.5,
        va="top",
        linespacing=1.4,
    )

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor=figure.get_facecolor(), metadata={"Software": None})
    plt.close(figure)
    buffer.seek(0)
    return _save_png(Image.open(buffer), path)


# ---------------------------------------------------------------------------------------------------- panel picture


def _answer_kinds() -> list[tuple[str, str]]:
    """``ANSWER_KINDS`` as MedVLSAM2.py defines it (read from its source: the module itself needs Slicer)."""
    for node in ast.parse(MODULE_FILE.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ANSWER_KINDS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{MODULE_FILE}: ANSWER_KINDS not found")


def _ui_without_slicer_parts() -> tuple[bytes, dict[str, tuple[str, dict[str, str]]]]:
    """The .ui file minus what only Slicer can give (the MRML-scene connections, ctk/qMRML enum values), and each
    custom widget class it names: ``class -> (the class it extends, {property it sets: its XML value type})``."""
    root = ElementTree.parse(UI_FILE).getroot()
    for connections in root.findall("connections"):
        root.remove(connections)
    extends = {c.findtext("class"): c.findtext("extends") or "QWidget" for c in root.iter("customwidget")}
    properties: dict[str, dict[str, str]] = {name: {} for name in extends}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            value = next(iter(prop), None)
            if value is None:
                continue
            if value.tag in ("set", "enum") and (value.text or "").split("::")[0] in extends:
                widget.remove(prop)  # e.g. ctkPathLineEdit::Dirs: an enum of a class Qt does not know
            elif widget.get("class") in properties and prop.get("stdset") != "0":
                properties[widget.get("class")][prop.get("name")] = value.tag
    return ElementTree.tostring(root, encoding="utf-8"), {c: (extends[c], properties[c]) for c in extends}


def _stand_ins(custom: dict[str, tuple[str, dict[str, str]]]) -> list[type]:
    """Plain-Qt classes named like the .ui file's custom (ctk, qMRML, qSlicer) widgets, each with the properties the
    file sets on it: a collapsible section is a full-width header button above its contents, a node selector a combo
    box, a path editor a line edit, a markups place widget a "Place" button; any other one its Qt base class."""
    from PySide6 import QtWidgets
    from PySide6.QtCore import Property
    from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLineEdit, QPushButton, QToolButton, QWidget

    class Collapsible(QWidget):  # ctkCollapsibleButton: a full-width button above its (expanded) contents
        def __init__(self, parent=None) -> None:  # noqa: ANN001
            super().__init__(parent)
            self.header = QPushButton(self)
            self.header.setStyleSheet("text-align: left; padding: 4px 8px;")
            self.setContentsMargins(0, self.header.sizeHint().height() + 4, 0, 0)

        def resizeEvent(self, event) -> None:  # noqa: ANN001, N802 (Qt's name)
            self.header.setGeometry(0, 0, self.width(), self.header.sizeHint().height())
            super().resizeEvent(event)

        text = Property(str, lambda self: self.header.text()[2:], lambda self, value: self.header.setText(f"▾ {value}"))

    class Place(QWidget):
        def __init__(self, parent=None) -> None:  # noqa: ANN001
            super().__init__(parent)
            layout = QHBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            button = QToolButton(self)
            button.setText("Place")
            layout.addWidget(button)

    shapes = {
        "ctkCollapsibleButton": Collapsible,
        "qMRMLNodeComboBox": QComboBox,
        "ctkPathLineEdit": QLineEdit,
        "qSlicerMarkupsPlaceWidget": Place,
    }
    qt_types = {"bool": bool, "string": str, "number": int, "stringlist": "QStringList"}

    def base_of(name: str) -> type:
        while name not in shapes and name in custom:
            name = custom[name][0]
        return shapes.get(name) or getattr(QtWidgets, name, QWidget)

    def stored(name: str, kind) -> Property:  # noqa: ANN001
        return Property(
            kind, lambda self: getattr(self, f"_{name}", None), lambda self, value: setattr(self, f"_{name}", value)
        )

    classes = []
    for name, (_, props) in custom.items():
        base = base_of(name)
        extra = {
            p: stored(p, qt_types[t])
            for p, t in props.items()
            if t in qt_types and base.staticMetaObject.indexOfProperty(p) < 0 and not hasattr(base, p)
        }
        classes.append(type(name, (base,), extra))
    return classes


def _fill_panel(ui, engine_facts: dict, report: str, chat: list[tuple[str, str]], summary: dict) -> None:  # noqa: ANN001
    """Put into the loaded panel what MedVLSAM2Widget shows after Load model, Generate report, Ask and Segment."""
    import html

    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QComboBox, QLabel, QLineEdit, QProgressBar, QTextBrowser, QTextEdit

    def find(kind, name):  # noqa: ANN001, ANN202
        return ui.findChild(kind, name)

    find(QLineEdit, "weightsPathEdit").setText("demo-output/model")
    device = find(QComboBox, "deviceCombo")
    device.addItems(["auto", "cuda", "cpu"])
    device.setCurrentText(engine_facts["device"])
    for name in ("serverUrlEdit", "apiKeyEdit"):  # MedVLSAM2Widget.updateSetup with the Local backend
        find(QLineEdit, name).setEnabled(False)
    find(QLabel, "backendStatusLabel").setText(
        ", ".join(f"{k}: {engine_facts[k]}" for k in ("preset", "device", "dtype"))
    )
    find(QComboBox, "volumeSelector").addItem("CTChest4")
    find(QTextEdit, "reportText").setPlainText(report)
    history = find(QTextBrowser, "chatHistory")
    for question, answer in chat:
        history.append(f"<b>You:</b> {html.escape(question)}<br><b>MedVLSAM2:</b> {html.escape(answer)}")
    kinds = find(QComboBox, "answerKindCombo")
    for text, kind in _answer_kinds():
        kinds.addItem(text, kind)
    kinds.setCurrentIndex(kinds.findData("choice"))
    find(QLineEdit, "segmentTextEdit").setText("left lung")
    for name in ("positivePointsSelector", "negativePointsSelector", "roiSelector"):
        find(QComboBox, name).addItem("None")
    find(QComboBox, "segmentationSelector").addItem("CTChest4 MedVLSAM2")
    segments = find(QComboBox, "segmentCombo")
    for t in summary["tasks"]:  # the demo's segments, named as its .seg.nrrd names them, as updateSegments lists them
        segments.addItem(f"{t['target']} ({t['task']}) (confidence {t['score']:.3f})")
    segments.setCurrentIndex(segments.findText("left lung (semantic)", Qt.MatchFlag.MatchStartsWith))
    progress = find(QProgressBar, "progressBar")
    progress.setRange(0, 1)
    progress.setValue(1)
    find(QLabel, "statusLabel").setText("Segmenting: done")


def make_panel_picture(demo: Path, summary: dict, path: Path) -> int:
    """The module panel from its .ui file with the engine's real output on the demo CT; returns the PNG's size."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PIL import Image
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt
    from PySide6.QtGui import QFont, QPalette
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QComboBox, QLabel, QStyledItemDelegate, QVBoxLayout, QWidget

    from MedVLSAM2Lib.demo import default_inputs
    from MedVLSAM2Lib.demo_training import lung_question
    from MedVLSAM2Lib.engine import InferenceEngine
    from MedVLSAM2Lib.volume import read_volume

    engine = InferenceEngine.load(demo / "model", device="cpu")
    handle = engine.encode(read_volume(default_inputs()[0]))
    report = engine.report(handle).text
    answer = engine.ask(handle, lung_question(), kind="choice").text
    print(f"  report (engine, now): {report}\n  answer (engine, now): {answer}", flush=True)

    app = QApplication.instance() or QApplication([])
    app.setFont(QFont("DejaVu Sans", 9))
    app.setEffectEnabled(Qt.UIEffect.UI_AnimateCombo, False)  # grab the opened list, not its fade-in
    palette = app.palette()  # offscreen windows are never active: draw selections as in the active window
    for role in (QPalette.ColorRole.Highlight, QPalette.ColorRole.HighlightedText):
        palette.setColor(QPalette.ColorGroup.Inactive, role, palette.color(QPalette.ColorGroup.Active, role))
    app.setPalette(palette)
    ui_xml, custom = _ui_without_slicer_parts()
    stand_ins = _stand_ins(custom)  # kept alive while the loader instantiates them
    loader = QUiLoader()
    for stand_in in stand_ins:
        loader.registerCustomWidget(stand_in)
    ui_bytes = QByteArray(ui_xml)  # kept alive: QBuffer does not own it
    buffer = QBuffer(ui_bytes)
    buffer.open(QIODevice.ReadOnly)
    panel = loader.load(buffer)
    _fill_panel(panel, engine.describe(), report, [(lung_question(), answer)], summary)

    window = QWidget()
    window.setStyleSheet("background: #efefef;")
    layout = QVBoxLayout(window)
    caption = QLabel(
        "MedVLSAM2/Resources/UI/MedVLSAM2.ui rendered offscreen by Screenshots/make_screenshots.py (Slicer's ctk, "
        "qMRML and markups widgets drawn by plain-Qt stand-ins). Report, answer and confidences: the engine's output "
        "on slicerio's chest CT with the model of <code>medvlsam2 demo</code>, the tiny preset fine-tuned on this "
        "one CT (it was taught its lung volumes), not the paper's weights."
    )
    caption.setWordWrap(True)
    caption.setStyleSheet("color: #333; font-size: 8pt; padding: 2px 4px 6px 4px;")
    layout.addWidget(caption)
    layout.addWidget(panel)
    window.setFixedWidth(PANEL_WIDTH)
    window.resize(PANEL_WIDTH, window.sizeHint().height())
    window.show()
    app.processEvents()
    picture = _qt_to_pil(window.grab(), Image)

    segments = panel.findChild(QComboBox, "segmentCombo")  # the segment list, shown opened below its combo box
    segments.setItemDelegate(QStyledItemDelegate(segments))  # selection drawn from the palette, as in Slicer
    segments.showPopup()
    app.processEvents()
    popup = _qt_to_pil(segments.view().window().grab(), Image)
    where = segments.mapTo(window, segments.rect().bottomLeft())
    height = max(picture.height, where.y() + 1 + popup.height + 8)  # the list may reach below the panel
    canvas = Image.new("RGB", (picture.width, height), picture.getpixel((1, picture.height - 2)))
    canvas.paste(picture, (0, 0))
    canvas.paste(popup, (where.x(), where.y() + 1))
    segments.hidePopup()
    window.close()
    return _save_png(canvas, path)


def _qt_to_pil(pixmap, image_module):  # noqa: ANN001, ANN202
    from PySide6.QtCore import QBuffer, QIODevice

    buffer = QBuffer()
    buffer.open(QIODevice.WriteOnly)
    pixmap.save(buffer, "PNG")
    return image_module.open(io.BytesIO(bytes(buffer.data()))).convert("RGB")


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--demo-output",
        type=Path,
        default=REPO / "demo-output",
        help="a finished `medvlsam2 demo` folder to reuse, or where to run it (default: demo-output)",
    )
    parser.add_argument("--rerun-demo", action="store_true", help="run the demo again even if the folder holds one")
    args = parser.parse_args(argv)
    try:
        import PySide6  # noqa: F401
    except ImportError:
        print("PySide6 is missing: .venv/bin/pip install PySide6-Essentials", file=sys.stderr)
        return 2
    from MedVLSAM2Lib.machine import describe_cpu

    print(f"machine     {describe_cpu()}", flush=True)
    start = time.perf_counter()
    summary = _demo_output(args.demo_output, args.rerun_demo)
    demo_seconds = time.perf_counter() - start
    for name, make in zip(OUTPUTS, (make_ct_picture, make_panel_picture), strict=True):
        began = time.perf_counter()
        size = make(args.demo_output, summary, HERE / name)
        print(
            f"wrote       Screenshots/{name}: {size / 1000:.0f} kB in {time.perf_counter() - began:.1f} s", flush=True
        )
    print(f"took        {time.perf_counter() - start:.1f} s ({demo_seconds:.1f} s of it the demo)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
