#!/usr/bin/env bash
# Issue 17's one prepared device run: bench/engine_latency.py with the paper preset in bfloat16 on the GPU machine
# (H100/H200), from the repository root there, the ignored folder .whl/ carried. Prepare it here first:
#
#   bash bench/fetch_gpu_wheels.sh                       # here: wheels and the CT as .npz into .whl/
#   MEDVLSAM2_COMMIT=<commit> bash bench/gpu_check.sh    # there (device tool: carry [".whl"], timeout_s 540)
#
# Installs the wheels into /tmp/site (no pip install of the project: it runs from PYTHONPATH), checks that the
# carried versions are the ones imported, then runs the benchmark under a time limit (BENCH_TIMEOUT_S, default 450 s:
# with the install and the machine's start, inside one 10-minute command). The benchmark writes its JSON after every
# measurement, so a run stopped by the limit keeps what it measured; the optional compiled static-cache peer runs
# last and only while the run is inside --budget-s. Writes bench/results/engine_latency_<card>.json, its markdown
# table and this script's log, and copies them into $OUT when the device tool sets it. Expected: about 4-6 minutes.
# BENCH_ARGS replaces the benchmark's arguments and SITE the install folder: a rehearsal on a CPU machine is
#   SITE=/tmp/rehearsal BENCH_ARGS="--preset tiny --device cpu --report-tokens 8 --big-shape 64,64,40" \
#     PATH=<a folder whose python3 is .venv/bin/python>:$PATH bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out" bench/results
stamp=$(mktemp)
exec > >(tee -a "$out/gpu_check.log") 2>&1

echo "== $(date -u +%FT%TZ) gpu_check at commit ${MEDVLSAM2_COMMIT:-unknown}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! ls .whl/*.whl >/dev/null 2>&1 || [ ! -f .whl/ctchest4.npz ]; then
  echo "no wheels or CT in .whl/: run 'bash bench/fetch_gpu_wheels.sh' where PyPI is reachable, carry .whl"
  exit 2
fi
site=${SITE:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
  || exit 3
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# The carried packages must be the ones Python imports (PYTHONPATH comes before the image's site-packages).
python3 - <<'EOF' || exit 4
import glob, importlib.metadata as metadata, os, sys
import torch
carried = {os.path.basename(w).split("-")[0]: os.path.basename(w).split("-")[1] for w in glob.glob(".whl/*.whl")}
wrong = {}
for name, wanted in carried.items():
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have != wanted:
        wrong[name] = (wanted, have)
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")
print("carried:", ", ".join(f"{k} {v}" for k, v in sorted(carried.items())))
import MedVLSAM2Lib.engine, sam2, transformers, peft  # noqa: E401,F401 - everything the benchmark imports
sys.exit(f"carried packages not the ones imported: {wrong}" if wrong else 0)
EOF

# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
timeout --signal=INT --kill-after=30 "${BENCH_TIMEOUT_S:-450}" python3 bench/engine_latency.py --ct .whl/ctchest4.npz \
  ${BENCH_ARGS:---preset paper --device cuda --dtype bfloat16 --peer-static --budget-s 300}
status=$?
echo "== engine_latency.py exited with $status after $SECONDS s"
for result in $(find bench/results -name 'engine_latency_*.json' -newer "$stamp"); do
  python3 bench/latency_table.py "$result" | tee "${result%.json}.md"
  if [ "$out" != bench/results ]; then
    cp "$result" "${result%.json}.md" "$out"/
  fi
done
rm -f "$stamp"
exit $status
