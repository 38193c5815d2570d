"""Write the slicerio chest CT (``CTChest4.nrrd``, 128×128×34) as an ``.npz`` for the GPU machine.

    python bench/make_ct_npz.py                 # -> .whl/ctchest4.npz (ignored; bench/gpu_check.sh reads it there)

The GPU machine cannot carry SimpleITK (its wheel is 52 MB of the 64 MiB a call may carry), and the benchmark needs
no file reading: it rebuilds the ``Volume`` from ``array`` (KJI, the dtype as read) and ``ijk_to_ras``
(``bench/engine_latency.py --ct .whl/ctchest4.npz``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from MedVLSAM2Lib.demo import default_inputs
from MedVLSAM2Lib.volume import read_volume

DEFAULT = Path(__file__).resolve().parent.parent / ".whl" / "ctchest4.npz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT)
    args = parser.parse_args(argv)
    volume = read_volume(default_inputs()[0])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, array=volume.array, ijk_to_ras=volume.ijk_to_ras)
    with np.load(args.output) as saved:  # what the benchmark will read
        same = np.array_equal(saved["array"], volume.array) and np.array_equal(saved["ijk_to_ras"], volume.ijk_to_ras)
    if not same:
        print(f"{args.output}: does not read back equal to the CT", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.1f} MB): {volume.array.dtype} KJI "
          f"{volume.array.shape}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
