"""The demo (or one of the CPU learning tests) across the kernels torch can choose and thread counts.

Each cell runs in a fresh process with ``ATEN_CPU_CAPABILITY`` and ``OMP_NUM_THREADS`` set, exactly as a user or CI
would run it:

    python bench/demo_matrix.py                                    # the demo: default/avx2/avx512 x 1/2 threads
    python bench/demo_matrix.py --cells avx512:2 --name timing     # one cell alone: the timing figure
    python bench/demo_matrix.py --test learning --cells avx2:2     # Testing/test_learning.py per cell
    python bench/demo_matrix.py --test overfit                     # Testing/test_overfit.py per cell

``--jobs 2`` runs two cells at once (only meaningful with one thread each; their times are then marked as taken
concurrently and are not timing figures). Writes ``bench/results/<name>.json`` and ``.md`` naming the CPU model.
"""

from __future__ import annotations

import argparse
import functools
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
from MedVLSAM2Lib.machine import cpu_model, unsupported_capability

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("semantic", "referring", "box", "points")
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
            "progress_lines": run.stderr.count("\n"), "stdout": run.stdout, "stderr": run.stderr}  # fmt: skip


def _expected_report() -> str:
    from MedVLSAM2Lib.demo import _read_inputs
    from MedVLSAM2Lib.demo_training import measurements

    return measurements(*_read_inputs(None, None))[0]


# The learning tests, each with the line it prints to summarise its result.
TESTS = {"learning": ("Testing/test_learning.py", r"three stages in (\d+) s; Dice .*"),
         "overfit": ("Testing/test_overfit.py", r"overfit: .*")}  # fmt: skip


def run_test_cell(test: str, capability: str, threads: int) -> dict:
    """One of :data:`TESTS` in a fresh pytest process; its summary line and outcome."""
    path, summary = TESTS[test]
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", path],
                         capture_output=True, text=True, cwd=ROOT, env=_environment(capability, threads))  # fmt: skip
    found = re.search(summary, run.stdout)
    return {"capability": capability, "threads": threads, "wall_s": round(time.perf_counter() - start, 1),
            "passed": run.returncode == 0,
            "result": found.group(0) if found else run.stdout.strip()[-400:]}  # fmt: skip


def _table(rows: list[dict], test: str | None) -> str:
    keys = [f"{task} {side} lung" for side in ("right", "left") for task in TASKS]
    head = ["passed", "wall s", "result"] if test else ["fine-tune s", "demo s", *keys, "passed"]
    lines = ["| kernels | threads | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 2)]
    for r in rows:
        if "error" in r:
            cells = [f"error: {r['error']}"]
        elif test:
            cells = [r["passed"], r["wall_s"], r["result"]]
        else:
            cells = [r["fine_tune_s"], r["demo_wall_s"], *(f"{r['dice'][k]:.3f}" for k in keys), r["passed"]]
        lines.append(f"| {r['capability']} | {r['threads']} | " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=CELLS, help=f"capability:threads,... (default {CELLS})")
    parser.add_argument("--test", choices=sorted(TESTS), help="run this learning test instead of the demo")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (times are then not timing figures)")
    parser.add_argument("--name", help="results file stem (default demo_matrix or <test>_matrix)")
    args = parser.parse_args()
    cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")]
    run = functools.partial(run_test_cell, args.test) if args.test else run_demo_cell

    def run_and_show(cell: tuple[str, int]) -> dict:
        unsupported = unsupported_capability(cell[0])
        row = {"capability": cell[0], "threads": cell[1], "error": [unsupported]} if unsupported else run(*cell)
        print(json.dumps(row), flush=True)  # each cell as it ends, so a long matrix shows its progress
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_and_show, cells))
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
               "concurrent_jobs": args.jobs, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    name = args.name or (f"{args.test}_matrix" if args.test else "demo_matrix")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    needs = ", ".join(f"{task} >= {value}" for task, value in DICE_NEEDED.items())
    criterion = f"{TESTS[args.test][0]} passed" if args.test else f"on both lungs {needs}"
    text = (f"# {name}\n\nMachine: {machine['cpu']}, {machine['cores']} cores; {args.jobs} cell(s) at a time.\n"
            f"Passed means: {criterion}.\n\n{_table(rows, args.test)}\n")  # fmt: skip
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
