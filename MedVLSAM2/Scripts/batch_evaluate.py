"""Headless batch run of the MedVLSAM2 module Logic: segment (and optionally report on) many CTs, write
``.seg.nrrd`` files, reports and a metrics table.

In 3D Slicer (the module's own Logic, real MRML, no window)::

    Slicer --no-main-window --python-script MedVLSAM2/Scripts/batch_evaluate.py \\
        --m3dseg M3D_Seg --datasets 0011 --structures liver,spleen --weights DIR --out batch/

In plain Python with the ``slicer-core`` wheel (what CI runs)::

    python MedVLSAM2/Scripts/batch_evaluate.py --folder CTs/ --structures liver --report --preset tiny --out batch/

Inputs: ``--m3dseg ROOT`` (M3D-Seg test split; Dice against its masks) or ``--folder DIR`` (CT files or DICOM
folders). Backend: ``--weights DIR``, ``--preset NAME`` or ``--server URL``. Existing outputs are kept and their
case skipped, so an interrupted run resumes; files are written under a temporary name and renamed. Exits 0 when
every case succeeded, 1 when some failed (listed), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Installed with the extension, the library and the module's Qt-free logic sit one folder up (beside the module);
# in a source checkout the library sits two folders up.
for folder in (HERE.parents[1], HERE.parent):
    if (folder / "MedVLSAM2Lib").is_dir() or (folder / "MedVLSAM2Core").is_dir():
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))

import numpy as np  # noqa: E402
import slicer  # noqa: E402  (3D Slicer, or the slicer-core wheel)
from MedVLSAM2Core import SceneLogic  # noqa: E402

from MedVLSAM2Lib.errors import MedVLSAM2Error  # noqa: E402

CT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def parse(argv: list[str]) -> argparse.Namespace:
    """The options after the script's path (``sys.argv[1:]``). Slicer hands a ``--python-script`` the arguments
    that follow it; a leading ``--`` (some launch wrappers add one) is dropped."""
    argv = argv[1:] if argv[:1] == ["--"] else argv
    parser = argparse.ArgumentParser(prog="batch_evaluate.py", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--m3dseg", help="M3D_Seg root: segment the test split, Dice against its masks")
    source.add_argument("--folder", help="a folder of CT files (NIfTI, NRRD, MHA) or DICOM series folders")
    parser.add_argument("--datasets", default="0011", help="M3D-Seg codes, comma-separated (default 0011)")
    parser.add_argument("--structures", required=True, help="structures to segment, comma-separated")
    parser.add_argument("--limit", type=int, help="at most N cases (per dataset)")
    parser.add_argument("--report", action="store_true", help="also write a report per case")
    parser.add_argument("--answer", help="skip generation with this answer (with [SEG]): the mask path alone")
    backend = parser.add_mutually_exclusive_group(required=True)
    backend.add_argument("--weights", help="trained checkpoint folder")
    backend.add_argument("--preset", help="random-weight preset (pipeline checks)")
    backend.add_argument("--server", help="a running `medvlsam2 serve`, e.g. http://gpu-box:8765")
    parser.add_argument("--api-key", help="the server's key (default: $MEDVLSAM2_API_KEY)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", required=True, help="output folder")
    return parser.parse_args(argv)


def cases(args: argparse.Namespace) -> list[tuple[str, object, dict]]:
    """``(name, volume loader, {structure: truth mask or None})`` per case."""
    from MedVLSAM2Lib.data.m3dseg import M3DSegDataset
    from MedVLSAM2Lib.errors import InputError
    from MedVLSAM2Lib.volume import read_volume

    structures = [s.strip() for s in args.structures.split(",") if s.strip()]
    found = []
    if args.folder:
        folder = Path(args.folder)
        if not folder.is_dir():
            raise InputError(f"{folder}: no such folder.")
        paths = sorted(
            p for p in folder.iterdir() if p.is_dir() or p.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha"))
        )
        for path in paths[: args.limit]:
            name = path.name.split(".")[0]
            found.append((name, lambda path=path: read_volume(path), dict.fromkeys(structures)))
        return found
    for code in args.datasets.split(","):
        dataset = M3DSegDataset(args.m3dseg, code.strip())
        for case in list(dataset.cases("test"))[: args.limit]:
            present = [s for s in structures if s in case.categories]

            def truths(case=case, present=present) -> dict:
                masks = case.load_masks()
                return {s: np.ascontiguousarray(masks[case.categories.index(s)].transpose(2, 1, 0)) for s in present}

            found.append((f"{code}_{case.name}", case.to_volume, {"__truth__": truths, **dict.fromkeys(present)}))
    return found


def backend(args: argparse.Namespace):  # noqa: ANN201
    if args.server:
        from MedVLSAM2Lib.serving.client import ServerClient

        return ServerClient(args.server, args.api_key)
    from MedVLSAM2Lib.engine import InferenceEngine

    return InferenceEngine.load(args.weights or args.preset, device=args.device)


def save_segmentation(scene, segmentation_node, path: Path) -> None:  # noqa: ANN001
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    partial = path.with_name(path.name.replace(".seg.nrrd", ".partial.seg.nrrd"))
    storage.SetFileName(str(partial))
    if not storage.WriteData(segmentation_node):
        raise OSError(f"{path}: Slicer could not write the segmentation.")
    os.replace(partial, path)
    scene.RemoveNode(storage)


def run_case(logic: SceneLogic, name: str, load, structures: dict, args, out: Path) -> list[dict]:  # noqa: ANN001
    from MedVLSAM2Lib.metrics import dice

    scene = slicer.mrmlScene if hasattr(slicer, "app") else slicer.vtkMRMLScene()
    volume = load()
    node = logic.addVolumeNode(scene, volume, name)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} MedVLSAM2")
    truths = structures.pop("__truth__")() if "__truth__" in structures else {}
    rows = []
    for structure in structures:
        segment_id = logic.segment(node, segmentation, text=structure, answer=args.answer)[0]
        mask = logic.maskFromSegment(segmentation, segment_id, node)
        truth = truths.get(structure)
        score = dice(truth > 0, mask > 0) if truth is not None and truth.any() else None
        rows.append({"case": name, "structure": structure, "voxels": int(mask.sum()),
                     "dice": None if score is None else round(float(score), 6)})  # fmt: skip
    save_segmentation(scene, segmentation, out / f"{name}.seg.nrrd")
    if args.report:
        report = logic.report(node)
        partial = out / f"{name}.report.partial.txt"
        partial.write_text(report.text + "\n", encoding="utf-8")
        os.replace(partial, out / f"{name}.report.txt")
    for created in (segmentation, node):
        scene.RemoveNode(created)
    return rows


def write_table(rows: list[dict], out: Path) -> None:
    with (out / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["case", "structure", "voxels", "dice"])
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| structure | cases | mean Dice |", "|---|---:|---:|"]
    for structure in dict.fromkeys(r["structure"] for r in rows):
        scores = [r["dice"] for r in rows if r["structure"] == structure and r["dice"] is not None]
        mean = f"{np.mean(scores):.4f}" if scores else "–"
        lines.append(f"| {structure} | {len(scores)} | {mean} |")
    (out / "metrics.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        logic = SceneLogic(backend(args), intensity="normalized" if args.m3dseg else "hu")
        todo = cases(args)
    except MedVLSAM2Error as err:
        print(f"batch_evaluate: error: {err}", file=sys.stderr)
        return 2
    previous = out / "metrics.csv"
    rows = []
    if previous.is_file():  # a resumed run keeps the rows of the cases it skips
        for row in csv.DictReader(previous.open()):
            rows.append({**row, "voxels": int(row["voxels"]), "dice": float(row["dice"]) if row["dice"] else None})
    failed = []
    for number, (name, load, structures) in enumerate(todo, 1):
        if (out / f"{name}.seg.nrrd").is_file():
            print(f"[{number}/{len(todo)}] {name}: done earlier, kept")
            continue
        try:
            rows += run_case(logic, name, load, dict(structures), args, out)
            print(f"[{number}/{len(todo)}] {name}: written")
        except MedVLSAM2Error as err:
            failed.append(f"{name}: {err}")
        except Exception:  # one broken case must not end the batch; its traceback is kept in the log
            failed.append(f"{name}: {traceback.format_exc()}")
    write_table(rows, out)
    for line in failed:
        print(f"failed {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if hasattr(slicer, "app"):
        slicer.util.exit(code)
    sys.exit(code)
