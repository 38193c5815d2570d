"""Header-first checks of volume files: what a header declares, against a voxel limit and the bytes the file holds.

A hostile or damaged file can declare far more than it holds (a 223-byte NIfTI claiming 1200³ voxels, a NRRD whose
raw data was cut short) or hold a DICOM slice whose broken pixel data costs GDCM gigabytes to reject. These checks
read headers only, and walk a DICOM file's pixel data by its item headers, so that a bad file is refused in bounded
time and memory with a one-line :class:`~MedVLSAM2Lib.errors.InputError` naming it, before a reader allocates.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import InputError, TooLargeError

__all__ = [
    "MAX_DEFLATE_RATIO",
    "Payload",
    "DicomImage",
    "check_voxel_count",
    "check_payload",
    "nrrd_payload",
    "metaimage_payload",
    "scan_dicom_file",
]

# Deflate (gzip, zlib) expands at most 1032-fold: a 258-byte match costs at least 2 bits. Compressed data smaller
# than 1/1032 of what its header declares cannot hold it.
MAX_DEFLATE_RATIO = 1032
# How much of a text header (NRRD, MetaImage) is read to find its fields; a longer one is left to SimpleITK.
HEADER_READ_LIMIT = 1 << 20

_NRRD_TYPE_BYTES = {
    name: size
    for size, names in [
        (1, "signed char, int8, int8_t, uchar, unsigned char, uint8, uint8_t"),
        (2, "short, short int, signed short, signed short int, int16, int16_t, ushort, unsigned short, "
            "unsigned short int, uint16, uint16_t"),
        (4, "int, signed int, int32, int32_t, uint, unsigned int, uint32, uint32_t, float"),
        (8, "longlong, long long, long long int, signed long long, signed long long int, int64, int64_t, ulonglong, "
            "unsigned long long, unsigned long long int, uint64, uint64_t, double"),
    ]
    for name in names.split(", ")
}  # fmt: skip
_NRRD_ENCODINGS = {"raw": "raw", "gzip": "deflate", "gz": "deflate", "ascii": "text", "text": "text", "txt": "text",
                   "hex": "hex"}  # fmt: skip
# MET_LONG is the platform's long: 4 bytes is its lower bound, so the check never refuses a good file.
_META_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                    "MET_LONG": 4, "MET_ULONG": 4, "MET_FLOAT": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8,
                    "MET_DOUBLE": 8}  # fmt: skip

_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}  # pixel data, float and double float
_ITEM, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"SQ", b"UC", b"UR"}
_JPEG2000_START = b"\xff\x4f\xff\x51"  # SOC, then the SIZ marker: a JPEG 2000 codestream's own image header


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in shape)


def check_voxel_count(
    where: object, shape: Sequence[int], max_voxels: int, *, declared_by: str = "the header declares"
) -> None:
    """Refuse a declared shape with an empty or negative axis, or with more than ``max_voxels`` voxels.

    Raises:
        InputError: an axis of zero or negative length.
        TooLargeError: more than ``max_voxels`` voxels.
    """
    dims = [int(n) for n in shape]
    if any(n < 1 for n in dims):
        raise InputError(f"{where}: {declared_by} {_shape_text(dims)} voxels; every axis needs at least one.")
    count = math.prod(dims)
    if count > max_voxels:
        raise TooLargeError(f"{where}: {declared_by} {_shape_text(dims)} = {count:,} voxels, over the limit of "
                            f"{max_voxels:,} voxels (read_volume's max_voxels sets it).")  # fmt: skip


@dataclass(frozen=True)
class Payload:
    """Where a file's voxels lie and how they are encoded, as its header declares them.

    Attributes:
        data_path: the file holding the voxels (the header file itself, or a detached data file).
        offset: bytes before the voxels in ``data_path`` (0 where it is not known exactly: a lower bound).
        shape: declared voxels per axis (components included).
        item_bytes: bytes per voxel value.
        encoding: ``"raw"``, ``"deflate"`` (gzip or zlib), ``"text"`` (ASCII numbers), ``"hex"``; any other
            (bzip2) has no useful bound and is not checked.
    """

    data_path: Path
    offset: int
    shape: tuple[int, ...]
    item_bytes: int
    encoding: str


def check_payload(where: object, payload: Payload) -> None:
    """Refuse a file that cannot hold the voxels its header declares (cut short, or a lying header).

    Raises:
        InputError: the data file is missing, or holds fewer bytes than the encoding needs at the least.
    """
    values = math.prod(payload.shape)
    declared = values * payload.item_bytes
    try:
        available = max(payload.data_path.stat().st_size - payload.offset, 0)
    except OSError as err:
        raise InputError(f"{where}: its header names the data file {payload.data_path}, which cannot be opened "
                         f"({err.strerror or err}).") from err  # fmt: skip
    claim = (f"{where}: the header declares {_shape_text(payload.shape)} voxels of {payload.item_bytes} bytes "
             f"({declared:,} bytes)")  # fmt: skip
    holder = "the file" if payload.data_path == where else f"its data file {payload.data_path.name}"
    if payload.encoding == "raw" and available < declared:
        raise InputError(f"{claim}, but {holder} holds only {available:,} bytes of voxel data; the file is truncated "
                         "or its header is wrong.")  # fmt: skip
    if payload.encoding == "deflate" and declared > MAX_DEFLATE_RATIO * available:
        raise InputError(f"{claim}, but {holder} holds {available:,} compressed bytes, which expand to at most "
                         f"{MAX_DEFLATE_RATIO * available:,}; the file is truncated or its header is "
                         "wrong.")  # fmt: skip
    if payload.encoding in ("text", "hex") and (values if payload.encoding == "text" else 2 * declared) > available:
        raise InputError(f"{claim}, but {holder} holds only {available:,} characters of voxel data; the file is "
                         "truncated or its header is wrong.")  # fmt: skip


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(HEADER_READ_LIMIT)


def _data_file(header: Path, name: str) -> Path | None:
    """A detached data file named in a header; ``None`` for lists and numbered patterns of files (not checked)."""
    if len(name.split()) != 1 or name.upper() == "LIST" or "%" in name:
        return None
    return header.parent / name


def nrrd_payload(path: Path) -> Payload | None:
    """What a NRRD header (``.nrrd``, ``.seg.nrrd``, ``.nhdr``) declares; ``None`` where it is not plain enough to
    check here (SimpleITK then judges the file)."""
    head = _read_head(path)
    end, blank = head.find(b"\n\n"), 2
    if end < 0:
        end, blank = head.find(b"\r\n\r\n"), 4
    if not head.startswith(b"NRRD000") or end < 0:
        return None
    fields = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        key, sep, value = line.partition(": ")
        if sep and not line.startswith("#") and ":=" not in key:
            fields[key.strip().lower()] = value.strip()
    try:
        shape = tuple(int(n) for n in fields["sizes"].split())
        item_bytes = _NRRD_TYPE_BYTES[fields["type"].lower()]
    except (KeyError, ValueError):
        return None
    encoding = _NRRD_ENCODINGS.get(fields.get("encoding", "").lower(), "other")
    detached = fields.get("data file") or fields.get("datafile")
    if detached:
        data_path = _data_file(path, detached)
        return None if data_path is None else Payload(data_path, 0, shape, item_bytes, encoding)
    return Payload(path, end + blank, shape, item_bytes, encoding)


def metaimage_payload(path: Path) -> Payload | None:
    """What a MetaImage header (``.mha``, ``.mhd``) declares; ``None`` where it is not plain enough to check here."""
    head = _read_head(path)
    fields, position = {}, 0
    for line in head.split(b"\n"):
        position += len(line) + 1
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            return None
        fields[key.strip().lower()] = value.strip()
        if key.strip().lower() == "elementdatafile":
            break
    else:
        return None
    try:
        shape = tuple(int(n) for n in fields["dimsize"].split())
        channels = int(fields.get("elementnumberofchannels", "1"))
        item_bytes = _META_TYPE_BYTES[fields["elementtype"].upper()]
    except (KeyError, ValueError):
        return None
    if channels > 1:
        shape += (channels,)
    encoding = "deflate" if fields.get("compresseddata", "false").lower() == "true" else "raw"
    if fields["elementdatafile"].upper() == "LOCAL":
        return Payload(path, position, shape, item_bytes, encoding)
    data_path = _data_file(path, fields["elementdatafile"])
    return None if data_path is None else Payload(data_path, 0, shape, item_bytes, encoding)


@dataclass(frozen=True)
class DicomImage:
    """What a DICOM file's header says, read without its pixel data (whose structure was checked).

    Attributes:
        path: the file.
        series_uid: SeriesInstanceUID (``""`` when empty, ``None`` when absent).
        pixels: whether the file holds pixel data (a DICOMDIR or a report does not; nor does a file cut short
            before its pixel data).
        rows, columns, frames: the image size its header declares (Rows, Columns 0 when absent).
        position: ImagePositionPatient in mm, or ``None``.
        orientation: ImageOrientationPatient (row then column direction cosines), or ``None``.
    """

    path: Path
    series_uid: str | None
    pixels: bool
    rows: int = 0
    columns: int = 0
    frames: int = 0
    position: tuple[float, ...] | None = None
    orientation: tuple[float, ...] | None = None


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    """A multi-valued number attribute as floats, or ``None`` when absent, malformed or of another length."""
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(math.isfinite(v) for v in numbers) else None


def scan_dicom_file(path: Path) -> DicomImage | None:
    """Read a DICOM file's header and check that its pixel data is all there, without reading the pixel data.

    Native pixel data must be as long as Rows x Columns x frames x samples x BitsAllocated need, and lie inside the
    file; encapsulated (compressed) pixel data must be whole items ending in a sequence delimiter, and each JPEG 2000
    codestream's own header must agree with Rows, Columns and SamplesPerPixel (a damaged one can make the decoder
    allocate for another size). Cost: one header read and a few bytes per fragment.

    Returns:
        The header's facts, or ``None`` when pydicom does not recognise the file as DICOM (no ``DICM`` prefix):
        GDCM judges those.

    Raises:
        InputError: a header that cannot be parsed, or pixel data that is cut short, too short or inconsistent.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.valuerep import VR

    try:
        fp = open(path, "rb")  # closed by the with block below
    except OSError as err:
        raise InputError(f"{path}: cannot open this file ({err.strerror or err}).") from err
    size = os.fstat(fp.fileno()).st_size
    with fp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of odd values on the console; the checks below decide
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=4096)
            start = fp.tell()  # where pydicom stopped: the pixel data element, or the end of the file
            implicit, little = ds.original_encoding
        except InvalidDicomError:
            return None
        except Exception as err:  # a parser of untrusted bytes: any failure means a damaged header
            raise _damaged_header(path, err) from err
        _check_header_elements(path, ds, size, implicit, {vr.value for vr in VR})  # before reading any value
        try:
            image = DicomImage(
                path,
                str(ds.SeriesInstanceUID).strip(" \0") if "SeriesInstanceUID" in ds else None,
                start < size,
                int(ds.get("Rows") or 0),
                int(ds.get("Columns") or 0),
                int(ds.get("NumberOfFrames") or 1),
                _numbers(ds.get("ImagePositionPatient"), 3),
                _numbers(ds.get("ImageOrientationPatient"), 6),
            )
            samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 0)
        except Exception as err:  # values that do not convert (a damaged VR, "abc" as Rows)
            raise _damaged_header(path, err) from err
        if not image.pixels:
            if "Rows" in ds:
                raise InputError(f"{path}: truncated DICOM file: it ends before its pixel data.")
            return image
        endian = "<" if little else ">"
        tag, length, value_start = _element_header(path, fp, start, implicit, endian, "its pixel data")
        rows, columns, frames = image.rows, image.columns, image.frames
        if tag not in _PIXEL_TAGS or min(rows, columns, frames, samples, bits) < 1:
            raise InputError(f"{path}: damaged DICOM file: pixel data ({tag[0]:04X},{tag[1]:04X}) with Rows {rows}, "
                             f"Columns {columns}, NumberOfFrames {frames}, SamplesPerPixel {samples}, BitsAllocated "
                             f"{bits}.")  # fmt: skip
        if length == 0xFFFFFFFF:
            end = _check_fragments(path, fp, value_start, size, endian, (rows, columns, samples))
        else:
            needed = math.ceil(rows * columns * frames * samples * bits / 8)
            if value_start + length > size:
                raise InputError(f"{path}: truncated DICOM file: its pixel data declares {length:,} bytes, the file "
                                 f"holds {size - value_start:,} of them.")  # fmt: skip
            if length < needed:
                raise InputError(f"{path}: damaged DICOM file: {length:,} bytes of pixel data, where {rows}x{columns} "
                                 f"pixels x {frames} frames of {samples}x{bits} bits need {needed:,}.")  # fmt: skip
            end = value_start + length
        _check_trailing_elements(path, fp, end, size, implicit, endian)
    return image


def _damaged_header(path: Path, err: Exception) -> InputError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return InputError(f"{path}: damaged DICOM file: its header cannot be read ({reason}).")


def _check_header_elements(path: Path, ds: Any, size: int, implicit: bool, known_vrs: set[str]) -> None:
    """Refuse header elements that GDCM would read differently from pydicom: pydicom skips a value running past the
    end of the file, and gives an unknown VR a 2-byte length where GDCM reads 4 bytes; either can make GDCM allocate
    gigabytes."""
    if not len(ds):
        raise InputError(f"{path}: damaged DICOM file: no data elements follow its file meta information.")
    for tag in ds.keys():
        raw = ds.get_item(tag, keep_deferred=True)
        where = f"({tag.group:04X},{tag.element:04X})"
        if not implicit and raw.VR not in known_vrs:
            raise InputError(f"{path}: damaged DICOM file: unknown value representation {raw.VR!r} in {where}.")
        tell = getattr(raw, "value_tell", None)
        if tell is not None and raw.length != 0xFFFFFFFF and tell + raw.length > size:
            raise InputError(f"{path}: truncated DICOM file: {where} declares {raw.length:,} bytes, the file holds "
                             f"{max(size - tell, 0):,} of them.")  # fmt: skip


def _element_header(
    path: Path, fp: BinaryIO, offset: int, implicit: bool, endian: str, what: str
) -> tuple[tuple[int, int], int, int]:
    """The tag, value length and value offset of the data element at ``offset``."""
    fp.seek(offset)
    head = fp.read(12)
    long_form = not implicit and head[4:6] in _LONG_VRS
    if len(head) < (12 if long_form else 8):
        raise InputError(f"{path}: truncated DICOM file: it ends inside the header of {what}.")
    tag = struct.unpack(endian + "HH", head[:4])
    if implicit:
        return tag, struct.unpack(endian + "I", head[4:8])[0], offset + 8
    if long_form:
        return tag, struct.unpack(endian + "I", head[8:12])[0], offset + 12
    return tag, struct.unpack(endian + "H", head[6:8])[0], offset + 8


def _check_fragments(path: Path, fp: BinaryIO, offset: int, size: int, endian: str, image: tuple[int, int, int]) -> int:
    """Walk encapsulated pixel data item by item (8 bytes each, and a JPEG 2000 frame's SIZ marker); returns the
    offset after its sequence delimiter."""
    items = 0
    while True:
        fp.seek(offset)
        item = fp.read(8)
        if len(item) < 8:
            raise InputError(f"{path}: truncated DICOM file: it ends inside its compressed pixel data (after "
                             f"{max(items - 1, 0)} fragments, no sequence delimiter).")  # fmt: skip
        tag, length = struct.unpack(endian + "HH", item[:4]), struct.unpack(endian + "I", item[4:])[0]
        if tag == _SEQUENCE_END:
            break
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise InputError(f"{path}: damaged DICOM file: ({tag[0]:04X},{tag[1]:04X}) inside its compressed pixel "
                             "data, where items are expected.")  # fmt: skip
        if offset + 8 + length > size:
            raise InputError(f"{path}: truncated DICOM file: pixel data fragment {items} declares {length:,} bytes, "
                             f"the file holds {size - offset - 8:,} of them.")  # fmt: skip
        if items and length >= 42:
            _check_jpeg2000_header(path, fp.read(42), image)
        items += 1
        offset += 8 + length
    if items < 2:
        raise InputError(f"{path}: damaged DICOM file: its compressed pixel data holds no fragment.")
    return offset + 8


def _check_trailing_elements(path: Path, fp: BinaryIO, offset: int, size: int, implicit: bool, endian: str) -> None:
    """Walk the elements after the pixel data (usually none, or a padding element) by their headers."""
    while offset < size:
        tag, length, value_start = _element_header(path, fp, offset, implicit, endian, "an element after the pixels")
        if length == 0xFFFFFFFF:
            return  # a sequence of undefined length: its items are not walked
        if value_start + length > size:
            raise InputError(f"{path}: truncated DICOM file: it ends inside ({tag[0]:04X},{tag[1]:04X}), after its "
                             "pixel data.")  # fmt: skip
        offset = value_start + length


def _check_jpeg2000_header(path: Path, start: bytes, image: tuple[int, int, int]) -> None:
    """Compare a fragment's JPEG 2000 image header (SIZ), if it starts one, with Rows, Columns, SamplesPerPixel."""
    if not start.startswith(_JPEG2000_START):
        return
    xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz = struct.unpack(">6I", start[8:32])
    components = struct.unpack(">H", start[40:42])[0]
    rows, columns, samples = image
    if (xsiz - xosiz, ysiz - yosiz, components) != (columns, rows, samples) or not xtsiz or not ytsiz:
        raise InputError(f"{path}: damaged DICOM file: a JPEG 2000 frame declares {xsiz - xosiz}x{ysiz - yosiz} "
                         f"pixels of {components} components (tiles {xtsiz}x{ytsiz}), the DICOM header "
                         f"{columns}x{rows} of {samples}.")  # fmt: skip
