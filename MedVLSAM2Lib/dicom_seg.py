"""DICOM Segmentation (SEG) export with highdicom: our masks as binary segments that reference the source series.

A SEG object is only meaningful beside the images it segments: every frame names the source image (SOP Instance
UID) it lies on, and the patient, study and frame of reference are copied from the sources. So the input must be a
DICOM series, and our masks must be on that series' own grid, as :func:`MedVLSAM2Lib.volume.read_volume` reads it:
``mask[k, j, i]`` where ``j`` is the source image's row, ``i`` its column and ``k`` the slice. Which source image is
slice ``k`` is worked out from ``ImagePositionPatient``, never from file names or the caller's order (see
:func:`slice_indices`).

Each segment gets its label, SNOMED CT codes from :mod:`MedVLSAM2Lib.terminology` (a label without an entry gets
"Tissue", Slicer's default for a new segment), its colour, and the algorithm identification (MedVLSAM2, the package
version, family "Artificial Intelligence", type AUTOMATIC). highdicom is imported only when a SEG is written.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_path
from .errors import InputError, MedVLSAM2Error
from .results import ObjectMask, SegmentResult
from .volume import Volume, list_dicom_series, lps_to_ras

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = [
    "ALGORITHM_NAME",
    "GENERIC_CODE",
    "REQUIRED_SOURCE_ATTRIBUTES",
    "read_sources",
    "series_files",
    "slice_indices",
    "source_files",
    "write_dicom_seg",
]

logger = logging.getLogger(__name__)

ALGORITHM_NAME = "MedVLSAM2"
MANUFACTURER = "MedVLSAM2 developers"
SERIES_DESCRIPTION = "MedVLSAM2 segmentation"
# Well above the series numbers a scanner gives its own series (1, 2, 3 …), so the SEG sorts after them in viewers.
SERIES_NUMBER = 1000
# SNOMED CT "Tissue" (pydicom's codes.SCT.Tissue), as category and type: what 3D Slicer gives a new segment, and the
# honest claim for a label our terminology does not know (it may be an organ, a lesion or a description).
GENERIC_CODE = ("SCT", "85756007", "Tissue")
# What a source image must carry for a SEG to reference it and lie in its space.
REQUIRED_SOURCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                              "FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient",
                              "PixelSpacing", "Rows", "Columns")  # fmt: skip
LABEL_LENGTH = 64  # SegmentLabel is a DICOM LO: at most 64 characters
# How far (in voxels) a source image's position may lie from a voxel centre of the masks' grid.
GRID_TOLERANCE = 0.05


def source_files(folder: str | os.PathLike, series_uid: str | None = None) -> list[Path]:
    """The files of the DICOM series in ``folder``, as :func:`~MedVLSAM2Lib.volume.read_volume` reads them.

    Raises:
        InputError: ``folder`` is not a folder, holds no DICOM series, or several and ``series_uid`` is not given.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; a DICOM SEG needs the folder of the DICOM series it segments.")
    series = list_dicom_series(folder)
    if not series:
        raise InputError(f"{folder}: no DICOM series found in this folder (sub-folders are not searched).")
    if series_uid is None and len(series) > 1:
        raise InputError(f"{folder}: the folder holds {len(series)} DICOM series; keep one series per folder.")
    uid = series[0]["uid"] if series_uid is None else series_uid
    if uid not in {s["uid"] for s in series}:
        raise InputError(f"{folder}: no series with UID {uid!r}; present: {[s['uid'] for s in series]}.")
    return [Path(name) for name in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)]


def series_files(volume: Volume) -> list[Path]:
    """The source files of a volume that :func:`~MedVLSAM2Lib.volume.read_volume` read from a DICOM folder.

    Raises:
        InputError: the volume was not read from a DICOM series folder.
    """
    where = volume.metadata.get("source_path")
    if volume.metadata.get("format") != "dicom" or not where or not Path(where).is_dir():
        raise InputError(f"DICOM SEG output needs a DICOM series input (it references the source images); got "
                         f"{where or 'a volume without a source folder'}.")  # fmt: skip
    return source_files(where, volume.metadata.get("series_uid"))


def _blank(value: Any) -> bool:
    """An attribute that is absent or present without a value (``""``, an empty list of numbers)."""
    return value is None or (hasattr(value, "__len__") and len(value) == 0)


def read_sources(files: Sequence[str | os.PathLike]) -> list[Dataset]:
    """Read the headers (no pixel data) of a series' single-frame images and check that a SEG can reference them.

    Raises:
        InputError: no files, a file that is not DICOM, a multi-frame image, a missing or empty attribute of
            :data:`REQUIRED_SOURCE_ATTRIBUTES` (anonymisers sometimes blank the UIDs), or images of several series.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not files:
        raise InputError("no source DICOM files given; a DICOM SEG references the images it segments.")
    datasets = []
    for name in files:
        try:
            dataset = pydicom.dcmread(str(name), stop_before_pixels=True)
        except (OSError, InvalidDicomError) as err:
            raise InputError(f"{name}: cannot read as DICOM ({err}).") from err
        missing = [key for key in REQUIRED_SOURCE_ATTRIBUTES if _blank(dataset.get(key))]
        if missing:
            raise InputError(f"{name}: no {', '.join(missing)}; a DICOM SEG must reference its source images by "
                             "these (was the series anonymised without new UIDs?).")  # fmt: skip
        if int(dataset.get("NumberOfFrames") or 1) != 1:
            raise InputError(f"{name}: a multi-frame image; DICOM SEG export supports series of single-frame images.")
        datasets.append(dataset)
    series = {d.SeriesInstanceUID for d in datasets}
    if len(series) != 1:
        raise InputError(f"the source files belong to {len(series)} series; give the files of one series.")
    return datasets


def _position(dataset: Dataset) -> np.ndarray:
    return np.asarray([float(v) for v in dataset.ImagePositionPatient])


def slice_indices(datasets: Sequence[Dataset], shape_kji: tuple[int, int, int],
                  ijk_to_ras: np.ndarray | None = None) -> list[int]:  # fmt: skip
    """The slice ``k`` of a ``(K, J, I)`` mask grid that each source image (in the order given) lies on.

    With ``ijk_to_ras`` (the grid of the masks), every image's ``ImagePositionPatient`` must sit on voxel
    ``(0, 0, k)`` and its row and column directions on the grid's ``i`` and ``j`` axes: this checks the masks really
    are on the series' grid and finds ``k`` whichever way the grid's ``k`` axis runs. Without it, ``k`` is the rank
    of the image's position along its slice normal (row × column direction), ascending: the order in which
    SimpleITK (GDCM) and 3D Slicer stack a series.

    Raises:
        InputError: image count, rows or columns differ from the grid, two images share a position, or an image
            does not lie on the grid (the volume was reoriented, resampled or is another series).
    """
    k_count, rows, columns = shape_kji
    if len(datasets) != k_count:
        raise InputError(f"the masks have {k_count} slices but the series has {len(datasets)} images.")
    for dataset in datasets:
        if (int(dataset.Rows), int(dataset.Columns)) != (rows, columns):
            raise InputError(f"the masks' slices are {rows}x{columns} (rows x columns) but source image "
                             f"{dataset.SOPInstanceUID} is {dataset.Rows}x{dataset.Columns}.")  # fmt: skip
    if ijk_to_ras is None:
        orientation = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient])
        normal = np.cross(orientation[:3], orientation[3:])
        along = [float(normal @ _position(d)) for d in datasets]
        if len(set(np.round(along, 4))) != len(along):
            raise InputError("two source images lie at the same position; the series holds duplicate slices.")
        order = np.argsort(along)
        indices = np.empty(len(along), int)
        indices[order] = np.arange(len(along))
        return indices.tolist()
    return _indices_on_grid(datasets, shape_kji, np.asarray(ijk_to_ras, float))


def _indices_on_grid(datasets: Sequence[Dataset], shape_kji: tuple[int, int, int], ijk_to_ras: np.ndarray) -> list[int]:
    ijk_to_lps = lps_to_ras @ ijk_to_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    lps_to_ijk = np.linalg.inv(ijk_to_lps)
    indices = []
    for dataset in datasets:
        orientation = np.asarray([float(v) for v in dataset.ImageOrientationPatient])
        ijk = (lps_to_ijk @ np.append(_position(dataset), 1.0))[:3]
        k = int(round(ijk[2]))
        on_grid = (np.allclose(ijk_to_lps[:3, 0] / spacing[0], orientation[:3], atol=1e-3)
                   and np.allclose(ijk_to_lps[:3, 1] / spacing[1], orientation[3:], atol=1e-3)
                   and np.all(np.abs(ijk - [0, 0, k]) <= GRID_TOLERANCE) and 0 <= k < shape_kji[0])  # fmt: skip
        if not on_grid:
            raise InputError(f"source image {dataset.SOPInstanceUID} does not lie on a slice of the masks' grid (it "
                             f"sits at voxel {np.round(ijk, 2).tolist()}); the masks must be on the series' own "
                             "grid, as read_volume reads it, not reoriented or resampled.")  # fmt: skip
        indices.append(k)
    if sorted(indices) != list(range(shape_kji[0])):
        raise InputError("two source images lie on the same slice of the masks' grid; duplicate slices?")
    return indices


def _pairs(segments: SegmentResult | Sequence[ObjectMask | tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    items = segments.objects if isinstance(segments, SegmentResult) else segments
    pairs = [(item.label, item.mask) if isinstance(item, ObjectMask) else (str(item[0]), item[1]) for item in items]
    if not pairs:
        raise InputError("nothing to write: no segments.")
    masks = [np.asarray(mask) for _, mask in pairs]
    shapes = {mask.shape for mask in masks}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise InputError(f"all segment masks must be 3D (K, J, I) and of one shape, got {sorted(shapes)}.")
    if not any(mask.any() for mask in masks):
        raise InputError("every segment is empty; there is nothing to write as a DICOM SEG.")
    return [(label, mask != 0) for (label, _), mask in zip(pairs, masks, strict=True)]


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("MedVLSAM2Lib")
    except metadata.PackageNotFoundError:
        return "unknown"


def _description(hd: Any, number: int, label: str, algorithm: Any, algorithm_type: str) -> Any:
    """One segment: label, codes and colour from our terminology (``Tissue`` and a default colour when unknown)."""
    from .segmentation import DEFAULT_COLORS
    from .terminology import lookup

    color, terminology = lookup(label) or (DEFAULT_COLORS[(number - 1) % len(DEFAULT_COLORS)], None)
    category, kind = (terminology["category"], terminology["type"]) if terminology else (GENERIC_CODE, GENERIC_CODE)
    if len(label) > LABEL_LENGTH:
        logger.warning("segment label %r cut to DICOM's %d characters", label, LABEL_LENGTH)
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label[:LABEL_LENGTH],
        segmented_property_category=hd.sr.CodedConcept(category[1], category[0], category[2]),
        segmented_property_type=hd.sr.CodedConcept(kind[1], kind[0], kind[2]),
        algorithm_type=algorithm_type,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*(255 * np.clip(color, 0, 1))),
    )
    if terminology and terminology.get("typeModifier"):  # "left", "right": the type's modifier, as dcmqi writes it
        scheme, value, meaning = terminology["typeModifier"]
        modifier = hd.sr.CodedConcept(value, scheme, meaning)
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    return description


def write_dicom_seg(
    segments: SegmentResult | Sequence[ObjectMask | tuple[str, np.ndarray]],
    source: Sequence[str | os.PathLike],
    path: str | os.PathLike,
    *,
    ijk_to_ras: np.ndarray | None = None,
    algorithm_type: str = "AUTOMATIC",
    series_description: str = SERIES_DESCRIPTION,
) -> Path:
    """Write binary segments as a DICOM Segmentation that references the source series' images.

    Args:
        segments: ``(label, mask)`` pairs, :class:`ObjectMask` objects, or a :class:`SegmentResult` (its objects,
            on its ``ijk_to_ras`` grid). Each mask is ``(K, J, I)`` on the series' grid, non-zero inside; masks
            may overlap. Segment ``n`` (from 1) is the ``n``-th item.
        source: the series' image files, in any order (slice ``k`` of each is found by :func:`slice_indices`).
        path: the ``.dcm`` file to write; it appears complete or not at all.
        ijk_to_ras: ``(4, 4)`` grid of the masks; when given, every image is checked to lie on it. Defaults to a
            :class:`SegmentResult`'s own; without either, slices are stacked along the normal as Slicer does.
        algorithm_type: ``"AUTOMATIC"`` or ``"SEMIAUTOMATIC"`` (DICOM's terms).
        series_description: the new series' description.

    Returns:
        ``path``. Empty slices of a segment get no frame; a segment that is empty everywhere stays in the file
        (with no frames) so that segment numbers keep matching the items.

    Raises:
        InputError: no segments, masks of different shapes, every mask empty, source files a SEG cannot reference
            (see :func:`read_sources`), or masks that are not on the series' grid (see :func:`slice_indices`).
        MedVLSAM2Error: highdicom is not installed.
    """
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError as err:
        raise MedVLSAM2Error(
            f"DICOM SEG export needs highdicom ({err}); install it with `pip install highdicom`."
        ) from err
    pairs = _pairs(segments)
    if ijk_to_ras is None and isinstance(segments, SegmentResult):
        ijk_to_ras = segments.ijk_to_ras
    datasets = read_sources(source)
    indices = slice_indices(datasets, pairs[0][1].shape, ijk_to_ras)
    for dataset in datasets:  # an empty SpecificCharacterSet means the default repertoire; highdicom copies the
        if "SpecificCharacterSet" in dataset and not dataset.SpecificCharacterSet:  # value and rejects "" (dcmqi's CT)
            del dataset.SpecificCharacterSet
    for label, mask in pairs:
        if not mask.any():
            logger.warning("segment %r is empty; it is written without frames", label)
    # (K, J, I, segments) -> frames in the order of `datasets`: frame n lies on source image n.
    pixels = np.stack([mask for _, mask in pairs], axis=-1)[indices]
    algorithm = hd.AlgorithmIdentificationSequence(name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence,
                                                   version=_version())  # fmt: skip
    descriptions = [_description(hd, n + 1, label, algorithm, algorithm_type) for n, (label, _) in enumerate(pairs)]
    with warnings.catch_warnings():
        # highdicom warns about the *source's* patient name format (e.g. "JANCT000"); it is copied unchanged.
        warnings.filterwarnings(
            "ignore", message=".*unlikely to represent the intended person name", category=UserWarning
        )
        try:
            seg = hd.seg.Segmentation(
                source_images=datasets,
                pixel_array=pixels,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=SERIES_NUMBER,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=MANUFACTURER,
                manufacturer_model_name=ALGORITHM_NAME,
                software_versions=_version(),
                device_serial_number="0",
                series_description=series_description,
            )
        except ValueError as err:  # highdicom's checks of the sources' geometry and attributes
            raise InputError(f"cannot build a DICOM SEG on these source images: {err}") from err
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    logger.info("wrote DICOM SEG %s: %d segments, %d frames", path, len(pairs), int(seg.NumberOfFrames))
    return Path(path)
