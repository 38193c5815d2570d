"""The server/client wire format: exact round trips, cropped masks, and every malformed frame refused by name."""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from MedVLSAM2Lib.errors import InputError, ProtocolError, TooLargeError
from MedVLSAM2Lib.results import ObjectMask, SegmentResult
from MedVLSAM2Lib.serving import protocol
from MedVLSAM2Lib.serving.client import check_server_url
from MedVLSAM2Lib.serving.protocol import (
    DTYPES,
    MAGIC,
    Limits,
    crop_mask,
    pack,
    segment_result_from_frame,
    segment_result_to_frame,
    uncrop_mask,
    unpack,
    volume_from_frame,
    volume_to_frame,
)
from MedVLSAM2Lib.volume import Volume


def _frame(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(raw)) + raw + body


def _header(dtype: str = "float32", shape: tuple = (2, 3, 4), codec: str = "raw", nbytes: int = 96) -> dict:
    array = {"dtype": dtype, "shape": list(shape), "order": "C", "codec": codec, "nbytes": nbytes}
    return {"protocol": 1, "meta": {}, "arrays": [array]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("codec", ["zlib", "raw"])
def test_arrays_round_trip_exactly(dtype, codec, rng):
    array = (rng.normal(size=(3, 5, 7)) * 100).astype(dtype)
    meta, [(back, entry)] = unpack(pack({"a": 1}, [(array, {"offset": [1, 2, 3]})], codec=codec))
    assert meta == {"a": 1} and entry["offset"] == [1, 2, 3] and entry["dtype"] == dtype
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_volume_and_segment_result_round_trip(rng):
    ijk_to_ras = np.array([[-0.8, 0, 0, 10.5], [0, -0.8, 0, 3], [0, 0, 2.5, -7], [0, 0, 0, 1]])
    volume = Volume((rng.normal(size=(6, 9, 11)) * 500).astype(np.int16), ijk_to_ras)
    back, intensity = volume_from_frame(volume_to_frame(volume, "normalized"))
    assert intensity == "normalized" and np.array_equal(back.array, volume.array)
    assert np.array_equal(back.ijk_to_ras, ijk_to_ras)
    mask = np.zeros((6, 9, 11), np.uint8)
    mask[2:4, 3:7, 5:6] = 1
    result = SegmentResult("q", "No.", [ObjectMask("liver", mask, 0.25), ObjectMask("x", mask * 0, 0.5)],
                           ijk_to_ras, {"total": 1.5}, from_prompts=True, message="from the prompts")  # fmt: skip
    frame = segment_result_to_frame(result)
    assert len(frame) < mask.nbytes  # cropped to the box (2×4×1 voxels), not the volume
    back = segment_result_from_frame(frame, (6, 9, 11))
    assert [o.label for o in back.objects] == ["liver", "x"] and [o.score for o in back.objects] == [0.25, 0.5]
    assert np.array_equal(back.objects[0].mask, mask) and not back.objects[1].mask.any()
    assert back.answer == result.answer and back.timings == {"total": 1.5}
    assert back.from_prompts and back.message == "from the prompts"
    with pytest.raises(ProtocolError, match=r"volume of shape \[6, 9, 11\], expected \[6, 9, 12\]"):
        segment_result_from_frame(frame, (6, 9, 12))
    bad = pack({"question": "q", "answer": "No.", "ijk_to_ras": ijk_to_ras.tolist(), "from_prompts": "yes"}, [])
    with pytest.raises(ProtocolError, match="from_prompts must be a boolean"):
        segment_result_from_frame(bad, (6, 9, 11))


def test_crop_and_uncrop():
    mask = np.zeros((5, 6, 7), np.uint8)
    mask[1, 2:4, 6] = 1
    crop, offset = crop_mask(mask)
    assert crop.shape == (1, 2, 1) and offset == (1, 2, 6)
    assert np.array_equal(uncrop_mask(crop, offset, mask.shape), mask)
    with pytest.raises(ProtocolError, match="does not fit"):
        uncrop_mask(crop, (1, 5, 6), mask.shape)


def test_malformed_frames_are_refused_by_name():
    good = pack({}, [(np.zeros((2, 3, 4), np.float32), {})], codec="raw")
    cases = [
        (b"GIF89a" + good, "not a MedVLSAM2 frame"),
        (good[:-10], r"truncated: its arrays declare 96 bytes, 86 arrived"),
        (good + b"xx", "followed by extra bytes"),
        (_frame(_header(dtype="complex64", nbytes=192), bytes(192)), "dtype 'complex64' is not allowed"),
        (_frame(_header(dtype="object"), bytes(96)), "dtype 'object' is not allowed"),
        (_frame(_header(nbytes=100), bytes(100)), r"100 bytes do not match shape \[2, 3, 4\] of float32 \(96 bytes\)"),
        (_frame(_header(shape=(2, -3, 4)), bytes(96)), "shape must be a list of positive integers"),
        (_frame({**_header(), "protocol": 7}, bytes(96)), "frame of protocol 7; this side speaks 1"),
        (MAGIC + struct.pack("<I", 5) + b"{oops", "not valid UTF-8 JSON"),
        (MAGIC + struct.pack("<I", 1 << 30), "at most 1048576 are allowed"),
    ]
    for frame, message in cases:
        with pytest.raises(ProtocolError, match=message):
            unpack(frame)
    with pytest.raises(TooLargeError, match=r"declares 24 elements .* exceed the limit of 10 elements .*--max-voxels"):
        unpack(good, Limits(max_voxels=10))
    with pytest.raises(TooLargeError, match=r"declare 96 bytes in all .*; at most 95 are accepted .*--max-voxels"):
        unpack(good, Limits(max_bytes=95))
    with pytest.raises(ProtocolError, match="at most 1 entries"):
        unpack(pack({}, [(np.zeros(2, np.uint8), {}), (np.zeros(2, np.uint8), {})]), Limits(max_arrays=1))


def test_compressed_data_are_never_inflated_past_the_declared_shape():
    bomb = zlib.compress(bytes(50_000_000))  # 50 MB of zeros in about 50 KB
    frame = _frame(_header(shape=(2, 3, 4), codec="zlib", nbytes=len(bomb)), bomb)
    with pytest.raises(ProtocolError, match="decompress to more than"):
        unpack(frame)
    cut = zlib.compress(bytes(96))[:-6]
    with pytest.raises(ProtocolError, match="truncated|corrupt"):
        unpack(_frame(_header(codec="zlib", nbytes=len(cut)), cut))
    followed = zlib.compress(bytes(96)) + b"xyz"
    with pytest.raises(ProtocolError, match="followed by 3 bytes of trailing data"):
        unpack(_frame(_header(codec="zlib", nbytes=len(followed)), followed))


def test_inflating_in_small_chunks_keeps_every_check(monkeypatch, rng):
    """Input fed 5 bytes and output taken 7 bytes at a time: the chunked loop gives the same array and the same
    refusals as one call would."""
    monkeypatch.setattr(protocol, "INFLATE_CHUNK", 7)
    monkeypatch.setattr(protocol, "INFLATE_INPUT", 5)
    array = (rng.normal(size=(3, 5, 7)) * 100).astype(np.int16)
    _, [(back, _)] = unpack(pack({}, [(array, {})]))
    assert np.array_equal(back, array)
    stream = zlib.compress(array.tobytes())
    cases = [
        (zlib.compress(array.tobytes() + b"x"), "decompress to more than"),
        (zlib.compress(array.tobytes()[:-2]), r"208 bytes do not match shape \[3, 5, 7\] of int16 \(210 bytes\)"),
        (stream[: len(stream) // 2], "truncated"),
        (stream + b"\0", "followed by 1 bytes of trailing data"),
        (b"not zlib at all", "corrupt"),
    ]
    for blob, message in cases:
        with pytest.raises(ProtocolError, match=message):
            unpack(_frame(_header("int16", (3, 5, 7), "zlib", len(blob)), blob))


@pytest.mark.parametrize("codec", ["zlib", "raw"])
def test_unpack_reads_any_bytes_like_into_one_array_without_copies(codec, rng):
    """bytes, bytearray and memoryview frames decode alike into arrays that own their memory; the Python heap grows by
    the decoded array and at most one inflate chunk (before: a copy of every blob, then a second one by astype)."""
    array = rng.integers(-1000, 1000, (40, 512, 512), dtype=np.int16)  # 20 MiB
    frame = pack({}, [(array, {})], codec=codec)
    for data in (frame, bytearray(frame), memoryview(frame)):
        tracemalloc.start()
        try:
            _, [(back, _)] = unpack(data)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert np.array_equal(back, array) and back.flags.writeable and back.flags.aligned
        assert peak < array.nbytes + protocol.INFLATE_CHUNK + protocol.INFLATE_INPUT + (1 << 20), peak / array.nbytes
    buffer = bytearray(frame)
    _, [(back, _)] = unpack(buffer)
    buffer[-array.nbytes // 2 :] = bytes(array.nbytes // 2)  # the caller reuses its buffer: the array is its own
    assert np.array_equal(back, array)


def test_volume_upload_must_be_one_3d_array_with_a_4x4_matrix():
    with pytest.raises(ProtocolError, match="exactly one 3D array"):
        volume_from_frame(pack({}, [(np.zeros((4, 4), np.float32), {"ijk_to_ras": np.eye(4).tolist()})]))
    with pytest.raises(ProtocolError, match="4x4"):
        volume_from_frame(pack({}, [(np.zeros((4, 4, 4), np.float32), {"ijk_to_ras": [[1, 0], [0, 1]]})]))
    with pytest.raises(InputError, match="singular"):
        volume_from_frame(pack({}, [(np.zeros((4, 4, 4), np.float32), {"ijk_to_ras": np.zeros((4, 4)).tolist()})]))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("localhost:8765", r"lacks its scheme: write http://localhost:8765"),
        ("http://0.0.0.0:8765", "0.0.0.0 is where a server listens"),
        ("ftp://gpu-box:8765", "only http:// and https://"),
        ("http://", "names no host"),
    ],
)
def test_classic_url_mistakes_are_named(url, message):
    with pytest.raises(InputError, match=message):
        check_server_url(url)
    assert check_server_url(" http://gpu-box:8765/ ") == "http://gpu-box:8765"
