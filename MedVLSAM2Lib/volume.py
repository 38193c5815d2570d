"""The `Volume` type and its readers and writers (NIfTI, NRRD, MHA/MHD, DICOM series).

Conventions (DESIGN.md §3):
- ``Volume.array`` is indexed ``[k, j, i]`` (KJI), exactly like ``slicer.util.arrayFromVolume``.
- ``Volume.ijk_to_ras`` maps a voxel index ``(i, j, k, 1)`` to patient RAS millimetres.
- Files stored in LPS (NRRD, DICOM, MHA) are converted to RAS on reading and back on writing.
- Readers never change intensities beyond what the file format itself prescribes (DICOM
  RescaleSlope/Intercept, NIfTI scl_slope/scl_inter). CT-RATE v2 (``*_fixed``) volumes are already
  in HU; see :mod:`MedVLSAM2Lib.data.ctrate` for why no metadata rescale is applied to them.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import InputError

__all__ = [
    "Volume",
    "INTENSITIES",
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

logger = logging.getLogger(__name__)

# Flip between LPS and RAS (its own inverse).
lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm",)
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES


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
            raise InputError(f"{where}: ijk_to_ras must be a finite 4x4 matrix, got {self.ijk_to_ras!r}.")
        if abs(np.linalg.det(self.ijk_to_ras[:3, :3])) < 1e-12:
            raise InputError(f"{where}: ijk_to_ras is singular (zero spacing or degenerate directions).")

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


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def read_volume(path: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read a CT volume from NIfTI, NRRD, MHA/MHD, a DICOM file or a DICOM series folder.

    Args:
        path: a file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.seg.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``,
            ``.dcm``) or a folder holding one DICOM series.
        series_uid: which series to read when the folder holds several (see :func:`list_dicom_series`).

    Returns:
        The volume, array in KJI order and ``ijk_to_ras`` in RAS.

    Raises:
        InputError: the path is missing, its format unsupported, the file corrupt or truncated, the image
            not 3D, or the folder holds no or several DICOM series.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder.")
    if path.is_dir():
        return _read_dicom_series(path, series_uid)
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        volume = _read_nifti(path)
    elif suffix in ITK_SUFFIXES or suffix in DICOM_SUFFIXES:
        volume = _read_with_sitk(path)
    else:
        raise InputError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
            f"expected one of {', '.join(VOLUME_SUFFIXES)} or a DICOM series folder."
        )
    logger.info("read %s: shape KJI %s, axes %s", path, volume.array.shape, "".join(volume.axcodes))
    return volume


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


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)  # applies scl_slope / scl_inter as NIfTI prescribes
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise InputError(f"{path}: cannot read NIfTI ({err}); the file is truncated, corrupt or not NIfTI.") from err
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


def _read_with_sitk(path: Path) -> Volume:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown reason"
        raise InputError(
            f"{path}: cannot read image ({reason}); the file is corrupt or not a supported format."
        ) from err
    fmt = "dicom" if _suffix(path) in DICOM_SUFFIXES else _suffix(path).lstrip(".")
    return _sitk_to_volume(image, path, {"source_path": str(path), "format": fmt})


def list_dicom_series(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The DICOM series in a folder: ``uid``, ``description``, ``modality``, ``files`` (count), ``first_file``."""
    import SimpleITK as sitk

    folder = Path(folder)
    series = []
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
            }
        )
    return series


def _read_dicom_series(folder: Path, series_uid: str | None) -> Volume:
    import SimpleITK as sitk

    series = list_dicom_series(folder)
    if not series:
        raise InputError(f"{folder}: no DICOM series found in this folder (sub-folders are not searched).")
    if series_uid is None and len(series) > 1:
        listing = "\n".join(
            f"  - {s['uid'] or '(empty UID)'}: {s['description'] or '(no description)'}, "
            f"{s['modality'] or '?'}, {s['files']} files"
            for s in series
        )
        raise InputError(
            f"{folder}: the folder holds {len(series)} DICOM series; choose one with series_uid=:\n" + listing
        )
    chosen = series[0] if series_uid is None else next((s for s in series if s["uid"] == series_uid), None)
    if chosen is None:
        raise InputError(f"{folder}: no series with UID {series_uid!r}; present: {[s['uid'] for s in series]}.")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), chosen["uid"])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()  # applies RescaleSlope/Intercept: the array is in HU for CT
    except RuntimeError as err:
        raise InputError(f"{folder}: cannot read DICOM series {chosen['uid']!r} ({str(err).strip()}).") from err
    _check_even_slices(reader, files, image, folder)
    metadata = {
        "source_path": str(folder),
        "format": "dicom",
        "series_uid": chosen["uid"],
        "series_description": chosen["description"],
        "modality": chosen["modality"],
        "files": len(files),
    }
    return _sitk_to_volume(image, folder, metadata)


def _check_even_slices(reader: Any, files: tuple[str, ...], image: Any, folder: Path) -> None:
    """Refuse a series whose slices are unevenly spaced (a missing or unreadable file): SimpleITK would only warn
    and stretch the geometry."""
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    positions = []
    for n in range(len(files)):
        if not reader.HasMetaDataKey(n, "0020|0032"):
            return  # no per-slice positions (e.g. a multi-frame file): nothing to check
        positions.append(float(np.dot(normal, [float(v) for v in reader.GetMetaData(n, "0020|0032").split("\\")])))
    steps = np.diff(positions)
    if steps.size < 2:
        return
    expected = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - expected)))
    if abs(steps[worst] - expected) > 0.01 * abs(expected) + 1e-3:
        raise InputError(
            f"{folder}: slices are not evenly spaced: {steps[worst]:.3f} mm between {Path(files[worst]).name} and "
            f"{Path(files[worst + 1]).name}, {expected:.3f} mm elsewhere. A slice file is missing or damaged."
        )


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
