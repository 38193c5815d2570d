"""Volume → model grid (32×256×256 by default) and back.

The forward transform, in order (each step recorded in a JSON-serialisable :class:`GridRecord`):

1. **Canonical orientation** — transposes/flips only (no resampling) so that the array axes
   ``(k, j, i)`` point ``(S, P, L)``: axial slices, anterior at the top, patient right on the left
   (the radiological display, and DICOM's own order). Whatever the file's axis order or flips, the
   same anatomy gives the same model tensor.
2. **Per-volume min-max** to ``[0, 1]`` (M3D-CLIP's training normalisation; no HU window) — or,
   with ``intensity="window"``, clipping to an HU window first.
3. **Foreground crop** — the bounding box of voxels above the volume minimum (MONAI's
   ``CropForeground`` with its default ``x > 0`` on the min-max image, as in M3D's data preparation).
4. **Resize** to ``spatial_size``: image trilinear, masks nearest (or area-averaged occupancy with
   ``soft=True``), all with ``align_corners=False`` voxel-centre geometry (what MONAI's ``Resize``
   does through ``torch.nn.functional.interpolate``;
   a test checks equality with MONAI). The image is resized separably, which trilinear interpolation is: bilinear
   in-plane on the slices that the interpolation along ``k`` samples, then linear along ``k``; with the range and
   the crop found on the stored values, no step holds a float copy of the whole volume.

SAM2 sees another image on the same grid: :func:`sam_input`, the one definition used by training caches, the
engine (and so the CLI, server, Slicer and evaluation): the HU window of the segmenter config, for HU volumes
and for already normalised ones (M3D-Seg), whose HU scale is first estimated from their fat and soft-tissue peaks.

With a ``device`` (the engine passes its own), :func:`to_model`, :func:`sam_input` and the way back
(:func:`probabilities_from_model`, :func:`mask_from_probabilities`) resample in torch there: one pass of slabs of the
stored values gives the range and, from per-axis maxima, the crop; then the sampled slices move there as stored, one
slab at a time. The same float32 operations in the same order as without, so on the CPU the same values bit for bit.

Coordinates map as ``x_model = (x_crop + 0.5) · n_model / n_crop − 0.5`` per axis, which is exactly
invertible; masks are inverted with nearest-exact sampling and zero padding outside the crop. Model
coordinates are given in the order ``(w, h, d)`` = canonical ``(i, j, k)``, like every other IJK
point in this library; the model tensor itself is indexed ``[d, h, w]``.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError, IntensityScaleError
from .prompts import BoxPrompt, PointPrompt, check_prompts_inside
from .volume import INTENSITIES, Volume, orientation_transform, reorient_points

if TYPE_CHECKING:
    import torch

__all__ = [
    "INTENSITIES",
    "GridConfig",
    "GridRecord",
    "to_model",
    "sam_input",
    "hu_from_normalized",
    "SAM_INPUT_VERSION",
    "mask_to_model",
    "mask_from_model",
    "probabilities_from_model",
    "mask_from_probabilities",
]

logger = logging.getLogger(__name__)

CANONICAL_AXCODES = "LPS"
# Textbook CT numbers of the two tissues whose histogram peaks every body CT shows; they pin the HU scale of
# normalised data (measured peaks on the real CTs in ../shared/data: fat -106..-81, soft tissue 23..90).
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
PEAK_BINS = 400  # histogram bins over the 0.5..99.5 percentiles of the voxels above the floor
PEAK_SMOOTHING = 3.0  # Gaussian sigma of the histogram smoothing, in bins
PEAK_SEPARATION = 0.25  # fat and soft-tissue peaks lie at least this many standard deviations apart
# Plausibility of the estimate (hu_from_normalized gives the measurements behind them): the estimated HU standard
# deviation of the foreground (voxels above the volume mean; for M3D-Seg's z-scores, the HU per stored unit) must
# lie in SPREAD_HU, and a narrow one (below NARROW_SPREAD_HU) needs a floor at or below NARROW_FLOOR_MAX_HU.
SPREAD_HU = (50.0, 700.0)
NARROW_SPREAD_HU = 80.0
NARROW_FLOOR_MAX_HU = -280.0
# The version of SAM2's input definition (sam_input, hu_from_normalized and the constants above): bump it whenever
# any of them changes, so caches made under another definition are refused (data/cache.py).
SAM_INPUT_VERSION = 2
# Voxels of the source volume read at a time (16 MiB as float32): the forward transform never makes a float copy of
# the whole volume, only of one slab or slice at a time and of the slices the resize actually samples.
SLAB_VOXELS = 1 << 22
# Stored dtypes that torch cannot reduce or compare on every device, and the dtype that holds each of their values
# exactly (uint64 excepted: beyond 2**53 it rounds) for the device path.
TORCH_DTYPES = {np.dtype(np.bool_): np.uint8, np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64,
                np.dtype(np.uint64): np.float64}  # fmt: skip


@dataclass
class GridConfig:
    """How a volume is mapped to the model grid.

    Attributes:
        spatial_size: model grid ``(D, H, W)``; defaults to M3D-CLIP's ``(32, 256, 256)``.
        crop_foreground: crop to voxels above the volume minimum before resizing (M3D recipe).
        intensity: ``"minmax"`` (per-volume min-max to [0, 1], M3D-CLIP) or ``"window"`` (clip to
            ``window`` in HU, then scale to [0, 1]).
        window: ``(low, high)`` HU bounds, used only with ``intensity="window"``.
    """

    spatial_size: tuple[int, int, int] = (32, 256, 256)
    crop_foreground: bool = True
    intensity: str = "minmax"
    window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self.spatial_size = tuple(int(s) for s in self.spatial_size)
        if len(self.spatial_size) != 3 or min(self.spatial_size) < 1:
            raise InputError(f"spatial_size must be three positive ints (D, H, W), got {self.spatial_size}.")
        if self.intensity not in ("minmax", "window"):
            raise InputError(f"intensity must be 'minmax' or 'window', got {self.intensity!r}.")
        if self.intensity == "window":
            if self.window is None or len(self.window) != 2 or not self.window[0] < self.window[1]:
                raise InputError(f"intensity='window' needs window=(low, high) with low < high, got {self.window}.")
            self.window = (float(self.window[0]), float(self.window[1]))


@dataclass
class GridRecord:
    """What :func:`to_model` did to one volume; enough to map masks and points both ways.

    All fields are plain lists/numbers so the record round-trips through JSON.
    """

    original_shape: tuple[int, int, int]  # KJI shape of the source volume
    ijk_to_ras: list[list[float]]  # the source volume's affine
    orientation: list[list[float]]  # nibabel orientation transform source -> canonical, (3, 2)
    canonical_shape: tuple[int, int, int]  # KJI shape after reorientation
    crop_start: tuple[int, int, int]  # KJI, inclusive, in the canonical array
    crop_stop: tuple[int, int, int]  # KJI, exclusive
    spatial_size: tuple[int, int, int]  # (D, H, W)
    intensity_range: tuple[float, float]  # values that became 0 and 1
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridRecord:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"GridRecord: unknown keys {sorted(unknown)}.")
        tuples = ("original_shape", "canonical_shape", "crop_start", "crop_stop", "spatial_size", "intensity_range")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.crop_start, self.crop_stop, strict=True))

    # ---- point geometry (all points in (i, j, k) order)

    def _scale_ijk(self) -> np.ndarray:
        return np.asarray(self.spatial_size[::-1], float) / np.asarray(self.crop_shape[::-1], float)

    def points_to_model(self, points_ijk: np.ndarray) -> np.ndarray:
        """Map ``(N, 3)`` source-voxel coordinates ``(i, j, k)`` to model coordinates ``(w, h, d)``."""
        canonical = self._orient_points(np.atleast_2d(np.asarray(points_ijk, float)), forward=True)
        crop = canonical - np.asarray(self.crop_start[::-1], float)
        return (crop + 0.5) * self._scale_ijk() - 0.5

    def points_from_model(self, points_model: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`points_to_model`: ``(N, 3)`` model ``(w, h, d)`` → source ``(i, j, k)``."""
        crop = (np.atleast_2d(np.asarray(points_model, float)) + 0.5) / self._scale_ijk() - 0.5
        return self._orient_points(crop + np.asarray(self.crop_start[::-1], float), forward=False)

    def _orient_points(self, points: np.ndarray, forward: bool) -> np.ndarray:
        return reorient_points(points, np.asarray(self.orientation), self.original_shape[::-1], inverse=not forward)

    def prompts_to_model(
        self, points: tuple[PointPrompt, ...] = (), boxes: tuple[BoxPrompt, ...] = ()
    ) -> tuple[list[PointPrompt], list[BoxPrompt]]:
        """Map point and box prompts from the source grid (IJK) to model coordinates ``(w, h, d)``.

        Raises:
            InputError: a prompt lies outside the source volume (the message names it).
        """
        check_prompts_inside(tuple(self.original_shape[::-1]), points, boxes)
        return self._map_prompts(points, boxes, self.points_to_model)

    def prompts_from_model(
        self, points: tuple[PointPrompt, ...] = (), boxes: tuple[BoxPrompt, ...] = ()
    ) -> tuple[list[PointPrompt], list[BoxPrompt]]:
        """Inverse of :meth:`prompts_to_model`: model ``(w, h, d)`` prompts back to source IJK."""
        return self._map_prompts(points, boxes, self.points_from_model)

    @staticmethod
    def _map_prompts(
        points: tuple[PointPrompt, ...], boxes: tuple[BoxPrompt, ...], mapping: Callable[[np.ndarray], np.ndarray]
    ) -> tuple[list[PointPrompt], list[BoxPrompt]]:
        mapped_points = [PointPrompt(tuple(mapping(p.ijk)[0]), p.label) for p in points]
        mapped_boxes = []
        for box in boxes:
            corners = mapping(np.stack([box.min_ijk, box.max_ijk]))  # flips may swap min and max
            mapped_boxes.append(BoxPrompt(tuple(corners.min(0)), tuple(corners.max(0))))
        return mapped_points, mapped_boxes


def _canonical(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A view (no copy) of ``array_kji`` in canonical orientation, and the orientation transform."""
    import nibabel.orientations as nio

    ornt = orientation_transform(ijk_to_ras, CANONICAL_AXCODES)
    return nio.apply_orientation(array_kji.transpose(2, 1, 0), ornt).transpose(2, 1, 0), ornt


def _resize(array: np.ndarray, size: tuple[int, int, int], mode: str) -> np.ndarray:
    """Resize a ``(D, H, W)`` array with voxel-centre geometry (``align_corners=False``)."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if tuple(array.shape) == tuple(size):
        return tensor[0, 0].numpy()
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    with torch.no_grad():
        return F.interpolate(tensor, size=size, mode=mode, **kwargs)[0, 0].numpy()


def _exact_in_float32(dtype: np.dtype) -> bool:
    """Whether every value of ``dtype`` is a float32 exactly (so comparisons give the same on either)."""
    return dtype == np.bool_ or (dtype.kind in "iuf" and dtype.itemsize <= 2) or dtype == np.float32


def _float32(slab: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """A float32 copy of ``slab``, mapped by ``transform`` (which works in place on float32) when given."""
    values = slab.astype(np.float32)
    return values if transform is None else transform(values)


def _foreground_box(
    canonical: np.ndarray, low: float, transform: Callable[[np.ndarray], np.ndarray] | None
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The bounding box ``(start, stop)`` of the voxels whose float32 value (after ``transform``) lies above the
    float32 ``low``, found slab by slab: one slab's mask at a time, never one of the whole volume. Stored values
    that float32 holds exactly are compared as they are, without a float copy."""
    depth, rows, columns = canonical.shape
    native = transform is None and _exact_in_float32(canonical.dtype)
    threshold = canonical.dtype.type(low) if native else np.float32(low)
    step = max(1, SLAB_VOXELS // (rows * columns))
    slices, plane = np.zeros(depth, bool), np.zeros((rows, columns), bool)
    mask = np.empty((min(step, depth), rows, columns), bool)  # one slab's, reused
    for k in range(0, depth, step):
        slab = canonical[k : k + step]
        above = np.greater(slab if native else _float32(slab, transform), threshold, out=mask[: len(slab)])
        slices[k : k + step] = above.any(axis=(1, 2))
        plane |= above.any(axis=0)
    box = [np.flatnonzero(slices), np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))]
    return tuple(int(a[0]) for a in box), tuple(int(a[-1]) + 1 for a in box)


def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(index0, index1, weight0, weight1)`` of 1D linear resampling with ``align_corners=False``:
    ``out[o] = weight0[o]·x[index0[o]] + weight1[o]·x[index1[o]]``, with torch's CPU weights bit for bit (a float32
    scale, the source index rounded once to float32, clamped at 0)."""
    scale = np.float64(np.float32(size_in / size_out))
    source = np.maximum((scale * (np.arange(size_out) + 0.5) - 0.5).astype(np.float32), 0)
    index0 = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    index1 = index0 + (index0 < size_in - 1)
    weight1 = np.clip(source - index0, 0, 1).astype(np.float32)
    return index0, index1, np.float32(1) - weight1, weight1


def _resize_slices(
    crop: np.ndarray, size: tuple[int, int, int], prepare: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Trilinear resize (``align_corners=False``) of ``crop`` to ``size``, as a tensor product: bilinear in-plane
    of the (at most ``2 × size[0]``) slices that linear interpolation along the first axis samples, each turned to
    float32 by ``prepare`` on its own, then linear along the first axis. Equals :func:`_resize` up to float32
    rounding, without a float copy of the crop."""
    import torch
    import torch.nn.functional as F

    index0, index1, weight0, weight1 = _linear_taps(crop.shape[0], size[0])
    needed = np.unique(np.concatenate([index0, index1]))
    planes = np.empty((len(needed), size[1], size[2]), np.float32)
    for n, k in enumerate(needed):
        plane = prepare(crop[k])
        if plane.shape != tuple(size[1:]):
            with torch.no_grad():
                plane = F.interpolate(torch.from_numpy(plane)[None, None], size=size[1:], mode="bilinear",
                                      align_corners=False)[0, 0].numpy()  # fmt: skip
        planes[n] = plane
    first, second = np.searchsorted(needed, index0), np.searchsorted(needed, index1)
    image = np.empty(size, np.float32)
    for o in range(size[0]):
        image[o] = weight0[o] * planes[first[o]] + weight1[o] * planes[second[o]]
    return image


def _tensor(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``array`` on ``device`` in a dtype that torch reduces and compares there (:data:`TORCH_DTYPES`); no copy on
    the CPU for a contiguous array of such a dtype in native byte order."""
    import torch

    dtype = array.dtype.newbyteorder("=")
    contiguous = np.ascontiguousarray(array, dtype=TORCH_DTYPES.get(dtype, dtype))
    with warnings.catch_warnings():  # a read-only array (e.g. decoded from a request) is only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(contiguous).to(device)


def _scan(array: np.ndarray, device: torch.device | str) -> tuple[np.ndarray, list[np.ndarray]]:
    """The minimum and maximum of ``array`` (``(K, J, I)``, as stored) and, per axis, the maximum over the other two
    axes; computed on ``device`` one slab at a time, slabs cut along the axis slowest in memory. Values as stored
    (in :data:`TORCH_DTYPES`' dtype where torch lacks the stored one); NaN when any voxel is NaN."""
    import torch

    axis = int(np.argmax(np.abs(array.strides)))
    slabs = np.moveaxis(array, axis, 0)  # a view
    step = max(1, SLAB_VOXELS // (slabs.shape[1] * slabs.shape[2]))
    lows, along, plane = [], [], None
    with torch.inference_mode():
        for k in range(0, slabs.shape[0], step):
            slab = _tensor(slabs[k : k + step], device)
            lows.append(slab.amin())
            along.append(slab.amax(dim=(1, 2)))
            plane = slab.amax(dim=0) if plane is None else torch.maximum(plane, slab.amax(dim=0))
        along = torch.cat(along)  # amin, amax and maximum keep NaN
        extremes = torch.stack([torch.stack(lows).amin(), along.amax()]).cpu().numpy()
        maxima = [m.cpu().numpy() for m in (along, plane.amax(dim=1), plane.amax(dim=0))]
    order = np.argsort([axis, *(a for a in range(3) if a != axis)])  # array axis -> position among the slab axes
    return extremes, [maxima[n] for n in order]


def _foreground_box_of_maxima(
    maxima: list[np.ndarray], ornt: np.ndarray, low: float, transform: Callable[[np.ndarray], np.ndarray] | None
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """:func:`_foreground_box` from :func:`_scan`'s per-axis maxima of the stored array (``(K, J, I)`` axes) and the
    orientation to canonical: an index along an axis holds a voxel whose float32 value lies above ``low`` exactly
    when its maximum does (float32 rounding and ``transform`` are non-decreasing)."""
    box: list[np.ndarray] = [np.empty(0, np.int64)] * 3
    for axis, maximum in enumerate(maxima):
        target, flip = ornt[2 - axis]  # ornt is in (i, j, k) order: array axis 2 - n is ijk axis n
        above = _float32(maximum, transform) > np.float32(low)
        box[2 - int(target)] = np.flatnonzero(above[::-1] if flip < 0 else above)
    return tuple(int(a[0]) for a in box), tuple(int(a[-1]) + 1 for a in box)


def _resize_slices_on(
    crop: np.ndarray, size: tuple[int, int, int], prepare: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device | str,
) -> np.ndarray:  # fmt: skip
    """:func:`_resize_slices` on ``device``: the slices that the resize along the first axis samples move there as
    stored, at most :data:`SLAB_VOXELS` voxels at a time, and are turned to float32 by ``prepare`` (in place) there.
    The same operations in the same order, so on the CPU the same values bit for bit."""
    import torch
    import torch.nn.functional as F

    index0, index1, weight0, weight1 = _linear_taps(crop.shape[0], size[0])
    needed = np.unique(np.concatenate([index0, index1]))
    step = max(1, SLAB_VOXELS // (crop.shape[1] * crop.shape[2]))
    with torch.inference_mode():
        planes = torch.empty((len(needed), *size[1:]), dtype=torch.float32, device=device)
        for n in range(0, len(needed), step):
            values = prepare(_tensor(crop[needed[n : n + step]], device).to(torch.float32))
            if values.shape[1:] != tuple(size[1:]):
                values = F.interpolate(values[:, None], size=size[1:], mode="bilinear", align_corners=False)[:, 0]
            planes[n : n + len(values)] = values
        first, second = np.searchsorted(needed, index0), np.searchsorted(needed, index1)
        image = torch.empty(size, dtype=torch.float32, device=device)
        for o in range(size[0]):
            torch.add(planes[first[o]] * float(weight0[o]), planes[second[o]] * float(weight1[o]), out=image[o])
        return image.cpu().numpy()


def to_model(
    volume: Volume, config: GridConfig | None = None, *, device: torch.device | str | None = None
) -> tuple[np.ndarray, GridRecord]:
    """Map a CT volume to the model grid.

    Memory: besides the result, one slab (:data:`SLAB_VOXELS`) and the resampled slices; never a copy of the
    volume (the canonical orientation is a view, the range and crop are found on the stored values).

    Args:
        volume: the source volume; intensities as read (HU for CT). CT-RATE v2 ``*_fixed`` volumes
            are already HU and must not be rescaled with the metadata slope/intercept again.
        config: grid settings; M3D-CLIP's defaults when omitted.
        device: ``None``: numpy and torch on the CPU, slab by slab. A torch device: the same transform computed
            there (:func:`_scan`, :func:`_resize_slices_on`), slabs of the stored values moved to it one at a time;
            on the CPU it gives the same values bit for bit.

    Returns:
        ``(image, record)``: image ``(D, H, W)`` float32 in ``[0, 1]``; the record to map masks and
        prompts with.

    Raises:
        InputError: the volume is constant (nothing to normalise or crop to).
    """
    return _to_model(volume, config or GridConfig(), device=device)


def _to_model(
    volume: Volume, config: GridConfig, transform: Callable[[np.ndarray], np.ndarray] | None = None,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, GridRecord]:  # fmt: skip
    """:func:`to_model` of the volume's values mapped by ``transform`` (non-decreasing, in place on float32 arrays or
    tensors; applied one slab at a time, so the mapped volume is never held whole)."""
    where = volume.metadata.get("source_path", "volume")
    canonical, ornt = _canonical(volume.array, volume.ijk_to_ras)
    if device is None:
        extremes, maxima = np.array([volume.array.min(), volume.array.max()]), None  # NaN when any voxel is NaN
    else:
        extremes, maxima = _scan(volume.array, device)
    low, high = _float32(extremes, transform).tolist()  # min and max commute with non-decreasing maps
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InputError(f"{where}: the volume holds NaN or infinite values; fix or mask them before segmenting.")
    if not high > low:
        raise InputError(f"{where}: the volume is constant ({low}); there is no image content to segment.")
    if not config.crop_foreground:
        start, stop = (0, 0, 0), tuple(canonical.shape)
    elif maxima is None:
        start, stop = _foreground_box(canonical, low, transform)
    else:
        start, stop = _foreground_box_of_maxima(maxima, ornt, low, transform)
    if config.intensity == "window":
        low, high = config.window

    def prepare(slab: np.ndarray) -> np.ndarray:
        values = _float32(slab, transform)
        values -= low
        values /= high - low
        return np.clip(values, 0.0, 1.0, out=values) if config.intensity == "window" else values

    def prepare_tensor(values: torch.Tensor) -> torch.Tensor:  # float32, in place: prepare's operations
        values = values if transform is None else transform(values)
        values -= low
        values /= high - low
        return values.clamp_(0.0, 1.0) if config.intensity == "window" else values

    crop = canonical[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
    if device is None:
        image = _resize_slices(crop, config.spatial_size, prepare)
    else:
        image = _resize_slices_on(crop, config.spatial_size, prepare_tensor, device)
    record = GridRecord(
        original_shape=tuple(volume.array.shape),
        ijk_to_ras=volume.ijk_to_ras.tolist(),
        orientation=ornt.tolist(),
        canonical_shape=tuple(canonical.shape),
        crop_start=start,
        crop_stop=stop,
        spatial_size=config.spatial_size,
        intensity_range=(low, high),
        config=json.loads(json.dumps(asdict(config))),
    )
    logger.debug("model grid: crop %s..%s of canonical %s", start, stop, canonical.shape)
    return image, record


def _histogram_peaks(values: np.ndarray) -> list[tuple[float, float]]:
    """Local maxima ``(value, height)`` of the smoothed histogram of ``values``, highest first."""
    low, high = np.percentile(values, [0.5, 99.5])
    counts, edges = np.histogram(values, bins=PEAK_BINS, range=(float(low), float(high)))
    offsets = np.arange(-4 * PEAK_SMOOTHING, 4 * PEAK_SMOOTHING + 1)
    kernel = np.exp(-0.5 * (offsets / PEAK_SMOOTHING) ** 2)
    smooth = np.convolve(counts.astype(float), kernel / kernel.sum(), mode="same")
    centres = (edges[1:] + edges[:-1]) / 2
    inner = np.nonzero((smooth[1:-1] >= smooth[:-2]) & (smooth[1:-1] > smooth[2:]))[0] + 1
    return sorted(((float(centres[i]), float(smooth[i])) for i in inner), key=lambda peak: -peak[1])


def hu_from_normalized(array: np.ndarray, where: str = "volume") -> np.ndarray:
    """Estimated Hounsfield units (float32) of a CT stored as an affine rescaling of HU (M3D-Seg's z-scores, min-max).

    M3D-Seg keeps no HU: ``image.npy`` is SegVol's foreground normalisation (voxels above the volume mean define
    the foreground; clip to its 0.05..99.95 percentiles, z-score with its mean and standard deviation), and both
    the mean and the deviation vary per volume (-231..130 HU and 87..400 HU on the CTs in ``../shared/data``).
    What survives any affine rescaling is the histogram's shape, so the scale is pinned on two tissue peaks: the
    two highest peaks of the voxels above the clipped floor (histogram of every second voxel along each axis),
    at least ``PEAK_SEPARATION`` standard deviations apart, become fat (``FAT_HU``) and soft tissue
    (``SOFT_TISSUE_HU``). Residual error: how far a volume's own peaks sit from those textbook values: on the
    five real CTs in ``../shared/data`` the estimate is 0.82-1.05 times the true HU scale and off by up to 34 HU
    at 0 HU.

    When the two highest peaks are other tissues (lung-, air- or bone-dominated volumes) the map is wrong, so the
    estimate must pass two checks, both invariant to the stored rescaling:

    * the estimated HU standard deviation of the foreground (voxels above the volume mean; for M3D-Seg's
      z-scores this is the estimated HU per stored unit) lies in ``SPREAD_HU`` = 50..700 HU: the true value is
      86..400 HU on the five real CTs in ``../shared/data`` and 74..430 HU on their 24 half-size blocks (each
      axis halved), the estimate 58..555 HU;
    * a narrow spread (below ``NARROW_SPREAD_HU`` = 80 HU) also needs the volume's floor to map at or below
      ``NARROW_FLOOR_MAX_HU`` = -280 HU. Measured on the same volumes stored as M3D-Seg stores them: the four
      blocks of the chest CT angiography (subject B) whose two highest peaks are soft tissue and contrast-filled
      vessels are estimated at 0.30-0.32 times their true scale, with a spread of 58..75 HU and a floor at
      -122..-215 HU; every correctly mapped volume with a spread below 80 HU (subject A's small CT, 76 HU, and
      its two lower pelvic blocks, 62 HU) has its floor at -350..-388 HU. The threshold lies between the two.

    What these checks cannot see: a wrong map with a plausible spread and floor (one block of subject B is
    estimated at 1.77 times its true scale, spread 312 HU, and passes).

    Raises:
        IntensityScaleError: fewer than two separate histogram peaks (no fat and soft tissue to calibrate on), or
            an implausible estimate (see the two checks above).
    """
    hu = np.array(array, dtype=np.float32)  # one full-volume copy, mapped in place
    return _hu_map(hu, where)(hu)


def _hu_map(array: np.ndarray, where: str) -> Callable[[np.ndarray], np.ndarray]:
    """The estimate of :func:`hu_from_normalized`: a map of float32 stored values to HU, in place (same float32
    operations whether applied to the whole volume or one slab at a time). Reads every second voxel per axis only.

    Raises:
        IntensityScaleError: see :func:`hu_from_normalized`.
    """
    array = np.asarray(array)
    floor = float(np.float32(array.min()))
    sample = np.asarray(array[tuple(slice(None, None, 2) for _ in range(array.ndim))], dtype=np.float32)
    body = sample[sample > floor]
    peaks = _histogram_peaks(body) if body.size else []
    separation = PEAK_SEPARATION * float(body.std(dtype=np.float64)) if body.size else 0.0
    first = peaks[0][0] if peaks else 0.0
    others = [value for value, _ in peaks[1:] if abs(value - first) >= separation]
    if not others:
        raise IntensityScaleError(
            f"{where}: its intensity histogram shows no separate fat and soft-tissue peaks, so its HU scale cannot"
            " be estimated; give the volume in Hounsfield units (intensity 'hu')."
        )
    fat, tissue = sorted((first, others[0]))
    scale = (SOFT_TISSUE_HU - FAT_HU) / (tissue - fat)
    foreground = sample[sample > sample.mean(dtype=np.float64)]
    spread = scale * float(foreground.std(dtype=np.float64))
    floor_hu = FAT_HU + (floor - fat) * scale
    narrow = spread < NARROW_SPREAD_HU and floor_hu > NARROW_FLOOR_MAX_HU
    if not SPREAD_HU[0] <= spread <= SPREAD_HU[1] or narrow:
        expected = f"{SPREAD_HU[0]:g}..{SPREAD_HU[1]:g} HU, and a floor at or below {NARROW_FLOOR_MAX_HU:g} HU when"
        raise IntensityScaleError(
            f"{where}: the HU estimate from its two highest histogram peaks is implausible (foreground spread"
            f" {spread:.0f} HU, floor at {floor_hu:.0f} HU; real CTs have a spread of {expected} the spread is below"
            f" {NARROW_SPREAD_HU:g} HU): those peaks are probably not fat and soft tissue (a volume dominated by"
            " lung, contrast-filled vessels or bone); give the volume in Hounsfield units (intensity 'hu')."
        )

    def to_hu(values: np.ndarray) -> np.ndarray:
        values -= np.float32(fat)
        values *= np.float32(scale)
        values += np.float32(FAT_HU)
        return values

    return to_hu


def sam_input(
    volume: Volume, grid: GridConfig, window: tuple[float, float], intensity: str = "hu", *,
    device: torch.device | str | None = None,
) -> np.ndarray:  # fmt: skip
    """SAM2's input image ``(D, H, W)`` float32 in [0, 1] on the model grid of ``to_model(volume, grid)``.

    The one definition of what SAM2 sees, in training caches and at inference alike: the volume clipped to the
    HU ``window`` (the segmenter config's) and scaled to [0, 1]. ``intensity="normalized"`` data (M3D-Seg) is first
    put back on an estimated HU scale by :func:`hu_from_normalized`; its crop is unchanged (an increasing affine
    map keeps the voxels above the minimum), so both images share one grid record. ``device``: where the resampling
    runs, as in :func:`to_model` (the HU estimate reads the stored array with numpy either way).

    Raises:
        InputError: unknown ``intensity``; see also :func:`to_model`. IntensityScaleError (an ``InputError``):
            see :func:`hu_from_normalized`.
    """
    if intensity not in INTENSITIES:
        raise InputError(f"unknown intensity {intensity!r}; choose one of {list(INTENSITIES)}.")
    to_hu = _hu_map(volume.array, volume.metadata.get("source_path", "volume")) if intensity == "normalized" else None
    windowed = GridConfig(spatial_size=grid.spatial_size, crop_foreground=grid.crop_foreground,
                          intensity="window", window=window)  # fmt: skip
    return _to_model(volume, windowed, to_hu, device)[0]


def _check_shape(array: np.ndarray, expected: tuple[int, ...], what: str) -> None:
    if tuple(array.shape) != tuple(expected):
        raise InputError(f"{what}: expected shape {tuple(expected)}, got {tuple(array.shape)}.")


def mask_to_model(mask: np.ndarray, record: GridRecord, *, soft: bool = False) -> np.ndarray:
    """Map a mask or label map on the source grid (KJI) to the model grid ``(D, H, W)``.

    Args:
        mask: ``(K, J, I)`` mask or label map on the source grid.
        record: the record of the volume's :func:`to_model`.
        soft: ``False`` (default, M3D's recipe): nearest sampling, dtype kept — binary training targets.
            ``True``: the fraction of each model voxel the (binary) mask covers, float32 in [0, 1]
            (area averaging); :func:`probabilities_from_model` then thresholds back with far less loss
            where the model grid is coarser than the volume.
    """
    _check_shape(mask, record.original_shape, "mask_to_model")
    canonical, _ = _canonical(mask, np.asarray(record.ijk_to_ras))
    (k0, j0, i0), (k1, j1, i1) = record.crop_start, record.crop_stop
    crop = canonical[k0:k1, j0:j1, i0:i1]
    if soft:
        return _resize((crop != 0).astype(np.float32), record.spatial_size, "area")
    return _resize(crop, record.spatial_size, "nearest-exact").astype(mask.dtype)


def _to_source_grid(array_crop: np.ndarray, record: GridRecord, fill: float = 0) -> np.ndarray:
    import nibabel.orientations as nio

    canonical = np.full(record.canonical_shape, fill, dtype=array_crop.dtype)
    (k0, j0, i0), (k1, j1, i1) = record.crop_start, record.crop_stop
    canonical[k0:k1, j0:j1, i0:i1] = array_crop
    inverse = nio.ornt_transform(
        nio.axcodes2ornt(tuple(CANONICAL_AXCODES)), nio.io_orientation(np.asarray(record.ijk_to_ras))
    )
    source = nio.apply_orientation(canonical.transpose(2, 1, 0), inverse).transpose(2, 1, 0)
    return np.ascontiguousarray(source)


def mask_from_model(mask_model: np.ndarray, record: GridRecord) -> np.ndarray:
    """Map a mask or label map on the model grid ``(D, H, W)`` back to the source grid (KJI), nearest.

    Exact inverse of :func:`mask_to_model` wherever the model grid is at least as fine as the crop.
    """
    _check_shape(mask_model, record.spatial_size, "mask_from_model")
    crop = _resize(mask_model, record.crop_shape, "nearest-exact").astype(mask_model.dtype)
    return _to_source_grid(crop, record)


def probabilities_from_model(
    prob_model: np.ndarray, record: GridRecord, *, device: torch.device | str | None = None
) -> np.ndarray:
    """Map soft predictions ``(D, H, W)`` in [0, 1] back to the source grid (KJI), trilinear, float32, 0 outside
    the crop; threshold at 0.5 for a mask. ``device``: resample there (:func:`mask_from_probabilities`'s path; the
    same values on the CPU); ``None``: numpy and torch on the CPU."""
    _check_shape(prob_model, record.spatial_size, "probabilities_from_model")
    if device is None:
        crop = _resize(prob_model.astype(np.float32), record.crop_shape, "trilinear")
        return _to_source_grid(crop, record)
    import torch

    with torch.inference_mode():
        crop = _upsample(_tensor(prob_model, device).float(), record)
        return _source_tensor(crop, record).cpu().numpy()


def mask_from_probabilities(
    prob_model: torch.Tensor, record: GridRecord, *, keep: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """The mask of soft predictions ``(D, H, W)`` on the model grid, resampled where the tensor lies: uint8 on the
    source grid (KJI), 1 where :func:`probabilities_from_model` exceeds 0.5; with ``keep``, also those probabilities
    as float16. Only these leave the device; on the CPU the values of ``probabilities_from_model(...) > 0.5`` and of
    its ``astype(np.float16)``."""
    import torch

    _check_shape(prob_model, record.spatial_size, "mask_from_probabilities")
    with torch.inference_mode():
        crop = _upsample(prob_model.float(), record)
        mask = _source_tensor((crop > 0.5).to(torch.uint8), record).cpu().numpy()
        return mask, _source_tensor(crop.half(), record).cpu().numpy() if keep else None


def _upsample(prob_model: torch.Tensor, record: GridRecord) -> torch.Tensor:
    """``(D, H, W)`` float32 → the crop's shape, trilinear (:func:`_resize`'s geometry), on the tensor's device."""
    import torch.nn.functional as F

    if tuple(prob_model.shape) == tuple(record.crop_shape):
        return prob_model
    return F.interpolate(prob_model[None, None], size=record.crop_shape, mode="trilinear", align_corners=False)[0, 0]


def _source_tensor(crop: torch.Tensor, record: GridRecord) -> torch.Tensor:
    """:func:`_to_source_grid` in torch, on the crop's device: zeros around the crop, then the inverse orientation
    (flips, then the axis permutation, as ``nibabel.orientations.apply_orientation`` does), contiguous."""
    import nibabel.orientations as nio
    import torch

    canonical = torch.zeros(record.canonical_shape, dtype=crop.dtype, device=crop.device)
    (k0, j0, i0), (k1, j1, i1) = record.crop_start, record.crop_stop
    canonical[k0:k1, j0:j1, i0:i1] = crop
    inverse = nio.ornt_transform(
        nio.axcodes2ornt(tuple(CANONICAL_AXCODES)), nio.io_orientation(np.asarray(record.ijk_to_ras))
    )
    ijk = canonical.permute(2, 1, 0)
    flips = [axis for axis, flip in enumerate(inverse[:, 1]) if flip < 0]
    ijk = ijk.flip(flips) if flips else ijk
    return ijk.permute(*np.argsort(inverse[:, 0]).tolist()).permute(2, 1, 0).contiguous()
