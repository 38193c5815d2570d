"""Memory per decoded voxel on the server's upload path (issue 20, item 1: decompression amplification).

A volume upload is decoded (``volume_from_frame``) and encoded (``InferenceEngine.encode``: check, content key,
model grid, ViT) while the server holds its model lock, so what these take per decoded byte bounds what one request
can make the server allocate. Measure: the growth of the peak resident set (VmHWM, reset through
``/proc/self/clear_refs``) over the resident set just before decoding, divided by the decoded size, in a fresh
process that holds only the tiny model and the frame. Threshold: under 4. Measured on a 256×512×512 int16 CT-like
volume (128 MiB decoded, a 30 MiB frame): 11.1 before (a copy of the blob, a second copy by astype, a full copy
for the content key, then a contiguous canonical copy, a float32 copy, a mask, the foreground indices (three int64
per foreground voxel) and float temporaries in ``to_model``); 1.26 after. And a frame that declares more than the
limit is refused from its header: nothing is inflated and nothing of its declared size allocated.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from MedVLSAM2Lib.engine import _volume_key
from MedVLSAM2Lib.errors import TooLargeError
from MedVLSAM2Lib.serving import protocol
from MedVLSAM2Lib.serving.protocol import MAGIC, Limits, unpack
from MedVLSAM2Lib.volume import Volume, check_ct

REPO = Path(__file__).resolve().parents[1]
MAX_RATIO = 4.0

# Runs in a fresh interpreter: argv = K J I; prints one JSON line.
MEASURE = r"""
import ctypes, json, sys
import numpy as np
from MedVLSAM2Lib.engine import InferenceEngine
from MedVLSAM2Lib.serving.protocol import volume_from_frame, volume_to_frame
from MedVLSAM2Lib.volume import Volume

def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))

engine = InferenceEngine.load("tiny")
k, j, i = (int(n) for n in sys.argv[1:4])
array = np.full((k, j, i), -1000, np.int16)  # air around an elliptic body of soft tissue, a few slices of air
rows, columns = np.ogrid[:j, :i]
body = ((rows - 0.55 * j) / (0.35 * j)) ** 2 + ((columns - 0.5 * i) / (0.42 * i)) ** 2 < 1
tissue = (40 + 60 * np.sin(rows / 17) * np.cos(columns / 23)).astype(np.int16)
rng = np.random.default_rng(0)
for z in range(k // 16, k - k // 16):
    array[z][body] = (tissue + rng.integers(-20, 20, (j, i), dtype=np.int16))[body]
frame = volume_to_frame(Volume(array, np.diag([0.8, 0.8, 2.5, 1.0])))  # RAS, as NIfTI readers give it
decoded = array.nbytes
del array, body, tissue
try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap, so that the baseline holds no reusable memory
except (OSError, AttributeError):
    pass
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the peak resident set (VmHWM) restarts from the current one
baseline = status("VmRSS")
volume, intensity = volume_from_frame(frame)
handle = engine.encode(volume, intensity)
peak = status("VmHWM")
print(json.dumps({"decoded": decoded, "frame": len(frame), "baseline": baseline, "peak": peak,
                  "shape": list(handle.shape_kji)}))
"""


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_decoding_and_encoding_an_upload_take_under_4x_its_decoded_size():
    if not _clear_refs_works():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    shape = (256, 512, 512)
    done = subprocess.run([sys.executable, "-c", MEASURE, *map(str, shape)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == list(shape) and result["decoded"] == 2 * np.prod(shape)
    ratio = (result["peak"] - result["baseline"]) / result["decoded"]
    assert ratio < MAX_RATIO, f"peak RSS grew by {ratio:.2f} times the decoded size ({result})"


def _declaring_frame(shape: tuple[int, ...], blob: bytes) -> bytes:
    entry = {"dtype": "int16", "shape": list(shape), "order": "C", "codec": "zlib", "nbytes": len(blob)}
    header = json.dumps({"protocol": 1, "meta": {}, "arrays": [entry]}).encode()
    return MAGIC + len(header).to_bytes(4, "little") + header + blob


def test_a_frame_declaring_more_than_max_voxels_is_refused_before_allocating(monkeypatch):
    """The issue's frame: half a MiB declaring 256×1024×1024 int16 (512 MiB). Refused with TooLargeError (the
    server's 413) naming the declared size, the limit and --max-voxels; zlib is never called and the Python heap
    (numpy's arrays included) does not grow by more than a few KiB."""
    blob = np.random.default_rng(0).bytes(512 * 1024)
    frame = _declaring_frame((256, 1024, 1024), blob)

    def no_inflating(*args: object) -> None:
        raise AssertionError("a frame over the limit was decompressed")

    monkeypatch.setattr(protocol.zlib, "decompressobj", no_inflating)
    limits = Limits(max_voxels=256 * 512 * 512)
    tracemalloc.start()
    try:
        with pytest.raises(TooLargeError) as refused:
            unpack(frame, limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(refused.value)
    assert "declares 268435456 elements (512.0 MiB of int16)" in message, message
    assert "limit of 67108864 elements" in message and "--max-voxels" in message, message
    assert peak < 256 * 1024, peak
    with pytest.raises(TooLargeError, match=r"declare 536870912 bytes in all \(512\.0 MiB\); at most 268435456"):
        unpack(frame, Limits(max_bytes=256 * 1024 * 1024))


def _old_volume_key(volume: Volume, intensity: str) -> str:
    """The content key as it was defined (hashing a full copy): the key must not change."""
    digest = hashlib.sha256(intensity.encode())
    digest.update(str((volume.array.dtype.str, volume.array.shape)).encode())
    digest.update(np.ascontiguousarray(volume.array).tobytes())
    digest.update(np.ascontiguousarray(volume.ijk_to_ras).tobytes())
    return digest.hexdigest()


def test_the_content_key_and_the_ct_check_read_the_volume_in_place(rng):
    """The same key as before for contiguous, strided, transposed and big-endian arrays; a contiguous volume is
    hashed and checked without any copy (before: a full copy for the key)."""
    base = rng.integers(-1000, 1000, (7, 9, 11))
    for dtype in ("int16", ">i2", "float32", "float64", "uint8"):
        array = base.astype(dtype)
        for view in (array, array[::-1, :, ::2], np.asfortranarray(array), array.transpose(1, 0, 2)):
            volume = Volume(view, np.diag([0.8, 0.8, 2.5, 1.0]))
            assert _volume_key(volume, "hu") == _old_volume_key(volume, "hu"), (dtype, view.strides)
    volume = Volume(rng.integers(-1000, 1000, (32, 256, 256), dtype=np.int16), np.eye(4))  # 4 MiB
    tracemalloc.start()
    try:
        _volume_key(volume, "hu")
        check_ct(volume, "hu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak
