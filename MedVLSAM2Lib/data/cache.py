"""A preprocessing cache: every volume converted once to model-grid tensors, so training never decodes NIfTI.

Layout of a cache folder::

    index.json            {"format", "grid": GridConfig, "sam_window", "sam_input_version", "entries": {name: entry}}
    volumes/<name>.npz    image (D,H,W) float32 [0,1]; sam_image (D,H,W) float32 [0,1], SAM2's input from
                          ``preprocess.sam_input`` (compressed, and exactly the foundation's tensors);
                          masks (C,D,H,W) bit-packed (optional); record: GridRecord JSON

``sam_input_version`` is ``preprocess.SAM_INPUT_VERSION``: how SAM2's input was made (the HU estimate of
normalised volumes). A cache made under another version is refused, so training never mixes two SAM2 inputs.

Each entry holds the file's SHA-256, its categories and which of them are present. Volume files are written
atomically; the index is rewritten after every finished volume, so an interrupted ``prepare`` resumes where
it stopped (finished volumes are skipped) and a half-written file is never listed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import InputError
from ..jsonfile import read_json
from ..preprocess import SAM_INPUT_VERSION, GridConfig, GridRecord, mask_to_model, sam_input, to_model
from ..volume import Volume

__all__ = ["CacheItem", "CachedVolume", "VolumeCache", "write_item", "prepare"]

CACHE_FORMAT = 1


@dataclass
class CacheItem:
    """One volume to convert: a name, a loader returning ``(volume, {category: mask KJI} or None)``, and how its
    voxel values are given (``volume.INTENSITIES``: ``"hu"``, or ``"normalized"`` for M3D-Seg)."""

    name: str
    load: Callable[[], tuple[Volume, dict[str, np.ndarray] | None]]
    intensity: str = "hu"


@dataclass
class CachedVolume:
    """A cached volume: model-grid tensors as float32, masks as uint8 ``(C, D, H, W)`` (``None`` if none)."""

    name: str
    image: np.ndarray
    sam_image: np.ndarray
    masks: np.ndarray | None
    categories: list[str]
    record: GridRecord


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_item(item: CacheItem, folder: Path, grid: GridConfig, sam_window: tuple[float, float]) -> dict:
    """Convert one volume and write ``volumes/<name>.npz`` atomically; returns its index entry.

    ``sam_window`` is the HU window of the SAM2 slices (see :func:`~MedVLSAM2Lib.preprocess.sam_input`).
    """
    volume, masks = item.load()
    image, record = to_model(volume, grid)
    sam_image = sam_input(volume, grid, sam_window, item.intensity)
    arrays = {"image": image, "sam_image": sam_image,
              "record": np.frombuffer(json.dumps(record.to_dict()).encode(), dtype=np.uint8)}  # fmt: skip
    categories = list(masks) if masks else []
    if masks:
        stacked = np.stack([mask_to_model((m != 0).astype(np.uint8), record) for m in masks.values()])
        arrays["masks"] = np.packbits(stacked.astype(bool), axis=None)
        arrays["masks_shape"] = np.asarray(stacked.shape, dtype=np.int64)
    target = folder / "volumes" / f"{item.name}.npz"
    with atomic_path(target) as tmp:
        np.savez_compressed(tmp, **arrays)
    present = [c for c, m in (masks or {}).items() if np.any(m)]
    return {"file": f"volumes/{item.name}.npz", "sha256": _sha256(target), "categories": categories, "present": present}


def _write_index(folder: Path, header: dict[str, Any], entries: dict[str, Any]) -> None:
    with atomic_path(folder / "index.json") as tmp:
        tmp.write_text(json.dumps({**header, "entries": entries}, indent=1))


def prepare(
    items: Iterable[CacheItem],
    folder: str | os.PathLike,
    grid: GridConfig,
    sam_window: tuple[float, float],
    *,
    workers: int = 1,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Convert ``items`` into the cache at ``folder``; volumes already in its index are skipped (resume).

    Args:
        items: volumes to convert (names must be unique).
        folder: the cache folder (created if missing).
        grid: model grid settings; must equal those of an existing cache.
        sam_window: HU window of the SAM2 slices, for HU and normalised items alike (the segmenter config's).
        workers: parallel worker processes (1: in this process).
        on_progress: called as ``(done, total, name)`` after each volume.

    Returns:
        The index entries.

    Raises:
        InputError: an existing cache was made with other grid settings or another SAM2-input version, or two
            items share a name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = {"format": CACHE_FORMAT, "grid": json.loads(json.dumps(asdict(grid))), "sam_window": list(sam_window),
              "sam_input_version": SAM_INPUT_VERSION}  # fmt: skip
    entries: dict[str, Any] = {}
    if (folder / "index.json").is_file():
        existing = read_json(folder / "index.json", "cache index")
        _check_sam_input_version(folder, existing)
        if {k: existing.get(k) for k in header} != header:
            raise InputError(
                f"{folder}: this cache was made with other settings {existing.get('grid')}; use a new folder."
            )
        entries = existing["entries"]
    items = list(items)
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        raise InputError(
            f"{folder}: volume names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}."
        )
    todo = [item for item in items if item.name not in entries]
    done = len(items) - len(todo)
    if workers <= 1:
        results = ((item.name, write_item(item, folder, grid, sam_window)) for item in todo)
        for name, entry in results:
            entries[name] = entry
            _write_index(folder, header, entries)
            done += 1
            if on_progress:
                on_progress(done, len(items), name)
    else:
        # spawned, not forked: a fork of a process whose torch/OpenMP threads have run can deadlock (seen in a test
        # run: workers waiting on a futex forever)
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(write_item, item, folder, grid, sam_window): item.name for item in todo}
            for future in futures:  # in submission order; workers run ahead
                entries[futures[future]] = future.result()
                _write_index(folder, header, entries)
                done += 1
                if on_progress:
                    on_progress(done, len(items), futures[future])
    _write_index(folder, header, entries)
    return entries


def _check_sam_input_version(folder: Path, index: dict[str, Any]) -> None:
    """Refuse a cache whose SAM2 images were made by another definition of SAM2's input."""
    version = index.get("sam_input_version")
    if version != SAM_INPUT_VERSION:
        raise InputError(
            f"{folder}: its SAM2 images were made with SAM2-input version {version!r}, this version makes "
            f"{SAM_INPUT_VERSION}; run `medvlsam2 prepare` again into a new folder."
        )


class VolumeCache:
    """Read access to a prepared cache."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = read_json(self.folder / "index.json", "cache index")
        if index.get("format") != CACHE_FORMAT:
            raise InputError(f"{self.folder}: cache format {index.get('format')!r}; this version reads {CACHE_FORMAT}.")
        if index.get("sam_window") is None:
            raise InputError(
                f"{self.folder}: made before SAM2's input was one image for HU and M3D-Seg data (no 'sam_window'); "
                "run `medvlsam2 prepare` again into a new folder."
            )
        _check_sam_input_version(self.folder, index)
        self.grid = GridConfig(**index["grid"])
        self.entries: dict[str, Any] = index["entries"]

    def __len__(self) -> int:
        return len(self.entries)

    def names(self) -> list[str]:
        return list(self.entries)

    def verify(self) -> None:
        """Check every file against its recorded SHA-256 (run before training starts).

        Raises:
            InputError: naming the first missing or corrupt file.
        """
        for name, entry in self.entries.items():
            path = self.folder / entry["file"]
            if not path.is_file():
                raise InputError(f"{path}: cached volume {name!r} is missing; run `medvlsam2 prepare` again.")
            if _sha256(path) != entry["sha256"]:
                raise InputError(f"{path}: checksum mismatch (corrupt or modified); delete it and run prepare again.")

    def load(self, name: str) -> CachedVolume:
        """The cached tensors of one volume."""
        if name not in self.entries:
            raise InputError(f"{self.folder}: no cached volume {name!r}.")
        entry = self.entries[name]
        path = self.folder / entry["file"]
        try:
            with np.load(path, allow_pickle=False) as data:
                masks = None
                if "masks" in data:
                    shape = tuple(int(s) for s in data["masks_shape"])
                    masks = np.unpackbits(data["masks"], count=int(np.prod(shape))).reshape(shape)
                record = GridRecord.from_dict(json.loads(data["record"].tobytes().decode()))
                return CachedVolume(name, data["image"], data["sam_image"], masks, list(entry["categories"]), record)
        except (OSError, ValueError, KeyError) as err:
            raise InputError(f"{path}: cannot read cached volume ({err}); run `medvlsam2 prepare` again.") from err
