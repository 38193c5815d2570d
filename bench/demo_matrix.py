"""The demo (and optionally the CPU learning test) across the kernels torch can choose and thread counts.

Each cell runs in a fresh process with ``ATEN_CPU_CAPABILITY`` and ``OMP_NUM_THREADS`` set, exactly as a user or CI
would run it:

    python bench/demo_matrix.py                                    # the demo: default/avx2/avx512 x 1/2 threads
    python bench/demo_matrix.py --cells avx512:2 --name timing     # one cell alone: the timing figure
    python bench/demo_matrix.py --learning --cells avx2:2,avx512:1 # Testing/test_learning.py per cell

``--jobs 2`` runs two cells at once (only meaningful with one thread each; their times are then marked as taken
concurrently and are not timing figures). Writes ``bench/results/<name>.json`` and ``.md`` naming the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from MedVLSAM2Lib.demo import DICE_NEEDED
from MedVLSAM2Lib.machine import cpu_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CELLS = "default:1,default:2,avx2:1,avx2:2,avx512:1,avx512:2"


def _environment(capability: str, threads: int) -> dict[str, str]:
    return {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": str(threads)}


def run_demo_cell(capability: str, threads: int) -> dict:
    """``medvlsam2 demo`` in a fresh process; Dice per task and lung, fine-tune and wall seconds."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "demo-output"
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "MedVLSAM2Lib.cli", "demo", "--output", str(output)],
                             capture_output=True, text=True, env=_environment(capability, threads))  # fmt: skip
        wall = time.perf_counter() - start
        if run.returncode != 0:
            return {"capability": capability, "threads": threads, "error": run.stderr.strip().splitlines()[-1:]}
        summary = json.loads((output / "summary.json").read_text())
    dice = {f"{t['task']} {t['target']}": round(t["dice"], 3) for t in summary["tasks"]}
    passed = all(t["dice"] >= DICE_NEEDED.get(t["task"], 0.0) for t in summary["tasks"])
    return {"capability": capability, "threads": threads, "fine_tune_s": summary["training_seconds"],
            "demo_wall_s": round(wall, 1), "dice": dice, "passed": passed,
            "report_right": summary["report"] == _expected_report(),
            "progress_lines": run.stderr.count("\n")}  # fmt: skip


def _expected_report() -> str:
    from MedVLSAM2Lib.demo import _read_inputs
    from MedVLSAM2Lib.demo_training import measurements

    return measurements(*_read_inputs(None, None))[0]


def run_learning_cell(capability: str, threads: int) -> dict:
    """``Testing/test_learning.py`` in a fresh pytest process; its Dice line and outcome."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                          "Testing/test_learning.py"], capture_output=True, text=True, cwd=ROOT,
                         env=_environment(capability, threads))  # fmt: skip
    found = re.search(r"three stages in (\d+) s; Dice (.*)", run.stdout)
    return {"capability": capability, "threads": threads, "wall_s": round(time.perf_counter() - start, 1),
            "passed": run.returncode == 0,
            "result": found.group(0) if found else run.stdout.strip()[-400:]}  # fmt: skip


def _table(rows: list[dict], learning: bool) -> str:
    if learning:
        lines = ["| kernels | threads | passed | wall s | result |", "|---|---|---|---|---|"]
        lines += [f"| {r['capability']} | {r['threads']} | {r['passed']} | {r['wall_s']} | {r['result']} |"
                  for r in rows]  # fmt: skip
        return "\n".join(lines)
    keys = [f"{task} {side} lung" for side in ("right", "left") for task in (*DICE_NEEDED, "points")]
    head = "| kernels | threads | fine-tune s | demo s | " + " | ".join(keys) + " | passed |"
    lines = [head, "|" + "---|" * (len(keys) + 5)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['capability']} | {r['threads']} | error: {r['error']} |")
            continue
        cells = " | ".join(f"{r['dice'][k]:.3f}" for k in keys)
        lines.append(f"| {r['capability']} | {r['threads']} | {r['fine_tune_s']} | {r['demo_wall_s']} | {cells} | "
                     f"{r['passed']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=CELLS, help=f"capability:threads,... (default {CELLS})")
    parser.add_argument("--learning", action="store_true", help="run Testing/test_learning.py instead of the demo")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (times are then not timing figures)")
    parser.add_argument("--name", help="results file stem (default demo_matrix or learning_matrix)")
    args = parser.parse_args()
    cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")]
    run = run_learning_cell if args.learning else run_demo_cell
    def run_and_show(cell: tuple[str, int]) -> dict:
        row = run(*cell)
        print(json.dumps(row), flush=True)  # each cell as it ends, so a long matrix shows its progress
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_and_show, cells))
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "concurrent_jobs": args.jobs, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    name = args.name or ("learning_matrix" if args.learning else "demo_matrix")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    needs = ", ".join(f"{task} >= {value}" for task, value in DICE_NEEDED.items())
    criterion = "every organ Dice >= 0.7 (the test's assertion)" if args.learning else f"on both lungs {needs}"
    text = (f"# {name}\n\nMachine: {machine['cpu']}, {machine['cores']} cores; {args.jobs} cell(s) at a time.\n"
            f"Passed means: {criterion}.\n\n{_table(rows, args.learning)}\n")  # fmt: skip
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
