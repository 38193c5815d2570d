"""Time InferenceEngine on one CT: encode, a report of N tokens, a second question, a text segmentation and a
box refinement on the cached handle. Random weights (the timing does not depend on them).

    python bench/engine_latency.py --preset paper --device cuda --dtype bfloat16   # the issue's GPU check
    python bench/engine_latency.py --preset tiny --device cpu                      # a dry run of the script

Writes ``bench/results/engine_latency_<preset>_<device>.json`` with the machine and card named.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from MedVLSAM2Lib.config import preset
from MedVLSAM2Lib.demo import default_inputs
from MedVLSAM2Lib.engine import InferenceEngine
from MedVLSAM2Lib.model.medvlsam2 import MedVLSAM2Model
from MedVLSAM2Lib.prompts import BoxPrompt
from MedVLSAM2Lib.volume import read_volume

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(device: torch.device, run):  # noqa: ANN001, ANN202
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--report-tokens", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.device(args.device):
        model = MedVLSAM2Model(preset(args.preset))
    engine = InferenceEngine(model, args.device, args.dtype)
    device = engine.device
    volume = read_volume(default_inputs()[0])
    shape_i, shape_j, shape_k = volume.shape_ijk
    box = BoxPrompt((shape_i * 0.2, shape_j * 0.3, shape_k // 2), (shape_i * 0.5, shape_j * 0.7, shape_k // 2))
    handle, encode_s = _timed(device, lambda: engine.encode(volume))
    report, report_s = _timed(device, lambda: engine.report(handle, max_new_tokens=args.report_tokens))
    _, ask_s = _timed(device, lambda: engine.ask(handle, "Is there a pleural effusion?"))
    text, text_s = _timed(device, lambda: engine.segment(handle, text="right lung", answer="It is [SEG]."))
    _, box_s = _timed(device, lambda: engine.segment(handle, text="right lung", boxes=[box], answer="It is [SEG]."))
    result = {
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "preset": args.preset,
        "dtype": args.dtype,
        "volume": list(volume.array.shape),
        "seconds": {"encode": encode_s, "report": report_s, "second_question": ask_s,
                    "text_segmentation": text_s, "box_refinement_cached": box_s},  # fmt: skip
        "report_tokens": report.tokens,
        "ms_per_report_token": 1000 * report_s / max(report.tokens, 1),
        "segmentation_timings": {k: round(v, 4) for k, v in text.timings.items()},
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "mask_voxels": int(np.sum(text.objects[0].mask)),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"engine_latency_{args.preset}_{device.type}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
