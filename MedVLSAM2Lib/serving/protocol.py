"""The wire format between server and client: a frame of one JSON header and compressed array bytes.

::

    frame  = b"MVS1" | uint32 little-endian header length | header (UTF-8 JSON) | blob 0 | blob 1 | …
    header = {"protocol": 1, "meta": {...}, "arrays": [{"dtype", "shape", "order": "C", "codec", "nbytes", …}]}

Every array is C-ordered, little-endian, of a dtype in :data:`DTYPES`, and stored ``zlib``-compressed or
``raw``; ``nbytes`` is the length of its blob. :func:`unpack` checks everything before it allocates: the
magic, the header size, each field, the declared sizes against :class:`Limits` (refused with
:class:`~MedVLSAM2Lib.errors.TooLargeError`), the declared bytes against the body; it then inflates each blob
in bounded chunks straight into an array of the declared size, never past it (no zip bombs): decoding takes
the decoded array plus one chunk. No pickle anywhere. Masks travel cropped to their bounding box with
its ``offset`` (k, j, i) and the ``full_shape`` of the volume; each mask's header entry also holds its ``label``,
``score`` and (optional, since a reader ignores fields it does not know) ``presence``, one number per k slice, written
as the exact double of each float32 so that it comes back bit for bit. numpy only: the Slicer module imports this.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ProtocolError, TooLargeError
from ..results import ObjectMask, SegmentResult
from ..volume import INTENSITIES, Volume

__all__ = [
    "PROTOCOL_VERSION",
    "FRAME_MEDIA_TYPE",
    "DTYPES",
    "Limits",
    "pack",
    "unpack",
    "volume_to_frame",
    "volume_from_frame",
    "crop_mask",
    "uncrop_mask",
    "segment_result_to_frame",
    "segment_result_from_frame",
]

PROTOCOL_VERSION = 1
FRAME_MEDIA_TYPE = "application/x-medvlsam2-frame"
MAGIC = b"MVS1"
MAX_HEADER_BYTES = 1 << 20
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
CODECS = ("zlib", "raw")
INFLATE_CHUNK = 16 << 20  # at most this many bytes come out of one zlib call while decoding
INFLATE_INPUT = 1 << 20  # compressed bytes fed to zlib per step (its unconsumed input is kept as a copy)


@dataclass(frozen=True)
class Limits:
    """What :func:`unpack` accepts: at most ``max_arrays`` arrays of at most ``max_voxels`` elements each and
    ``max_bytes`` decompressed bytes in all (checked before anything is allocated or decompressed). A server sets
    both from its ``--max-voxels``."""

    max_voxels: int = 1024 * 1024 * 1024
    max_arrays: int = 64
    max_bytes: int = 8 * 1024**3  # all arrays of a frame together, decompressed


def _blob(array: np.ndarray, codec: str) -> bytes:
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return zlib.compress(data, 1) if codec == "zlib" else data


def pack(meta: dict[str, Any], arrays: Sequence[tuple[np.ndarray, dict[str, Any]]] = (), codec: str = "zlib") -> bytes:
    """One frame of ``meta`` and ``arrays`` (each with extra header fields, e.g. ``offset``)."""
    if codec not in CODECS:
        raise ProtocolError(f"unknown codec {codec!r}; choose one of {list(CODECS)}.")
    entries, blobs = [], []
    for array, extra in arrays:
        dtype = np.dtype(array.dtype).name
        if dtype not in DTYPES:
            raise ProtocolError(f"arrays of dtype {dtype} cannot be sent; allowed: {', '.join(DTYPES)}.")
        blob = _blob(array, codec)
        entries.append({**extra, "dtype": dtype, "shape": list(array.shape), "order": "C", "codec": codec,
                        "nbytes": len(blob)})  # fmt: skip
        blobs.append(blob)
    header = json.dumps({"protocol": PROTOCOL_VERSION, "meta": meta, "arrays": entries}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs)


def _field(entry: dict, name: str, kind: type, where: str) -> Any:
    value = entry.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"{where}: field {name!r} must be {kind.__name__}, got {value!r}.")
    return value


def _array_spec(entry: object, where: str, limits: Limits) -> tuple[np.dtype, tuple[int, ...], str, int]:
    if not isinstance(entry, dict):
        raise ProtocolError(f"{where}: expected an object, got {type(entry).__name__}.")
    dtype = _field(entry, "dtype", str, where)
    if dtype not in DTYPES:
        raise ProtocolError(f"{where}: dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}.")
    shape = _field(entry, "shape", list, where)
    if not shape or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ProtocolError(f"{where}: shape must be a list of positive integers, got {shape!r}.")
    count = math.prod(shape)
    if count > limits.max_voxels:
        mib = count * np.dtype(dtype).itemsize / 2**20
        raise TooLargeError(f"{where}: its shape {shape} declares {count} elements ({mib:.1f} MiB of {dtype}), which "
                            f"exceed the limit of {limits.max_voxels} elements (on a server, --max-voxels sets "
                            "it).")  # fmt: skip
    if entry.get("order", "C") != "C":
        raise ProtocolError(f"{where}: order must be 'C', got {entry.get('order')!r}.")
    codec = _field(entry, "codec", str, where)
    if codec not in CODECS:
        raise ProtocolError(f"{where}: codec {codec!r} is not supported; use one of {list(CODECS)}.")
    nbytes = _field(entry, "nbytes", int, where)
    if nbytes < 0:
        raise ProtocolError(f"{where}: nbytes must be >= 0, got {nbytes}.")
    return np.dtype(dtype).newbyteorder("<"), tuple(shape), codec, nbytes


def _inflate(blob: memoryview, out: memoryview, where: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """Decompress the zlib stream ``blob`` into ``out`` (bytes), exactly filling it: ``blob`` is fed in steps of
    :data:`INFLATE_INPUT` bytes and inflated in pieces of at most :data:`INFLATE_CHUNK`, so nothing but ``out``
    grows with the data.

    Raises:
        ProtocolError: the stream is corrupt, truncated, followed by other bytes, or inflates to more or fewer
            bytes than ``out`` holds.
    """
    expected, filled, position = len(out), 0, 0
    inflater = zlib.decompressobj()
    try:
        while position < len(blob) and not inflater.eof:
            data = blob[position : position + INFLATE_INPUT]
            position += len(data)
            while data and not inflater.eof:
                piece = inflater.decompress(data, min(INFLATE_CHUNK, expected - filled + 1))
                if len(piece) > expected - filled:
                    raise ProtocolError(f"{where}: data decompress to more than shape {list(shape)} × {dtype.itemsize} "
                                        f"bytes = {expected}.")  # fmt: skip
                out[filled : filled + len(piece)] = piece
                filled += len(piece)
                data = inflater.unconsumed_tail
    except zlib.error as err:
        raise ProtocolError(f"{where}: the zlib stream is corrupt ({err}).") from err
    if not inflater.eof:
        raise ProtocolError(f"{where}: the zlib stream is truncated.")
    trailing = len(inflater.unused_data) + len(blob) - position
    if trailing:
        raise ProtocolError(f"{where}: the zlib stream is followed by {trailing} bytes of trailing data.")
    if filled != expected:
        raise ProtocolError(f"{where}: {filled} bytes do not match shape {list(shape)} of {dtype.name} "
                            f"({expected} bytes).")  # fmt: skip


def _decode(blob: memoryview, dtype: np.dtype, shape: tuple[int, ...], codec: str, where: str) -> np.ndarray:
    """The array of a blob, in native byte order, writable and owning its memory: one allocation of the declared
    size, filled by inflating in chunks (``zlib``) or by one copy of the blob (``raw``: a view would alias the
    caller's buffer, which may be reused or, from ``bytes``, is read-only, and may be misaligned)."""
    expected = math.prod(shape) * dtype.itemsize
    if codec == "raw" and len(blob) != expected:
        raise ProtocolError(f"{where}: {len(blob)} bytes do not match shape {list(shape)} of {dtype.name} "
                            f"({expected} bytes).")  # fmt: skip
    array = np.empty(shape, dtype=dtype)
    target = memoryview(array).cast("B")
    if codec == "zlib":
        _inflate(blob, target, where, dtype, shape)
    else:
        target[:] = blob
    native = dtype.newbyteorder("=")
    return array if dtype == native else array.byteswap(inplace=True).view(native)


def unpack(
    data: bytes | bytearray | memoryview, limits: Limits = Limits()
) -> tuple[dict[str, Any], list[tuple[np.ndarray, dict[str, Any]]]]:
    """Read a frame from any bytes-like ``data`` (read, never copied): ``(meta, [(array, header entry), …])``. The
    arrays own their memory (the caller may reuse ``data``); peak memory is the arrays plus one inflate chunk.

    Raises:
        TooLargeError: an array or all of them together declare more than ``limits`` allow (refused before any
            allocation; a ProtocolError too).
        ProtocolError: anything malformed, named (magic, header, a field, byte counts, trailing data).
    """
    data = memoryview(data).cast("B")
    if len(data) < 8 or data[:4] != MAGIC:
        raise ProtocolError("not a MedVLSAM2 frame (it must start with b'MVS1' and a header length).")
    (size,) = struct.unpack("<I", data[4:8])
    if size > MAX_HEADER_BYTES:
        raise ProtocolError(f"the frame header declares {size} bytes; at most {MAX_HEADER_BYTES} are allowed.")
    if len(data) < 8 + size:
        raise ProtocolError(f"the frame is truncated: its header needs {size} bytes, {len(data) - 8} arrived.")
    try:
        header = json.loads(bytes(data[8 : 8 + size]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"the frame header is not valid UTF-8 JSON ({err}).") from err
    except RecursionError as err:
        raise ProtocolError("the frame header is nested too deeply.") from err
    if not isinstance(header, dict) or not isinstance(header.get("meta"), dict):
        raise ProtocolError("the frame header must be an object with 'protocol', 'meta' and 'arrays'.")
    if header.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"frame of protocol {header.get('protocol')!r}; this side speaks {PROTOCOL_VERSION}.")
    entries = header.get("arrays")
    if not isinstance(entries, list) or len(entries) > limits.max_arrays:
        raise ProtocolError(f"'arrays' must be a list of at most {limits.max_arrays} entries.")
    specs = [_array_spec(entry, f"array {n}", limits) for n, entry in enumerate(entries)]
    total = sum(math.prod(shape) * dtype.itemsize for dtype, shape, _, _ in specs)
    if total > limits.max_bytes:
        raise TooLargeError(f"the arrays declare {total} bytes in all ({total / 2**20:.1f} MiB); at most "
                            f"{limits.max_bytes} are accepted (on a server, --max-voxels sets it).")  # fmt: skip
    body = data[8 + size :]
    declared = sum(spec[3] for spec in specs)
    if len(body) != declared:
        state = "truncated" if len(body) < declared else "followed by extra bytes"
        raise ProtocolError(f"the frame body is {state}: its arrays declare {declared} bytes, {len(body)} arrived.")
    arrays, start = [], 0
    for n, ((dtype, shape, codec, nbytes), entry) in enumerate(zip(specs, entries, strict=True)):
        arrays.append((_decode(body[start : start + nbytes], dtype, shape, codec, f"array {n}"), entry))
        start += nbytes
    return header["meta"], arrays


def volume_to_frame(volume: Volume, intensity: str = "hu") -> bytes:
    """A volume upload: the voxels (KJI) with ``ijk_to_ras`` and the intensity convention."""
    array = volume.array if volume.array.dtype.name in DTYPES else volume.array.astype(np.float32)
    return pack({"intensity": intensity}, [(array, {"ijk_to_ras": volume.ijk_to_ras.tolist()})])


def volume_from_frame(data: bytes | bytearray | memoryview, limits: Limits = Limits()) -> tuple[Volume, str]:
    """``(volume, intensity)`` of an upload.

    Raises:
        TooLargeError: the array declares more than ``limits`` allow (see :func:`unpack`).
        ProtocolError: not exactly one 3D array, a bad ``ijk_to_ras`` or intensity. InputError: see :class:`Volume`.
    """
    meta, arrays = unpack(data, limits)
    if len(arrays) != 1 or arrays[0][0].ndim != 3:
        raise ProtocolError("a volume upload holds exactly one 3D array (K, J, I).")
    array, entry = arrays[0]
    intensity = meta.get("intensity", "hu")
    if intensity not in INTENSITIES:
        raise ProtocolError(f"intensity must be one of {list(INTENSITIES)}, got {intensity!r}.")
    matrix = entry.get("ijk_to_ras")
    try:
        matrix = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"ijk_to_ras must be a 4x4 list of numbers ({err}).") from err
    if matrix.shape != (4, 4):
        raise ProtocolError(f"ijk_to_ras must be a 4x4 list of numbers, got shape {matrix.shape}.")
    return Volume(array, matrix, {"source_path": "uploaded volume"}), intensity


def crop_mask(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """The bounding box of the mask's non-zero voxels and its offset (an empty mask gives a 1-voxel crop)."""
    nonzero = np.nonzero(mask)
    if not nonzero[0].size:
        return mask[(slice(0, 1),) * mask.ndim], (0,) * mask.ndim
    lo = [int(axis.min()) for axis in nonzero]
    hi = [int(axis.max()) + 1 for axis in nonzero]
    return mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))], tuple(lo)


def uncrop_mask(crop: np.ndarray, offset: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Place a cropped mask back into a zero array of ``shape``.

    Raises:
        ProtocolError: the crop does not fit inside ``shape`` at ``offset``.
    """
    offset, shape = [int(v) for v in offset], [int(v) for v in shape]
    if len(offset) != crop.ndim or len(shape) != crop.ndim or any(
        o < 0 or o + n > s for o, n, s in zip(offset, crop.shape, shape, strict=True)):  # fmt: skip
        raise ProtocolError(f"a mask crop of shape {list(crop.shape)} at {offset} does not fit in {shape}.")
    full = np.zeros(shape, dtype=crop.dtype)
    full[tuple(slice(o, o + n) for o, n in zip(offset, crop.shape, strict=True))] = crop
    return full


def segment_result_to_frame(result: SegmentResult) -> bytes:
    """A segmentation answer: question, answer, timings, whether the mask came from the prompts alone (with the
    message saying so) and each object's cropped mask with label, score and per-slice presence."""
    shape = list(result.objects[0].mask.shape) if result.objects else None
    arrays = []
    for obj in result.objects:
        crop, offset = crop_mask(obj.mask)
        entry = {"label": obj.label, "score": obj.score, "offset": list(offset)}
        if obj.presence is not None:
            entry["presence"] = np.asarray(obj.presence, dtype=np.float32).tolist()  # exact doubles of the float32s
        arrays.append((crop, entry))
    meta = {"question": result.question, "answer": result.answer, "timings": result.timings,
            "ijk_to_ras": result.ijk_to_ras.tolist(), "full_shape": shape, "from_prompts": result.from_prompts,
            "message": result.message}  # fmt: skip
    return pack(meta, arrays)


def _presence(values: object, slices: int) -> np.ndarray | None:
    """A mask entry's ``presence`` as float32 ``(slices,)``, or ``None`` when the entry has none.

    Raises:
        ProtocolError: not a list of ``slices`` numbers in [0, 1].
    """
    if values is None:
        return None
    numbers = isinstance(values, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    presence = np.asarray(values, dtype=np.float32) if numbers else None
    if presence is None or presence.shape != (slices,) or not np.all((presence >= 0) & (presence <= 1)):
        raise ProtocolError(f"a mask's presence must be a list of {slices} numbers in [0, 1] (one per k slice).")
    return presence


def segment_result_from_frame(data: bytes, shape_kji: Sequence[int], limits: Limits = Limits()) -> SegmentResult:
    """Inverse of :func:`segment_result_to_frame`; masks are placed back on a volume of ``shape_kji``.

    Raises:
        ProtocolError: malformed, or masks for a volume of another shape than ``shape_kji``.
    """
    meta, arrays = unpack(data, limits)
    if arrays and list(meta.get("full_shape") or []) != list(shape_kji):
        raise ProtocolError(f"masks for a volume of shape {meta.get('full_shape')}, expected {list(shape_kji)}.")
    objects = []
    for crop, entry in arrays:
        if crop.dtype != np.uint8:
            raise ProtocolError(f"a mask must be uint8, got {crop.dtype}.")
        mask = uncrop_mask(crop, entry.get("offset", ()), shape_kji)
        presence = _presence(entry.get("presence"), shape_kji[0])
        objects.append(ObjectMask(str(entry.get("label")), mask, float(entry.get("score")), presence=presence))
    matrix = np.asarray(meta.get("ijk_to_ras"), dtype=np.float64)
    timings = dict(meta.get("timings") or {})
    from_prompts, message = meta.get("from_prompts", False), meta.get("message", "")
    if not isinstance(from_prompts, bool) or not isinstance(message, str):
        raise ProtocolError(f"from_prompts must be a boolean and message a string, got {from_prompts!r}, {message!r}.")
    return SegmentResult(str(meta.get("question")), str(meta.get("answer")), objects, matrix, timings,
                         from_prompts=from_prompts, message=message)  # fmt: skip
