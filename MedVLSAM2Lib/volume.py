"""The `Volume` type and its readers and writers (NIfTI, NRRD, MHA/MHD, DICOM series).

Conventions (DESIGN.md §3):
- ``Volume.array`` is indexed ``[k, j, i]`` (KJI), exactly like ``slicer.util.arrayFromVolume``.
- ``Volume.ijk_to_ras`` maps a voxel index ``(i, j, k, 1)`` to patient RAS millimetres.
- Files stored in LPS (NRRD, DICOM, MHA) are converted to RAS on reading and back on writing.
- Readers never change intensities beyond what the file format itself prescribes (DICOM
  RescaleSlope/Intercept, NIfTI scl_slope/scl_inter). CT-RATE v2 (``*_fixed``) volumes are already
  in HU; see :mod:`MedVLSAM2Lib.data.ctrate` for why no metadata rescale is applied to them.
- Readers check every header before any pixel data is read (:mod:`MedVLSAM2Lib.volume_checks`): the voxels it
  declares against ``max_voxels`` and the bytes the file holds, each DICOM file's pixel data for truncation. Every
  failure is one line naming the file.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import CapacityError, InputError, MedVLSAM2Error
from .volume_checks import (
    DicomImage,
    Payload,
    check_payload,
    check_voxel_count,
    metaimage_payload,
    nrrd_payload,
    scan_dicom_file,
)

__all__ = [
    "Volume",
    "DEFAULT_MAX_VOXELS",
    "INTENSITIES",
    "CT_MIN_RANGE_HU",
    "check_ct",
    "VOLUME_SUFFIXES",
    "read_volume",
    "write_volume",
    "list_dicom_series",
    "lps_to_ras",
    "orientation_transform",
    "reorient_points",
]

# How a volume's voxel values are given: "hu" (Hounsfield units) or "normalized" (an affine rescaling of HU, clipped
# at the extremes at most: M3D-Seg's z-scores, min-max images).
INTENSITIES = ("hu", "normalized")
# A CT in Hounsfield units spans air (about -1000) to bone (hundreds); a narrower range rejects images that are not.
CT_MIN_RANGE_HU = 200.0

logger = logging.getLogger(__name__)

# Flip between LPS and RAS (its own inverse).
lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm",)
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES
# Geometry a scanner can produce, with wide margins: a voxel between 0.1 µm and 100 m, the first voxel within 1 km.
MIN_SPACING_MM, MAX_SPACING_MM, MAX_ORIGIN_MM = 1e-4, 1e5, 1e6


@dataclass
class Volume:
    """A 3D scalar image on a voxel grid.

    Attributes:
        array: voxel values, shape ``(K, J, I)`` (slices, rows, columns), any numeric dtype.
        ijk_to_ras: ``(4, 4)`` float64 affine from voxel index ``(i, j, k)`` to RAS millimetres.
        metadata: free-form facts about the source (``source_path``, ``modality``, ``series_description`` …).
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        where = self.metadata.get("source_path", "volume")
        if self.array.ndim != 3:
            raise InputError(f"{where}: expected a 3D array (K, J, I), got shape {self.array.shape}.")
        if not (np.issubdtype(self.array.dtype, np.number) or self.array.dtype == np.bool_):
            raise InputError(
                f"{where}: voxels must be scalar numbers, got dtype {self.array.dtype} (RGB/vector image?)."
            )
        if self.ijk_to_ras.shape != (4, 4) or not np.all(np.isfinite(self.ijk_to_ras)):
            raise InputError(f"{where}: ijk_to_ras must be a finite 4x4 matrix, got {self.ijk_to_ras.tolist()}.")
        with np.errstate(over="ignore"):  # an absurd matrix overflows to inf, which the checks below refuse
            singular = abs(np.linalg.det(self.ijk_to_ras[:3, :3])) < 1e-12
            spacing = np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)
        if singular:
            raise InputError(f"{where}: ijk_to_ras is singular (zero spacing or degenerate directions).")
        if not np.all((spacing >= MIN_SPACING_MM) & (spacing <= MAX_SPACING_MM)):
            raise InputError(f"{where}: voxel spacing {spacing.tolist()} mm (the columns of ijk_to_ras) is outside "
                             f"{MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm.")  # fmt: skip
        if np.any(np.abs(self.ijk_to_ras[:3, 3]) > MAX_ORIGIN_MM) or not np.allclose(self.ijk_to_ras[3], (0, 0, 0, 1)):
            raise InputError(f"{where}: ijk_to_ras must end with the row 0 0 0 1 and place voxel (0, 0, 0) within "
                             f"{MAX_ORIGIN_MM:g} mm of the origin, got {self.ijk_to_ras.tolist()}.")  # fmt: skip

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Number of voxels along i, j, k."""
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k, shape ``(3,)``."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """Affine from voxel index to LPS millimetres (ITK, DICOM and NRRD convention)."""
        return lps_to_ras @ self.ijk_to_ras

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Closest anatomical direction of the i, j, k axes, e.g. ``("L", "P", "S")``."""
        import nibabel.orientations as nio

        return tuple(nio.aff2axcodes(self.ijk_to_ras))

    def contains_ijk(self, point_ijk: np.ndarray | tuple[float, float, float]) -> bool:
        """Whether a continuous voxel coordinate lies inside the volume (voxel centres at integers)."""
        p = np.asarray(point_ijk, dtype=np.float64)
        upper = np.asarray(self.shape_ijk, dtype=np.float64) - 0.5
        return bool(np.all(p >= -0.5) and np.all(p <= upper))

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume on the same grid holding another array of the same shape (e.g. a mask)."""
        if array.shape != self.array.shape:
            raise InputError(f"Array shape {array.shape} does not match the volume's {self.array.shape}.")
        return Volume(array, self.ijk_to_ras.copy(), dict(self.metadata))

    def reoriented(self, axcodes: str = "LPS") -> Volume:
        """The same voxels with axes permuted/flipped so that i, j, k point along ``axcodes``.

        Exact: no resampling, only transposes and flips; the world position of every voxel is kept.
        """
        import nibabel.orientations as nio

        transform = orientation_transform(self.ijk_to_ras, axcodes)
        array_ijk = nio.apply_orientation(self.array.transpose(2, 1, 0), transform)
        new_affine = self.ijk_to_ras @ nio.inv_ornt_aff(transform, self.shape_ijk)
        return Volume(np.ascontiguousarray(array_ijk.transpose(2, 1, 0)), new_affine, dict(self.metadata))


def check_ct(volume: Volume, intensity: str = "hu") -> None:
    """Reject what cannot be a CT volume for this model: fewer than 2 voxels along an axis, non-finite
    voxels, or (``intensity="hu"``) a range too narrow for Hounsfield units; an already normalised volume
    (``intensity="normalized"``, e.g. M3D-Seg's z-scores) must only not be constant."""
    where = volume.metadata.get("source_path", "volume")
    if intensity not in INTENSITIES:
        raise InputError(f"unknown intensity {intensity!r}; choose one of {list(INTENSITIES)}.")
    if min(volume.array.shape) < 2:
        raise InputError(f"{where}: shape (K, J, I) {volume.array.shape} is 2D; the model needs a 3D CT volume.")
    low, high = float(np.min(volume.array)), float(np.max(volume.array))
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InputError(f"{where}: the volume holds NaN or infinite voxels.")
    if intensity == "normalized" and high <= low:
        raise InputError(f"{where}: the volume is constant ({low:g}); there is nothing to see.")
    if intensity == "hu" and high - low < CT_MIN_RANGE_HU:
        raise InputError(
            f"{where}: voxel values span only {low:g}..{high:g}; a CT in Hounsfield units spans at least "
            f"{CT_MIN_RANGE_HU:g} HU (air about -1000). Is this a CT, and is it in HU? (Already normalised data "
            "such as M3D-Seg: encode with intensity='normalized'.)"
        )


def reorient_points(
    points_ijk: np.ndarray, transform: np.ndarray, shape_ijk: tuple[int, int, int], *, inverse: bool = False
) -> np.ndarray:
    """Map ``(N, 3)`` voxel coordinates through a nibabel orientation ``transform`` (as used by
    :meth:`Volume.reoriented`), or back with ``inverse=True``; ``shape_ijk`` is the source grid's size."""
    points = np.atleast_2d(np.asarray(points_ijk, dtype=np.float64))
    out = np.empty_like(points)
    for axis, (target, flip) in enumerate(np.asarray(transform)):
        target = int(target)
        value = points[:, target] if inverse else points[:, axis]
        mapped = shape_ijk[axis] - 1 - value if flip < 0 else value
        out[:, axis if inverse else target] = mapped
    return out


def orientation_transform(ijk_to_ras: np.ndarray, axcodes: str) -> np.ndarray:
    """nibabel orientation transform (``(3, 2)`` array) taking a grid's axes to ``axcodes``."""
    import nibabel.orientations as nio

    pairs = [{"L", "R"}, {"A", "P"}, {"S", "I"}]
    codes = axcodes.upper()
    if len(codes) != 3 or sorted(sum(c in pair for c in codes) for pair in pairs) != [1, 1, 1]:
        raise InputError(f"axcodes must be three letters from L/R, A/P, S/I such as 'LPS', got {axcodes!r}.")
    return nio.ornt_transform(nio.io_orientation(ijk_to_ras), nio.axcodes2ornt(tuple(codes)))


# ---------------------------------------------------------------- reading

# The most voxels a file may declare (all axes and components) unless the caller says otherwise: 512 x 512 x 4096 =
# 2**30, a whole-body CT at full resolution (2 m in 0.5 mm slices is 4000 slices; 2 GiB as int16), and the limit the
# wire protocol and the server applied before this constant existed. The CLI and the server default to it.
DEFAULT_MAX_VOXELS = 512 * 512 * 4096


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def read_volume(
    path: str | os.PathLike, *, series_uid: str | None = None, max_voxels: int = DEFAULT_MAX_VOXELS
) -> Volume:
    """Read a CT volume from NIfTI, NRRD, MHA/MHD, a DICOM file or a DICOM series folder.

    Every header is checked before any pixel data is read: the voxels it declares against ``max_voxels`` and against
    the bytes the file holds, and each DICOM file's pixel data for truncation. Failures are one line naming the file.

    Args:
        path: a file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.seg.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``,
            ``.dcm``) or a folder holding one DICOM series.
        series_uid: which series to read when the folder holds several (see :func:`list_dicom_series`).
        max_voxels: the most voxels the file may declare, all axes and components counted.

    Returns:
        The volume, array in KJI order and ``ijk_to_ras`` in RAS.

    Raises:
        TooLargeError: the header declares more than ``max_voxels`` voxels.
        InputError: the path is missing, its format unsupported, the file corrupt or truncated (a DICOM slice
            missing from its series, one cut short), the image not 3D, or the folder holds no DICOM series, or
            several and ``series_uid`` names none of them.
        CapacityError: the memory ran out while reading a volume within the limit.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder.")
    if path.is_dir():
        return _read_dicom_series(path, series_uid, max_voxels)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        volume = _read_nifti(path, max_voxels)
    elif suffix in ITK_SUFFIXES or suffix in DICOM_SUFFIXES:
        volume = _read_with_sitk(path, max_voxels)
    else:
        raise InputError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
            f"expected one of {', '.join(VOLUME_SUFFIXES)} or a DICOM series folder."
        )
    logger.info("read %s: shape KJI %s, axes %s", path, volume.array.shape, "".join(c or "?" for c in volume.axcodes))
    return volume


class _Silenced:
    """Keeps a library's console output off while any read needs it (reads may run in several threads) and puts
    back what was there when the last one ends."""

    def __init__(self, is_on: Callable[[], bool], turn: Callable[[bool], None]) -> None:
        self._is_on, self._turn = is_on, turn
        self._lock, self._users, self._saved = threading.Lock(), 0, True

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = self._is_on()
                self._turn(False)
            self._users += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._turn(self._saved)


def _itk_warnings_on() -> bool:
    import SimpleITK as sitk

    return bool(sitk.ProcessObject.GetGlobalWarningDisplay())


def _turn_itk_warnings(on: bool) -> None:
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(on)


def _nibabel_log_on() -> bool:
    return not logging.getLogger("nibabel.global").disabled


def _turn_nibabel_log(on: bool) -> None:
    logging.getLogger("nibabel.global").disabled = not on


# ITK prints warnings such as "Non uniform sampling or missing slices detected" on the console, around the one-line
# error a caller shows; the facts they report are checked here instead (_check_even_slices).
_ITK_WARNINGS = _Silenced(_itk_warnings_on, _turn_itk_warnings)
# nibabel logs the header problems it repairs ("sizeof_hdr should be 348") through a console handler of its own.
_NIBABEL_LOG = _Silenced(_nibabel_log_on, _turn_nibabel_log)


def _reason(err: BaseException) -> str:
    """The informative line of a reader's error message. ITK's has several: where it was thrown, the filter and its
    address, then the cause, which teem (NRRD) nests as ``[nrrd] function: ...`` lines, innermost last."""
    lines, nested = [], []
    for raw in str(err).splitlines():
        line = re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-fA-F]+\):|sitk::ERROR:|\[\w+\] \w+:)\s*", "", raw.strip())
        if line and not line.startswith("Exception thrown in SimpleITK") and not line.endswith(":"):
            (nested if raw.startswith("[") else lines).append(line)
    reason = nested[-1] if nested else lines[0] if lines else type(err).__name__
    return reason if len(reason) <= 200 else reason[:199] + "…"


@contextmanager
def _reading(where: Path, what: str, advice: str, quiet: _Silenced) -> Iterator[None]:
    """Run a third-party reader with its console output off; any failure of it becomes one line naming ``where``."""
    with quiet:
        try:
            yield
        except MedVLSAM2Error:
            raise
        except MemoryError as err:
            raise CapacityError(f"{where}: not enough memory to read this {what}; free memory or use a machine with "
                                "more.") from err  # fmt: skip
        except Exception as err:  # readers of untrusted files fail in many ways: each means a bad file
            raise InputError(f"{where}: cannot read {what} ({_reason(err)}); {advice}") from err


def _as_3d(array: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton axes beyond 3 and reject anything that is not a real 3D image."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim < 3 or min(array.shape[:3]) < 2:
        raise InputError(
            f"{path}: this is a 2D image (shape {array.shape}); MedVL-SAM2 needs a 3D volume with at least "
            "2 voxels along every axis. For a DICOM slice, give the folder holding the whole series."
        )
    if array.ndim > 3:
        raise InputError(f"{path}: {array.ndim}D image (shape {array.shape}); give a single 3D scalar volume.")
    return array


def _read_nifti(path: Path, max_voxels: int) -> Volume:
    import nibabel as nib

    advice = "the file is truncated, corrupt or not NIfTI."
    with _reading(path, "NIfTI", advice, _NIBABEL_LOG):
        image = nib.load(str(path))  # the header only
    header = image.header
    shape = tuple(int(n) for n in header.get_data_shape())
    check_voxel_count(path, shape, max_voxels)
    compressed = path.name.lower().endswith(".gz")
    offset = 0 if compressed else int(image.dataobj.offset)  # the header copy's offset is reset to 0
    item_bytes = header.get_data_dtype().itemsize
    check_payload(path, Payload(path, offset, shape, item_bytes, "deflate" if compressed else "raw"))
    with _reading(path, "NIfTI", advice, _NIBABEL_LOG):
        data = np.asanyarray(image.dataobj)  # applies scl_slope / scl_inter as NIfTI prescribes
    data = _as_3d(data, path)  # nibabel gives (i, j, k)
    metadata = {"source_path": str(path), "format": "nifti"}
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), image.affine, metadata)


def _sitk_to_volume(image: Any, path: Path, metadata: dict[str, Any]) -> Volume:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: {image.GetNumberOfComponentsPerPixel()}-component (vector/RGB) image; give a scalar CT volume."
        )
    if image.GetDimension() < 3:
        raise InputError(f"{path}: this is a 2D image (size {image.GetSize()}); MedVL-SAM2 needs a 3D volume.")
    if image.GetDimension() > 3:
        if image.GetSize()[3:] != (1,) * (image.GetDimension() - 3):
            raise InputError(
                f"{path}: {image.GetDimension()}D image of size {image.GetSize()}; give a single 3D volume "
                "(for a .seg.nrrd with overlapping segments use read_segmentation)."
            )
        extract_size = list(image.GetSize()[:3]) + [0] * (image.GetDimension() - 3)
        image = sitk.Extract(image, extract_size, [0] * image.GetDimension())
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    array = _as_3d(sitk.GetArrayFromImage(image), path)  # SimpleITK's array order is already KJI
    return Volume(np.ascontiguousarray(array), lps_to_ras @ ijk_to_lps, metadata)


def _read_with_sitk(path: Path, max_voxels: int) -> Volume:
    import SimpleITK as sitk

    suffix = _suffix(path)
    if suffix in DICOM_SUFFIXES:
        dicom = scan_dicom_file(path)
        if dicom is not None and not dicom.pixels:
            raise InputError(f"{path}: no pixel data in this DICOM file; it is truncated or not an image.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    advice = "the file is truncated, corrupt or not a supported format."
    with _reading(path, "image", advice, _ITK_WARNINGS):
        reader.ReadImageInformation()  # the header only
    components = reader.GetNumberOfComponents()
    check_voxel_count(path, reader.GetSize() + ((components,) if components > 1 else ()), max_voxels)
    if suffix in (".seg.nrrd", ".nrrd", ".nhdr"):
        payload = nrrd_payload(path)
    else:
        payload = metaimage_payload(path) if suffix in (".mha", ".mhd") else None
    if payload is not None:
        check_payload(path, payload)
    with _reading(path, "image", advice, _ITK_WARNINGS):
        image = reader.Execute()
    fmt = "dicom" if suffix in DICOM_SUFFIXES else suffix.lstrip(".")
    return _sitk_to_volume(image, path, {"source_path": str(path), "format": fmt})


def _scan_dicom_folder(folder: Path) -> dict[str, DicomImage | None]:
    """Each file's DICOM header in ``folder`` (not sub-folders), by name, its pixel data checked for truncation.
    GDCM reads every file of a folder whole to list its series, which one truncated JPEG 2000 slice makes cost
    gigabytes: this runs first, with bounded cost."""
    return {p.name: scan_dicom_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _gdcm_series(folder: Path) -> list[dict[str, Any]]:
    import SimpleITK as sitk

    series = []
    with _ITK_WARNINGS:
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
            reader = sitk.ImageFileReader()
            reader.SetFileName(files[0])
            reader.ReadImageInformation()

            def tag(key: str, reader: Any = reader) -> str:
                return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

            series.append(
                {
                    "uid": uid,
                    "description": tag("0008|103e"),
                    "modality": tag("0008|0060"),
                    "files": len(files),
                    "first_file": files[0],
                    "size": tuple(int(n) for n in reader.GetSize()),
                }
            )
    return series


def list_dicom_series(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The DICOM series in a folder: ``uid``, ``description``, ``modality``, ``files`` (count), ``first_file`` and
    ``size`` (the first file's voxels along i, j, k).

    Raises:
        InputError: a DICOM file in the folder is damaged or truncated (checked first: GDCM's listing would read it).
    """
    folder = Path(folder)
    _scan_dicom_folder(folder)
    return _gdcm_series(folder)


def _series_listing(series: list[dict[str, Any]]) -> str:
    """The series of a folder on one line, each with what a user needs to choose it."""
    return "; ".join(
        f"{s['uid'] or repr('') + ' (empty UID)'} ({repr(s['description']) if s['description'] else 'no description'}, "
        f"{s['modality'] or '?'}, {s['files']} files)"
        for s in series
    )


def _choose_series(folder: Path, series: list[dict[str, Any]], series_uid: str | None) -> dict[str, Any]:
    if not series:
        raise InputError(f"{folder}: no DICOM series found in this folder (sub-folders are not searched).")
    if series_uid is None:
        if len(series) > 1:
            raise InputError(f"{folder}: the folder holds {len(series)} DICOM series; choose one with --series UID "
                             f"(series_uid= in Python): {_series_listing(series)}.")  # fmt: skip
        return series[0]
    for s in series:
        if s["uid"] == series_uid:
            return s
    raise InputError(f"{folder}: no DICOM series with UID {series_uid!r} in this folder; it holds "
                     f"{_series_listing(series)}. Choose one with --series UID.")  # fmt: skip


def _read_dicom_series(folder: Path, series_uid: str | None, max_voxels: int) -> Volume:
    import SimpleITK as sitk

    scanned = _scan_dicom_folder(folder)
    chosen = _choose_series(folder, _gdcm_series(folder), series_uid)
    uid = chosen["uid"]
    with _ITK_WARNINGS:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    images = _series_images(folder, uid, files, scanned)
    columns, rows, frames = chosen["size"]
    check_voxel_count(
        folder, (columns, rows, frames * len(files)), max_voxels, declared_by="the series' headers declare"
    )
    _check_even_slices(folder, images)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with _reading(folder, f"DICOM series {uid!r}", "a file is damaged or in an unsupported format.", _ITK_WARNINGS):
            image = reader.Execute()  # applies RescaleSlope/Intercept: the array is in HU for CT
    except InputError as err:
        culprit = _unreadable_slice(files)
        if culprit is None:
            raise
        raise culprit from err
    metadata = {
        "source_path": str(folder),
        "format": "dicom",
        "series_uid": uid,
        "series_description": chosen["description"],
        "modality": chosen["modality"],
        "files": len(files),
    }
    return _sitk_to_volume(image, folder, metadata)


def _series_images(
    folder: Path, uid: str, files: Sequence[str], scanned: dict[str, DicomImage | None]
) -> list[DicomImage | None]:
    """The checked headers of a series' files in GDCM's slice order (``None``: not read by pydicom), after making sure
    that GDCM left out no file of the series, that each has pixel data, and that all have one image size.

    Raises:
        InputError: naming the first file that fails.
    """
    listed = {Path(f).name for f in files}
    for name, image in scanned.items():
        if image is not None and image.series_uid == uid and name not in listed:
            why = "it has no pixel data" if not image.pixels else "GDCM cannot read it"
            raise InputError(f"{folder / name}: this file of DICOM series {uid!r} is left out of it ({why}); it is "
                             "truncated or damaged. Replace it or move it out of the folder.")  # fmt: skip
    images = [scanned.get(Path(f).name) for f in files]
    known = [image for image in images if image is not None]
    for image in known:
        if not image.pixels:
            raise InputError(f"{image.path}: no pixel data in this file of DICOM series {uid!r}; it is truncated or "
                             "not an image.")  # fmt: skip
    for image in known:
        first = known[0]
        if (image.rows, image.columns, image.frames) != (first.rows, first.columns, first.frames):
            raise InputError(f"{image.path}: {image.columns}x{image.rows} pixels in {image.frames} frames, where "
                             f"{first.path.name} of the same series has {first.columns}x{first.rows} in "
                             f"{first.frames}; a series needs one image size.")  # fmt: skip
    return images


def _check_even_slices(folder: Path, images: Sequence[DicomImage | None]) -> None:
    """Refuse a series whose slices are unevenly spaced or stacked (a missing, damaged or duplicated file) from the
    positions in their headers, before the pixels are read: ITK would only warn and stretch the geometry."""
    slices = [image for image in images if image is not None and image.frames == 1 and image.position is not None]
    orientation = slices[0].orientation if slices else None
    if len(images) < 3 or len(slices) < len(images) or orientation is None:
        return  # too few slices, or no per-slice positions (e.g. multi-frame files): nothing to check
    normal = np.cross(orientation[:3], orientation[3:])
    along = np.array([float(np.dot(normal, image.position)) for image in slices])
    order = np.argsort(along, kind="stable")  # GDCM's order is by position, unless two positions coincide
    names = [slices[n].path.name for n in order]
    steps = np.diff(along[order])
    if np.any(steps < 1e-3):
        n = int(np.argmax(steps < 1e-3))
        raise InputError(f"{folder}: {names[n]} and {names[n + 1]} lie at the same position; the series holds "
                         "duplicated files or several acquisitions.")  # fmt: skip
    expected = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - expected)))
    if abs(steps[worst] - expected) > 0.01 * expected + 1e-3:
        raise InputError(
            f"{folder}: slices are not evenly spaced: {steps[worst]:.3f} mm between {names[worst]} and "
            f"{names[worst + 1]}, {expected:.3f} mm elsewhere. A slice file is missing or damaged."
        )


def _unreadable_slice(files: Sequence[str]) -> InputError | None:
    """The first file of a series that SimpleITK cannot read alone, as an error naming it (one slice at a time, so
    the memory stays that of one slice); ``None`` when each reads."""
    import SimpleITK as sitk

    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        try:
            with _ITK_WARNINGS:
                reader.Execute()
        except RuntimeError as err:
            return InputError(f"{name}: cannot decode this DICOM slice ({_reason(err)}); the file is damaged.")
    return None


# ---------------------------------------------------------------- writing


def _writable(array: np.ndarray, path: Path) -> np.ndarray:
    """Masks (bool) become uint8; 64-bit integers become int32 when their values fit (NIfTI has no int64 reader
    everywhere)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype in (np.int64, np.uint64):
        info = np.iinfo(np.int32)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InputError(f"{path}: 64-bit values outside the int32 range cannot be written; rescale them first.")
        return array.astype(np.int32)
    return array


def write_volume(volume: Volume, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write a volume (or a mask/label map) to NIfTI, NRRD or MHA, chosen by the file suffix.

    The file appears complete or not at all (written to a temporary name, then renamed).

    Raises:
        InputError: unsupported suffix (use :func:`MedVLSAM2Lib.segmentation.write_segmentation` for ``.seg.nrrd``).
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix == ".seg.nrrd":
        raise InputError(f"{path}: write segmentations with MedVLSAM2Lib.segmentation.write_segmentation.")
    if suffix not in NIFTI_SUFFIXES + (".nrrd", ".mha"):
        raise InputError(f"{path}: cannot write {suffix!r}; use .nii.gz, .nii, .nrrd or .mha.")
    array = _writable(volume.array, path)
    with atomic_path(path) as tmp:
        if suffix in NIFTI_SUFFIXES:
            import nibabel as nib

            image = nib.Nifti1Image(array.transpose(2, 1, 0), volume.ijk_to_ras)
            image.set_qform(volume.ijk_to_ras, code=1)
            image.set_sform(volume.ijk_to_ras, code=1)
            nib.save(image, str(tmp))
        else:
            import SimpleITK as sitk

            image = sitk.GetImageFromArray(array)  # KJI array -> image of size (I, J, K)
            lps = volume.ijk_to_lps
            spacing = np.linalg.norm(lps[:3, :3], axis=0)
            image.SetSpacing(spacing.tolist())
            image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
            image.SetOrigin(lps[:3, 3].tolist())
            sitk.WriteImage(image, str(tmp), useCompression=compress)
    return path
