"""The README's worked evaluation: the tiny preset on the shared corpus, tables beside the paper's rows.

Builds a CT-RATE ``dataset`` folder and an ``M3D_Seg`` root in their real layouts from ``../shared/data`` (two
CT-RATE reports and CT-CHAT-style VQA turns on two TotalSegmentator CTs; two M3D-Seg-style cases of subject A with
four organs: ``Testing/eval_fixtures.py``), then runs ``medvlsam2 evaluate report|vqa|seg --preset tiny`` with
``--compare ../shared/paper/paper-facts.json`` exactly as a user would, and prints each ``tables.md``::

    python examples/evaluate_shared_corpus.py --out eval-example

The tiny preset has random weights: its scores are near zero. What the example shows is the pipeline and the
tables' shape beside the paper's, not a result. Segmentation runs with ``--forced-answer`` (the mask path alone:
random weights rarely emit ``[SEG]``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "Testing"))

from eval_fixtures import build_ctrate, build_m3dseg  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="eval-example", help="output folder (must not exist)")
    parser.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the shared folder (data/, paper/)")
    args = parser.parse_args()
    out, shared = Path(args.out), Path(args.shared)
    if out.exists():
        parser.error(f"{out} exists; choose a new --out")
    data = build_ctrate(out / "data" / "ctrate", shared / "data"), build_m3dseg(out / "data" / "m3d", shared / "data")
    compare = str(shared / "paper" / "paper-facts.json")
    seg = [str(data[1]), "--datasets", "0011", "--forced-answer"]
    runs = {"report": [str(data[0])], "vqa": [str(data[0])], "seg": seg}
    for task, extra in runs.items():
        command = [sys.executable, "-m", "MedVLSAM2Lib.cli", "evaluate", task, "--preset", "tiny", "--device", "cpu",
                   "--out", str(out / task), "--compare", compare, "--data", *extra]  # fmt: skip
        start = time.perf_counter()
        if subprocess.run(command, stdout=subprocess.DEVNULL).returncode:
            return 1  # medvlsam2 printed the error
        print(f"<!-- medvlsam2 evaluate {task}: {time.perf_counter() - start:.0f} s -->")
        print((out / task / "tables.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
