"""M3D-Seg reader: dataset JSON + case folders (``image.npy`` and sparse ``mask_(C, X, Y, Z).npz``).

Layout (``M3D_Seg/<code>/<code>.json`` with MSD-style ``labels`` and ``train``/``test`` lists of
``{image, label}`` paths relative to the ``M3D_Seg`` root). ``image.npy`` is ``(1, X, Y, Z)`` float32
in the source NIfTI's voxel order, already normalised (no HU); the mask is a ``scipy.sparse`` CSR
matrix of shape ``(C, X·Y·Z)`` whose shape is only written in the file name. Channel ``c`` is the
category ``labels[str(c + 1)]``. Cases are loaded one at a time, on request.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..jsonfile import read_json
from ..volume import Volume

__all__ = ["M3DSegCase", "M3DSegDataset", "parse_mask_shape", "load_dataset_info", "cache_items"]

MASK_NAME = re.compile(r"^mask_\((\d+), (\d+), (\d+), (\d+)\)\.npz$")


def parse_mask_shape(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """``(C, X, Y, Z)`` from a mask file name such as ``mask_(117, 122, 101, 30).npz``."""
    match = MASK_NAME.match(Path(path).name)
    if not match:
        raise InputError(f"{path}: an M3D-Seg mask file must be named 'mask_(C, X, Y, Z).npz'.")
    return tuple(int(g) for g in match.groups())


def load_dataset_info(path: str | os.PathLike) -> dict[str, list[str]]:
    """M3D's ``dataset_info``: dataset code → ordered category list (channel i = category i)."""
    data = read_json(path, "dataset info")
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise InputError(f"{path}: expected a JSON object of dataset code -> [category names].")
    return data


@dataclass(frozen=True)
class M3DSegCase:
    """One case; nothing is read until :meth:`load_image` / :meth:`load_masks`."""

    name: str
    image_path: Path
    mask_path: Path
    categories: tuple[str, ...]

    @property
    def mask_shape(self) -> tuple[int, int, int, int]:
        return parse_mask_shape(self.mask_path)

    def load_image(self) -> np.ndarray:
        """``(1, X, Y, Z)`` float32 as stored (normalised intensities, not HU)."""
        try:
            image = np.load(self.image_path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"{self.image_path}: cannot read image ({err}).") from err
        if image.ndim != 4 or image.shape[0] != 1 or image.shape[1:] != self.mask_shape[1:]:
            raise InputError(
                f"{self.image_path}: image shape {image.shape} does not match (1, X, Y, Z) = "
                f"(1, {', '.join(map(str, self.mask_shape[1:]))}) from {self.mask_path.name}."
            )
        return image.astype(np.float32, copy=False)

    def load_masks(self) -> np.ndarray:
        """``(C, X, Y, Z)`` uint8 binary masks, one channel per category."""
        import scipy.sparse

        shape = self.mask_shape
        try:
            sparse = scipy.sparse.load_npz(self.mask_path)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise InputError(f"{self.mask_path}: cannot read sparse mask ({err}).") from err
        if sparse.shape != (shape[0], int(np.prod(shape[1:]))):
            raise InputError(f"{self.mask_path}: sparse matrix shape {sparse.shape} contradicts its file name {shape}.")
        return (sparse.toarray().reshape(shape) != 0).astype(np.uint8)

    def mask(self, category: str) -> np.ndarray:
        """``(X, Y, Z)`` mask of one category (by name)."""
        if category not in self.categories:
            raise InputError(f"{self.name}: no category {category!r}; categories are {list(self.categories)}.")
        return self.load_masks()[self.categories.index(category)]

    def to_volume(self, array_xyz: np.ndarray | None = None) -> Volume:
        """Image (or a given ``(X, Y, Z)`` array) as a :class:`Volume`.

        M3D-Seg stores no geometry. The grid is 1 mm isotropic with axes declared (L, P, S), the model grid's
        canonical order, so mapping to the model grid does not flip anything: exactly M3D's own recipe
        (``swapaxes(-1, -3)`` to ``(Z, Y, X)``, no flips).
        """
        data = self.load_image()[0] if array_xyz is None else array_xyz
        lps_axes = np.diag([-1.0, -1.0, 1.0, 1.0])
        return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), lps_axes, {"source_path": str(self.image_path)})


class M3DSegDataset:
    """One M3D-Seg dataset (a code such as ``0011``) under an ``M3D_Seg`` root."""

    def __init__(self, root: str | os.PathLike, code: str, dataset_info: dict[str, list[str]] | None = None) -> None:
        self.root = Path(root)
        self.code = code
        self.json_path = self.root / code / f"{code}.json"
        if not self.json_path.is_file():
            raise InputError(f"{self.json_path}: no dataset JSON; expected <root>/{code}/{code}.json.")
        self.description = read_json(self.json_path, "dataset JSON")
        if not isinstance(self.description, dict):
            raise InputError(f"{self.json_path}: expected a JSON object with 'labels', 'train' and 'test'.")
        labels = self.description.get("labels")
        if not isinstance(labels, dict):
            raise InputError(f"{self.json_path}: missing the 'labels' object.")
        self.categories = tuple(labels[str(n)] for n in range(1, len(labels)) if str(n) in labels)
        if len(self.categories) != len(labels) - 1:
            raise InputError(f"{self.json_path}: 'labels' must be numbered 1..N after '0' (background).")
        if dataset_info is not None and code in dataset_info and list(dataset_info[code]) != list(self.categories):
            raise InputError(f"{self.json_path}: labels differ from dataset_info[{code!r}].")

    def cases(self, split: str = "train") -> Iterator[M3DSegCase]:
        """The cases of ``split`` (``train`` or ``test``), checked against the category count."""
        entries = self.description.get(split)
        if not isinstance(entries, list):
            raise InputError(f"{self.json_path}: no {split!r} list.")
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or not {"image", "label"} <= set(entry):
                raise InputError(f"{self.json_path}: {split}[{n}] needs 'image' and 'label' paths.")
            image_path = self.root / entry["image"]
            mask_path = self.root / entry["label"]
            for path in (image_path, mask_path):
                if not path.is_file():
                    raise InputError(f"{self.json_path}: listed file {path} does not exist.")
            channels = parse_mask_shape(mask_path)[0]
            if channels != len(self.categories):
                raise InputError(
                    f"{mask_path}: {channels} mask channels but {len(self.categories)} categories "
                    f"in {self.json_path.name}."
                )
            yield M3DSegCase(image_path.parent.name, image_path, mask_path, self.categories)


def _load_case(case: M3DSegCase) -> tuple[Volume, dict[str, np.ndarray]]:
    masks = case.load_masks()  # (C, X, Y, Z)
    return case.to_volume(), {c: masks[n].transpose(2, 1, 0) for n, c in enumerate(case.categories)}


def cache_items(dataset: M3DSegDataset, split: str = "train") -> list:
    """Cache items (see :mod:`MedVLSAM2Lib.data.cache`) for every case of a split, named ``<code>_<case>``."""
    from functools import partial

    from .cache import CacheItem

    return [
        CacheItem(f"{dataset.code}_{case.name}", partial(_load_case, case), intensity="normalized")
        for case in dataset.cases(split)
    ]
