"""Render ``bench/engine_latency.py``'s JSON as the README's performance table (markdown), naming the card.

    python bench/latency_table.py bench/results/engine_latency_nvidia-h200.json

A dry run (CPU) is rendered under a heading that says so: its figures are no GPU figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

# (key, what it is, unit): unit "s" seconds, "ms" milliseconds, "GiB".
ROWS = (
    ("report_256_s", "report of {report_tokens} tokens, end to end", "s"),
    ("ms_per_token", "per token after the first", "ms"),
    ("first_token_s", "first streamed token", "s"),
    ("peer_hf_ms_per_token", "naive peer: transformers `generate`, dynamic cache, LoRA merged (per token)", "ms"),
    ("peer_hf_static_ms_per_token", "peer with transformers' static cache, compiled (per token)", "ms"),
    (
        "floor_ms_per_token",
        "decode floor: {llm_weight_gb:.2f} GB of LLM weights / {copy_bandwidth_gb_per_s:.0f} GB/s",
        "ms",
    ),
    ("segment_text_s", "text segmentation, cached volume, answer given, SAM2 image encoder included", "s"),
    ("first_segment_s", "the first text segmentation after load and warmup", "s"),
    ("segment_generate_s", "text segmentation with generation (and a box: random weights may give no [SEG])", "s"),
    ("refine_cached_s", "box refinement, cached volume (the box alone)", "s"),
    ("refine_text_cached_s", "box refinement, cached volume (text, box and answer)", "s"),
    ("refine_cached_512x512x300_s", "box refinement, cached {big} volume", "s"),
    ("encode_512x512x300_s", "encode a {big} CT (file reading excluded)", "s"),
    ("masks_to_512x512x300_s", "masks back onto the {big} grid", "s"),
    ("warmup_s", "`warmup()` after load", "s"),
    ("load_s", "load (preset or checkpoint to ready)", "s"),
    ("peak_gpu_gib", "peak memory ({peak_memory_of})", "GiB"),
)

PEER_TARGETS = {
    "peer_hf_ms_per_token": "the engine beats it",
    "peer_hf_static_ms_per_token": "the engine beats it",
}


def _value(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "GiB":
        return f"{value:.2f} GiB"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _mark(result: dict[str, Any], key: str) -> str:
    meets = result.get("meets", {})
    if key in meets:
        return "yes" if meets[key] else f"no ({result['over_target'][key]:.2f}× the target)"
    beaten = {"peer_hf_ms_per_token": "beats_peer_hf", "peer_hf_static_ms_per_token": "beats_peer_hf_static"}
    if beaten.get(key) in meets:
        return "yes" if meets[beaten[key]] else "no"
    return ""


def render_table(result: dict[str, Any]) -> str:
    """The performance table of one ``engine_latency`` result: a heading naming the card and the run, then one row per
    measured key with its target (``≤``) and whether it is met (or by how many times it is missed)."""
    big = "×".join(str(n) for n in result.get("big_shape_ijk", (512, 512, 300)))
    facts = {"report_tokens": result.get("report_tokens", 256), "big": big, "llm_weight_gb": math.nan,
             "copy_bandwidth_gb_per_s": math.nan, "peak_memory_of": "GPU memory", **result}  # fmt: skip
    run = (f"{result.get('preset')} preset, {result.get('dtype')}, compiled decode step: "
           f"{'yes' if result.get('compile_decoding') else 'no'}, random weights, batch 1, commit "
           f"{str(result.get('commit') or 'unknown')[:10]}, {result.get('machine', {}).get('date', '')}")  # fmt: skip
    if result.get("dry_run"):
        cpu = result.get("machine", {}).get("cpu", "unknown CPU")
        heading = f"**Dry run on a CPU ({cpu}), not GPU figures**: the targets are for one H100/H200. {run}."
    else:
        heading = f"**{result['card']}**: {run}."
    lines = [heading, "", "| what | measured | target | met |", "|---|---|---|---|"]
    targets = result.get("targets", {})
    for key, what, unit in ROWS:
        value = result.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        target = f"≤ {_value(targets[key], unit)}" if key in targets else PEER_TARGETS.get(key, "")
        lines.append(f"| {what.format(**facts)} | {_value(value, unit)} | {target} | {_mark(result, key)} |")
    errors = result.get("errors")
    if errors:
        lines += ["", "Not measured: " + "; ".join(f"{name} ({error})" for name, error in errors.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a bench/results/engine_latency_*.json")
    args = parser.parse_args(argv)
    sys.stdout.write(render_table(json.loads(args.result.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
