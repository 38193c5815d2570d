"""The ``medvlsam2`` command line: ``demo`` and ``doctor`` (more subcommands arrive with the engine).

The only place (with the Slicer Widget) that turns library errors into messages and exit codes:
a :class:`MedVLSAM2Error` prints one line and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import platform
import sys
from collections.abc import Sequence

from .errors import MedVLSAM2Error

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
    import numpy as np

    from .demo import run_demo

    result = run_demo(
        args.output, volume_path=args.volume, segmentation_path=args.segmentation, target=args.target, seed=args.seed
    )
    volume, record = result.volume, result.record
    np.set_printoptions(precision=3, suppress=True)
    print(f"volume      {volume.metadata.get('source_path')}")
    print(
        f"            {volume.array.shape[2]}x{volume.array.shape[1]}x{volume.array.shape[0]} voxels (I x J x K), "
        f"spacing {np.round(volume.spacing, 3).tolist()} mm, axes {''.join(volume.axcodes)}, "
        f"HU {volume.array.min()}..{volume.array.max()}"
    )
    print(
        f"model grid  {record.spatial_size} (D, H, W) from the canonical (LPS) crop "
        f"{record.crop_start}..{record.crop_stop} (KJI), "
        f"min-max {record.intensity_range[0]:.0f}..{record.intensity_range[1]:.0f} -> [0, 1]"
    )
    print("round trip  volume -> model grid -> volume, Dice per segment:")
    for name, score in result.dice_per_segment.items():
        print(f"            {name:<28} {score:.4f}")
    print(f"prompts     target '{result.target}' (seed {args.seed})")
    for point, model in zip(result.points, result.points_model, strict=True):
        print(f"            point ijk {np.round(point.ijk, 1).tolist()} -> model whd {np.round(model.ijk, 1).tolist()}")
    print(
        f"            box ijk {np.round(result.box.min_ijk, 1).tolist()}..{np.round(result.box.max_ijk, 1).tolist()}"
        f" -> model whd {np.round(result.box_model.min_ijk, 1).tolist()}.."
        f"{np.round(result.box_model.max_ijk, 1).tolist()}"
    )
    print("wrote       " + "\n            ".join(str(p) for p in result.files))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .config import preset
    from .data import ctrate, m3dseg
    from .data.cache import prepare
    from .preprocess import GridConfig

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

        window = None if args.dataset == "m3dseg" else config.segmenter.window  # M3D-Seg images are z-scored, not HU
        entries = prepare(items, args.destination, GridConfig(spatial_size=config.vision.img_size), window,
                          workers=args.workers, on_progress=progress)  # fmt: skip
    print(f"prepared    {len(entries)} volumes in {args.destination} (grid {config.vision.img_size})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .training.config import load_train_config
    from .training.trainer import train

    overrides = {"preset": args.preset, "max_steps": args.max_steps, "output_dir": args.output_dir}
    config = load_train_config(args.config, overrides)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medvlsam2", description="MedVL-SAM2: 3D CT report generation, VQA and segmentation."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the embedded-default demo on a real chest CT shipped with slicerio")
    demo.add_argument("--output", default="demo-output", help="output folder (default: demo-output)")
    demo.add_argument("--volume", help="another CT volume instead of the packaged one")
    demo.add_argument("--segmentation", help="a .seg.nrrd on the volume's grid (needed with --volume)")
    demo.add_argument("--target", default="right lung", help="segment to synthesise prompts on")
    demo.add_argument("--seed", type=int, default=0, help="random seed for prompt synthesis")
    demo.set_defaults(run=_demo)
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
    doctor = commands.add_parser("doctor", help="print versions, devices and import checks")
    doctor.add_argument(
        "--preset", choices=["tiny", "small", "paper"], help="also print a preset's parameters per module"
    )
    doctor.set_defaults(run=_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medvlsam2`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command == "demo" and bool(args.volume) != bool(args.segmentation):
        print("medvlsam2 demo: give --volume and --segmentation together", file=sys.stderr)
        return 2
    if args.command == "prepare" and not (args.code if args.dataset == "m3dseg" else args.reports):
        print(f"medvlsam2 prepare: {args.dataset} needs {'--code' if args.dataset == 'm3dseg' else '--reports'}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        return args.run(args)
    except MedVLSAM2Error as err:
        print(f"medvlsam2 {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
