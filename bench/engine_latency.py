"""Time InferenceEngine (issue 17) against its targets, the naive peer and the decode floor, in one run.

    python bench/engine_latency.py --preset paper --device cuda --dtype bfloat16      # the GPU measurement
    python bench/engine_latency.py --preset tiny --device cpu                         # a dry run of the script

Random weights (the timing does not depend on them), batch 1, through the engine's public methods (``encode``,
``report``, ``segment``, ``warmup``): whatever the engine does is what is measured. On the slicerio chest CT
(34×128×128, or its ``.npz`` from ``bench/make_ct_npz.py`` where SimpleITK is missing) and a 512×512×300 CT made
from it (trilinear, int16 HU; file reading excluded). Every figure is the median of ``--reps`` runs after one
untimed run; on CUDA the device is synchronised around each. In the same run: the naive peer (transformers'
``generate``, dynamic cache, the same LLM with LoRA merged), the device's copy bandwidth and the decode floor it
implies (LLM weight bytes / bandwidth). bench/README.md says what each key means.

Writes ``bench/results/engine_latency_<card>.json`` (``<card>``: the GPU's name, slugged), after every measurement,
so a run stopped by a time limit keeps what it measured. A CPU run is a dry run of the script: it writes
``engine_latency_cpu-dry-run.json``, marked ``"dry_run": true``, whose figures are no GPU figures (not committed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from MedVLSAM2Lib.engine import InferenceEngine, load_model, prompt_answer
from MedVLSAM2Lib.machine import cpu_model
from MedVLSAM2Lib.preprocess import GridConfig, mask_from_probabilities, to_model
from MedVLSAM2Lib.prompts import BoxPrompt
from MedVLSAM2Lib.templates import load_templates
from MedVLSAM2Lib.volume import Volume

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
# Issue 17's targets: warm, one H100/H200, paper preset, bfloat16, batch 1. Each measured key must be at most this.
TARGETS = {
    "report_256_s": 0.8,
    "ms_per_token": 3.1,
    "first_token_s": 0.080,
    "segment_text_s": 0.5,
    "first_segment_s": 0.5,
    "segment_generate_s": 0.7,
    "refine_cached_s": 0.15,
    "refine_cached_512x512x300_s": 0.15,
    "encode_512x512x300_s": 0.5,
    "masks_to_512x512x300_s": 0.2,
    "peak_gpu_gib": 8.0,
}
# The issue's figure for the stock peer with a static cache, compiled (H200, transformers 5.17): "we must beat it".
PEER_STATIC_ISSUE_MS = 6.7
REQUIRED = ("card", "report_256_s", "ms_per_token", "first_token_s", "peer_hf_ms_per_token", "floor_ms_per_token",
            "segment_text_s", "segment_generate_s", "refine_cached_s", "encode_512x512x300_s",
            "masks_to_512x512x300_s", "warmup_s", "load_s", "peak_gpu_gib")  # fmt: skip
TEXT = "right lung"
PACKAGES = ("torch", "transformers", "peft", "sam2", "tokenizers", "huggingface-hub", "numpy")


class Bench:
    """One run: the engine, the CT, the result so far (written after each measurement) and the timing helpers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.start = time.perf_counter()
        self.result: dict[str, Any] = {}
        self.path: Path | None = None
        self.engine: InferenceEngine | None = None
        self.peak_gib = 0.0  # the engine's peak GPU memory so far (the benchmark's own allocations left out)

    # ------------------------------------------------------------------ timing

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, run: Callable[[], Any]) -> tuple[Any, float]:
        """``run()`` and its seconds, the device synchronised before and after."""
        self.sync()
        start = time.perf_counter()
        value = run()
        self.sync()
        return value, time.perf_counter() - start

    def median(self, run: Callable[[], Any], setup: Callable[[], Any] | None = None) -> tuple[float, float, Any]:
        """(median seconds of ``--reps`` timed runs, seconds of the untimed first run, the last value); ``setup``
        runs untimed before each run (e.g. to drop what the previous run cached)."""
        seconds = []
        value = None
        for _ in range(self.args.reps + 1):
            if setup is not None:
                setup()
            value, elapsed = self.timed(run)
            seconds.append(elapsed)
        return statistics.median(seconds[1:]), seconds[0], value

    # ------------------------------------------------------------------ recording

    def record(self, **values: Any) -> None:
        """Add ``values`` to the result and write it (rounded) where it belongs."""
        self.result.update(values)
        self.result["wall_s"] = time.perf_counter() - self.start
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(_rounded(self.result), indent=2) + "\n")

    def measure(self, name: str, work: Callable[[], None]) -> None:
        """Run one measurement; an error is recorded under ``errors`` and the run goes on with the next."""
        print(f"[{time.perf_counter() - self.start:7.1f} s] {name}", flush=True)
        try:
            work()
        except Exception as err:  # one broken measurement must not lose the others; the log keeps its traceback
            self.result.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"[:2000]
            traceback.print_exc()
        self.record()


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # carried without metadata, or absent
        module = sys.modules.get(package.replace("-", "_"))
        return getattr(module, "__version__", None)


def _commit() -> dict[str, Any]:
    """The checkout's commit and whether files differ from it; ``MEDVLSAM2_COMMIT`` where git cannot tell (a copy of
    the working tree without ``.git``)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True)  # fmt: skip
        return {"commit": head.stdout.strip(), "modified_files": [line[3:] for line in status.stdout.splitlines()]}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": os.environ.get("MEDVLSAM2_COMMIT"), "modified_files": None}


def _card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} (CPU dry run)"


def default_output(device: torch.device) -> Path:
    """``bench/results/engine_latency_<card>.json``; ``engine_latency_cpu-dry-run.json`` off the GPU."""
    name = _slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu-dry-run"
    return RESULTS / f"engine_latency_{name}.json"


# ---------------------------------------------------------------------- inputs


def read_ct(path: str | None) -> Volume:
    """The chest CT: an ``.npz`` written by ``bench/make_ct_npz.py`` (``array`` KJI, ``ijk_to_ras``), any volume file,
    or (``None``) the one that ships with slicerio."""
    if path is not None and path.endswith(".npz"):
        with np.load(path) as data:
            return Volume(data["array"], data["ijk_to_ras"], {"source_path": path})
    from MedVLSAM2Lib.demo import default_inputs
    from MedVLSAM2Lib.volume import read_volume

    return read_volume(path or default_inputs()[0])


def big_ct(ct: Volume, shape_ijk: tuple[int, int, int], device: torch.device) -> Volume:
    """``ct`` resampled (trilinear, on ``device``) to ``shape_ijk`` voxels over the same extent, rounded to int16 HU:
    a CT of that size with real anatomy, as a 512×512×300 scan would be held in memory (file reading excluded)."""
    i, j, k = shape_ijk
    with torch.inference_mode():
        array = torch.from_numpy(ct.array.astype(np.float32)).to(device)[None, None]
        array = torch.nn.functional.interpolate(array, size=(k, j, i), mode="trilinear", align_corners=False)
        array = array[0, 0].round().clamp(-32768, 32767).to(torch.int16).cpu().numpy()
    scale = np.asarray(ct.shape_ijk, dtype=float) / np.asarray(shape_ijk, dtype=float)
    ijk_to_ras = ct.ijk_to_ras.copy()
    ijk_to_ras[:3, :3] = ct.ijk_to_ras[:3, :3] * scale  # the same extent: voxel j of the new grid spans scale voxels
    ijk_to_ras[:3, 3] = ct.ijk_to_ras[:3, :3] @ (scale / 2 - 0.5) + ct.ijk_to_ras[:3, 3]  # voxel centres realigned
    return Volume(array, ijk_to_ras, {"source_path": f"{ct.metadata.get('source_path')} resampled to {shape_ijk}"})


def lung_box(volume: Volume) -> BoxPrompt:
    """A box around the right lung on the middle slice of the chest CT (or a CT made from it)."""
    i, j, k = volume.shape_ijk
    return BoxPrompt((i * 0.2, j * 0.3, k // 2), (i * 0.5, j * 0.7, k // 2))


def blob(shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Smooth probabilities ``(D, H, W)`` of an ellipsoid filling half the grid, as a mask head gives."""
    axes = [torch.linspace(-1, 1, n, device=device) for n in shape]
    d, h, w = torch.meshgrid(*axes, indexing="ij")
    return torch.sigmoid((0.5 - (d**2 + h**2 + w**2).sqrt()) * 20)


# ---------------------------------------------------------------------- measurements


def measure_report(bench: Bench, engine: InferenceEngine, handle: Any) -> None:
    """``report`` of ``--report-tokens`` tokens: end to end, to the first streamed text, and per token after it."""
    first: list[float] = []

    def run() -> Any:
        mark = time.perf_counter()
        first.clear()

        def on_token(_: str) -> None:
            if not first:
                first.append(time.perf_counter() - mark)

        report = engine.report(handle, on_token=on_token, max_new_tokens=bench.args.report_tokens)
        return report, first[0] if first else math.nan

    runs = []
    for _ in range(bench.args.reps + 1):
        (report, to_first), seconds = bench.timed(run)
        runs.append((seconds, to_first, report.tokens))
    timed = runs[1:]
    total = statistics.median(r[0] for r in timed)
    per_token = statistics.median((r[0] - r[1]) / max(r[2] - 1, 1) for r in timed)
    bench.record(report_256_s=total, first_token_s=statistics.median(r[1] for r in timed),
                 ms_per_token=1000 * per_token, report_tokens=timed[-1][2],
                 report_first_call_s=runs[0][0])  # fmt: skip


def measure_segments(bench: Bench, engine: InferenceEngine, ct: Volume) -> None:
    """Text segmentation on an encoded CT whose SAM2 features are not cached yet (answer given; with generation),
    then box refinements on the cached CT (the box alone; the text, the box and the answer)."""
    handle = engine.encode(ct)
    box = lung_box(ct)

    def fresh_sam() -> None:  # the CT encoded (ViT, visual tokens) but SAM2 not run on it yet
        engine.forget(handle.key)
        engine.encode(ct)

    text, first, result = bench.median(lambda: engine.segment(handle, text=TEXT, answer=prompt_answer()), fresh_sam)
    bench.record(segment_text_s=text, first_segment_s=first,
                 segment_timings={k: round(v, 4) for k, v in result.timings.items()},
                 mask_voxels=int(np.sum(result.objects[0].mask)))  # fmt: skip
    generated, _, result = bench.median(lambda: engine.segment(handle, text=TEXT, boxes=[box]), fresh_sam)
    bench.record(segment_generate_s=generated, segment_generate_answer=result.answer,
                 segment_generate_from_prompts=result.from_prompts)  # fmt: skip
    refine, _, _ = bench.median(lambda: engine.segment(handle, boxes=[box]))
    with_text, _, _ = bench.median(lambda: engine.segment(handle, text=TEXT, boxes=[box], answer=prompt_answer()))
    bench.record(refine_cached_s=refine, refine_text_cached_s=with_text)


def measure_big(bench: Bench, engine: InferenceEngine, ct: Volume) -> None:
    """The CT made ``--big-shape`` voxels: encoding it, a box refinement on it cached, and mapping model-grid
    probabilities back to its grid as the engine does after SAM2 (``preprocess.mask_from_probabilities``)."""
    shape = tuple(bench.args.big_shape)
    note_peak(bench)
    big, made = bench.timed(lambda: big_ct(ct, shape, bench.device))
    if bench.device.type == "cuda":  # making the CT is the benchmark's, not the engine's: its memory is left out
        torch.cuda.reset_peak_memory_stats(bench.device)
    bench.record(big_shape_ijk=list(shape), big_ct_made_s=made)
    handle = engine.encode(big)
    encode, _, _ = bench.median(lambda: engine.encode(big), lambda: engine.forget(handle.key))
    bench.record(encode_512x512x300_s=encode)
    refine, _, _ = bench.median(lambda: engine.segment(handle, boxes=[lung_box(big)]))
    bench.record(refine_cached_512x512x300_s=refine)
    grid = engine.model.config.vision.img_size
    _, record = to_model(big, GridConfig(spatial_size=grid), device=engine.device)
    probabilities = blob(grid, engine.device)
    masks, _, (mask, _) = bench.median(lambda: mask_from_probabilities(probabilities, record))
    bench.record(masks_to_512x512x300_s=masks, masks_shape_kji=list(mask.shape))


def _autocast(engine: InferenceEngine) -> contextlib.AbstractContextManager:
    if engine.device.type == "cuda" and engine.dtype != torch.float32:
        return torch.autocast("cuda", dtype=engine.dtype)
    return contextlib.nullcontext()


def measure_peer(bench: Bench, engine: InferenceEngine, static: bool = False) -> None:
    """The naive peer: transformers' ``generate`` (greedy, the dynamic cache; ``static``: its static cache, which
    transformers compiles) on the engine's LLM (LoRA merged) and the report prompt with image tokens. Per token:
    (time for N tokens − time for 1) / (N − 1), so its prefill is left out."""
    model = engine.model
    ids = torch.tensor([model.prompt_ids(load_templates().report_questions[0])], device=engine.device)
    base = model.llm.get_base_model()
    shape = (1, model.config.projector.out_tokens, base.config.hidden_size)
    visual = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02  # the timing ignores the image
    with torch.inference_mode():
        embeds = model.embed(None, ids, visual.to(engine.device, engine.dtype))
    extra = {"cache_implementation": "static"} if static else {}

    def generate(tokens: int) -> int:
        with torch.inference_mode(), _autocast(engine):
            out = base.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                do_sample=False, pad_token_id=model.tokens.pad, **extra)  # fmt: skip
        return out.shape[1]

    tokens = bench.args.peer_tokens
    many, _, made = bench.median(lambda: generate(tokens))
    one, _, _ = bench.median(lambda: generate(1))
    key = "peer_hf_static_ms_per_token" if static else "peer_hf_ms_per_token"
    bench.record(**{key: 1000 * (many - one) / max(made - 1, 1), f"{key.removesuffix('_ms_per_token')}_tokens": made})


def measure_bandwidth(bench: Bench, engine: InferenceEngine) -> None:
    """Device-to-device copy of a ``--copy-mib`` buffer: bytes read and written per second; the decode floor is the
    LLM's weight bytes (each read once per token) over it."""
    size = bench.args.copy_mib << 20
    source = torch.empty(size, dtype=torch.uint8, device=engine.device)
    target = torch.empty_like(source)
    reps = 10
    target.copy_(source)
    _, seconds = bench.timed(lambda: [target.copy_(source) for _ in range(reps)])
    bandwidth = 2 * size * reps / seconds
    weight_bytes = llm_weight_bytes(engine)
    bench.record(copy_bandwidth_gb_per_s=bandwidth / 1e9, llm_weight_gb=weight_bytes / 1e9,
                 floor_ms_per_token=1000 * weight_bytes / bandwidth)  # fmt: skip


def llm_weight_bytes(engine: InferenceEngine) -> int:
    """Bytes of the LLM weights one decode step reads: every base weight once (a tied head counted once), LoRA merged
    (its adapter tensors unread), the input embedding left out when untied (one row per token)."""
    base = engine.model.llm.get_base_model()
    used = {}
    for name, parameter in base.named_parameters():
        if "lora_" in name or "trainable_tokens_" in name:
            continue
        used[parameter.data_ptr()] = (name, parameter.numel() * parameter.element_size())
    head = {p.data_ptr() for n, p in base.named_parameters() if n.startswith("lm_head")}
    return sum(size for ptr, (name, size) in used.items() if "embed_tokens" not in name or ptr in head)


def note_peak(bench: Bench) -> None:
    """Fold the allocator's peak since its last reset into ``bench.peak_gib`` (on the CPU: the process's peak RSS)."""
    if bench.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(bench.device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    bench.peak_gib = max(bench.peak_gib, peak)


def verdict(result: dict[str, Any]) -> None:
    """``targets``, ``meets`` (each measured key: at most its target?) and ``over_target`` (measured / target)."""
    measured = {k: result[k] for k in TARGETS if isinstance(result.get(k), float) and math.isfinite(result[k])}
    result["targets"] = dict(TARGETS)
    result["meets"] = {k: v <= TARGETS[k] for k, v in measured.items()}
    result["over_target"] = {k: v / TARGETS[k] for k, v in measured.items()}
    if isinstance(result.get("ms_per_token"), float) and isinstance(result.get("peer_hf_ms_per_token"), float):
        result["meets"]["beats_peer_hf"] = result["ms_per_token"] < result["peer_hf_ms_per_token"]
    if isinstance(result.get("ms_per_token"), float):
        measured_static = isinstance(result.get("peer_hf_static_ms_per_token"), float)
        peer_static = result["peer_hf_static_ms_per_token"] if measured_static else PEER_STATIC_ISSUE_MS
        result["peer_hf_static_reference"] = "measured in this run" if measured_static else "issue 17 (H200)"
        result["meets"]["beats_peer_hf_static"] = result["ms_per_token"] < peer_static


# ---------------------------------------------------------------------- the run


def _shape(text: str) -> tuple[int, int, int]:
    values = [int(v) for v in text.split(",")]
    if len(values) != 3 or min(values) < 2:
        raise argparse.ArgumentTypeError(f"expected I,J,K (three sizes >= 2), got {text!r}")
    return values[0], values[1], values[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="the engine's compile_decoding: auto = on for CUDA")  # fmt: skip
    parser.add_argument("--ct", help="the chest CT: .npz (bench/make_ct_npz.py) or a volume file; default: slicerio's")
    parser.add_argument("--report-tokens", type=int, default=256)
    parser.add_argument("--peer-tokens", type=int, default=64, help="tokens per peer generate (per-token figure)")
    parser.add_argument("--peer-static", action="store_true", help="also time the peer's compiled static cache")
    parser.add_argument("--big-shape", type=_shape, default=(512, 512, 300), help="I,J,K of the large CT")
    parser.add_argument("--copy-mib", type=int, default=None, help="copy buffer (default: 2048 on CUDA, 256 on CPU)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per figure, after one untimed")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip --peer-static once this much time passed")
    parser.add_argument("--output", type=Path, help="the JSON to write (default: bench/results/engine_latency_<card>)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.report_tokens < 2 or args.peer_tokens < 2:
        parser.error("--reps must be at least 1, --report-tokens and --peer-tokens at least 2 (a per-token figure)")
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.copy_mib = args.copy_mib or (2048 if cuda else 256)
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, in the order that keeps the peak memory the engine's own; returns the result."""
    bench = Bench(args)
    device = bench.device
    torch.manual_seed(0)
    compile_decoding = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    bench.path = args.output or default_output(device)
    bench.record(card=_card(device), dry_run=device.type != "cuda", preset=args.preset, device=str(device),
                 dtype=args.dtype, compile_decoding=compile_decoding, reps=args.reps,
                 machine={"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "date": date.today().isoformat()},
                 versions={p: _version(p) for p in PACKAGES}, **_commit())  # fmt: skip

    def load() -> None:  # InferenceEngine.load's two steps, with the engine's compile flag
        def build() -> InferenceEngine:
            return InferenceEngine(load_model(args.preset), device, args.dtype, compile_decoding=compile_decoding)

        bench.engine, seconds = bench.timed(build)
        bench.record(load_s=seconds, fast_path=bench.engine.fast)
        if device.type == "cuda":
            bench.record(resident_gpu_gib=torch.cuda.memory_allocated(device) / 2**30)

    bench.measure("load", load)
    engine = bench.engine
    if engine is None:
        return bench.result
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def warmup() -> None:
        nonlocal engine
        try:
            steps, seconds = bench.timed(engine.warmup)
        except Exception as err:
            if not compile_decoding:
                raise
            # The compiled decode step failed (it compiles on its first call): measure the engine without it.
            print(f"    compiled decoding failed ({type(err).__name__}: {err}); measuring without it", flush=True)
            bench.record(compile_decoding=False, compile_error=f"{type(err).__name__}: {err}"[:2000])
            engine = InferenceEngine(engine.model, device, args.dtype, compile_decoding=False)
            steps, seconds = bench.timed(engine.warmup)
        bench.record(warmup_s=seconds, warmup_steps=steps)

    bench.measure("warmup", warmup)
    ct = read_ct(args.ct)
    bench.record(ct={"source": str(ct.metadata.get("source_path")), "shape_kji": list(ct.array.shape)})
    handle = engine.encode(ct)
    bench.measure("report", lambda: measure_report(bench, engine, handle))
    bench.measure("segment", lambda: measure_segments(bench, engine, ct))
    bench.measure("512x512x300", lambda: measure_big(bench, engine, ct))
    note_peak(bench)
    what = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (CPU dry run)"
    bench.record(peak_gpu_gib=bench.peak_gib, peak_memory_of=what)
    bench.measure("peer", lambda: measure_peer(bench, engine))
    bench.measure("bandwidth", lambda: measure_bandwidth(bench, engine))
    verdict(bench.result)
    bench.record()
    if args.peer_static and time.perf_counter() - bench.start < args.budget_s:
        bench.measure("peer static", lambda: measure_peer(bench, engine, static=True))
        verdict(bench.result)
        bench.record()
    return bench.result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(_rounded(result), indent=2))
    print(f"wrote {args.output or default_output(torch.device(args.device))}")
    missing = [k for k in REQUIRED if not isinstance(result.get(k), int | float | str)]
    if missing or result.get("errors"):
        print(f"incomplete: missing {missing}, errors {sorted(result.get('errors', {}))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
