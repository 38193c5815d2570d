"""Wall time of ``medvlsam2 demo`` and of the test suite at two commits, measured in one run (issue 17: "the demo
and the CPU tests are no slower than before").

Each commit is checked out into a temporary git worktree (with ``../shared`` linked beside it, as CI has it) and run
with this checkout's ``.venv``, the worktree first on ``PYTHONPATH``. The demo runs alternate between the commits
(base, head, head, base, ...), so that a machine getting busier or quieter weighs on both alike; then the test files
present at both commits run with ``pytest`` at each commit, once, base first. The files only the head has are listed,
not timed. Writes ``bench/results/before_after_<base>_<head>.json`` and a markdown table beside it.

    python bench/before_after.py --base a2f6ac2 --head HEAD      # about 2 × (demo × runs + suite) on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _test_files(commit: str) -> set[str]:
    names = _git("ls-tree", "--name-only", commit, "Testing/").splitlines()
    return {name for name in names if Path(name).name.startswith("test_") and name.endswith(".py")}


def _timed(command: list[str], cwd: Path, log: Path) -> dict:
    """Run ``command`` in ``cwd`` with that tree's library first on the path; its wall seconds, exit code, log tail."""
    env = {**os.environ, "PYTHONPATH": str(cwd), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 1), "returncode": code, "tail": log.read_text()[-600:]}


def _library_of(tree: Path) -> str:
    """Where a process in ``tree`` imports MedVLSAM2Lib from (the check that the worktree's code is what runs)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    code = "import MedVLSAM2Lib, pathlib; print(pathlib.Path(MedVLSAM2Lib.__file__).parent.parent)"
    run = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=True)
    return run.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit before the change")
    parser.add_argument("--head", default="HEAD", help="the commit with the change (default HEAD)")
    parser.add_argument("--demo-runs", type=int, default=2, help="demo runs per commit (default 2)")
    parser.add_argument("--no-tests", action="store_true", help="time the demo only")
    args = parser.parse_args()
    commits = {"base": _git("rev-parse", "--short", args.base), "head": _git("rev-parse", "--short", args.head)}
    shared = REPO.parent / "shared"
    if not shared.is_dir():
        parser.error(f"{shared} not found: the demo and the tests need the shared corpus beside the checkout")
    output = REPO / "bench" / "results" / f"before_after_{commits['base']}_{commits['head']}.json"
    result: dict = {"commits": commits, "cpu": _cpu_model(), "cores": os.cpu_count(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "demo": {"base": [], "head": []}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="before-after-") as temp:
        root = Path(temp)
        (root / "shared").symlink_to(shared)
        trees = {}
        for side, commit in commits.items():
            trees[side] = root / side
            _git("worktree", "add", "--detach", str(trees[side]), commit)
        try:
            for side, tree in trees.items():
                if Path(_library_of(tree)) != tree:
                    raise SystemExit(f"{side}: MedVLSAM2Lib is not imported from {tree}")
            order = [("base", "head")[(run + (run // 2)) % 2] for run in range(2 * args.demo_runs)]
            for run, side in enumerate(order):
                log = root / f"demo-{run}-{side}.log"
                outcome = _timed(["medvlsam2", "demo"], trees[side], log)
                result["demo"][side].append(outcome)
                print(f"demo {side} ({commits[side]}): {outcome['seconds']} s, exit {outcome['returncode']}",
                      flush=True)  # fmt: skip
            if not args.no_tests:
                common = sorted(_test_files(commits["base"]) & _test_files(commits["head"]))
                result["test_files"] = common
                result["head_only_test_files"] = sorted(_test_files(commits["head"]) - _test_files(commits["base"]))
                for side, tree in trees.items():
                    outcome = _timed([str(VENV_BIN / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      *common], tree, root / f"tests-{side}.log")  # fmt: skip
                    result[f"tests_{side}"] = outcome
                    print(f"tests {side} ({commits[side]}): {outcome['seconds']} s, exit {outcome['returncode']}",
                          flush=True)  # fmt: skip
        finally:
            for tree in trees.values():
                _git("worktree", "remove", "--force", str(tree))
    demo = {side: statistics.median(run["seconds"] for run in runs) for side, runs in result["demo"].items()}
    result["demo_median_s"] = demo
    result["demo_ratio_head_over_base"] = round(demo["head"] / demo["base"], 3)
    if not args.no_tests:
        tests = result["tests_head"]["seconds"] / result["tests_base"]["seconds"]
        result["tests_ratio_head_over_base"] = round(tests, 3)
    output.write_text(json.dumps(result, indent=2) + "\n")
    output.with_suffix(".md").write_text(_table(result) + "\n")
    print(_table(result))
    return 0


def _table(result: dict) -> str:
    base, head = result["commits"]["base"], result["commits"]["head"]
    lines = [f"{result['cpu']}, {result['cores']} cores, one run started {result['started']}; head/base < 1 is faster.",
             "", f"| what | {base} (base) | {head} (head) | head / base |", "|---|---|---|---|"]  # fmt: skip
    runs = {side: ", ".join(f"{run['seconds']:.0f}" for run in result["demo"][side]) for side in ("base", "head")}
    median = result["demo_median_s"]
    lines.append(f"| `medvlsam2 demo`, s (median of {runs['base']} / {runs['head']}) | {median['base']:.0f} | "
                 f"{median['head']:.0f} | {result['demo_ratio_head_over_base']:.3f} |")  # fmt: skip
    if "tests_base" in result:
        count = len(result["test_files"])
        base_s, head_s = result["tests_base"]["seconds"], result["tests_head"]["seconds"]
        lines.append(f"| pytest, the {count} test files of both commits, s | {base_s:.0f} | {head_s:.0f} | "
                     f"{result['tests_ratio_head_over_base']:.3f} |")  # fmt: skip
        only = ", ".join(Path(name).name for name in result["head_only_test_files"])
        lines += ["", f"Only at head (not timed): {only}"]
    failed = [f"{key} exit {value['returncode']}" for key, value in result.items()
              if key.startswith("tests_") and isinstance(value, dict) and value["returncode"]]  # fmt: skip
    failed += [f"demo {side} exit {run['returncode']}" for side in ("base", "head") for run in result["demo"][side]
               if run["returncode"]]  # fmt: skip
    if failed:
        lines += ["", "Failed: " + "; ".join(failed)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
