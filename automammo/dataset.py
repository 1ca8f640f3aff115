"""The one dataset format: ``dataset.npz``.

Arrays (all of length N):

- ``x``       (N, H, W) uint8 or uint16 grayscale patches, as read;
- ``label``   int, 0 baseline, 1 mass benign, 2 mass malignant, 3 calcification benign,
  4 calcification malignant;
- ``pair``    int, index of the partner patch (a lesion's baseline and back), -1 for none;
- ``patient`` str, group id: no patient is ever on both sides of a split;
- ``split``   str, ``train`` or ``test``;
- any other array of length N is free metadata (source, view, lesion size, ...).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from automammo.atomic import atomic_path
from automammo.errors import DataError

LABEL_NAMES = (
    "baseline",
    "mass benign",
    "mass malignant",
    "calcification benign",
    "calcification malignant",
)
REQUIRED = ("x", "label", "pair", "patient", "split")
SPLITS = ("train", "test")
# Keyword arguments of np.savez: arrays so named cannot be saved.
RESERVED = ("file", "allow_pickle", "args", "kwds")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A validated dataset held in memory. Build one with ``Dataset.create`` or ``load``."""

    x: np.ndarray
    label: np.ndarray
    pair: np.ndarray
    patient: np.ndarray
    split: np.ndarray
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "<memory>"

    @classmethod
    def create(cls, x, label, pair, patient, split, meta=None, source="<memory>") -> "Dataset":
        """Coerce to the canonical dtypes and validate; raises ``DataError`` naming ``source``."""
        arrays = {"x": x, "label": label, "pair": pair, "patient": patient, "split": split}
        arrays.update(meta or {})
        return _from_arrays(arrays, source)

    def __len__(self) -> int:
        return len(self.label)

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.x.shape[1:3])

    def fingerprint(self) -> str:
        """sha256 over every array, so a run records exactly which data it saw."""
        h = hashlib.sha256()
        for name in (*REQUIRED, *sorted(self.meta)):
            arr = getattr(self, name) if name in REQUIRED else self.meta[name]
            h.update(name.encode())
            h.update(str(arr.dtype).encode())
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary name, then rename); returns the path."""
        path = check_out_path(path)
        arrays = {name: getattr(self, name) for name in REQUIRED}
        arrays.update(self.meta)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, **arrays)
        return path


def check_out_path(path: str | os.PathLike) -> Path:
    """A dataset file to write: it must end in ``.npz``, as every command reading one expects.
    Importers call this first, so that a long import does not fail at its last step."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise DataError(f"{path}: the dataset file must end in .npz")
    return path


def load(path: str | os.PathLike) -> Dataset:
    """Read and validate ``path``; every problem is a one-line ``DataError`` naming the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a dataset .npz file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    # What np.load would misreport: an .npy array, or text (which it takes for a pickle).
    if magic == b"\x93NUMPY":
        raise DataError(f"{path}: a single .npy array, not a dataset .npz (a zip of the arrays x, label, pair, "
                        "patient, split); see `automammo data import-arrays`")
    if magic[:2] != b"PK":
        raise DataError(f"{path}: not a dataset .npz (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, zipfile.LargeZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        # np.load raises ValueError for object arrays (pickle) and for non-npz content.
        raise DataError(f"{path}: not a valid dataset .npz ({exc})") from None
    except Exception as exc:  # zlib / format errors from a corrupted member
        raise DataError(f"{path}: corrupted .npz ({type(exc).__name__}: {exc})") from None
    return _from_arrays(arrays, str(path))


def _from_arrays(arrays: dict, source: str) -> Dataset:
    def fail(msg: str):
        raise DataError(f"{source}: {msg}")

    missing = [name for name in REQUIRED if name not in arrays]
    if missing:
        fail(f"missing array(s) {', '.join(missing)}; a dataset needs {', '.join(REQUIRED)}")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    x = arrays["x"]
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        fail(f"x must have shape (N, H, W), got {x.shape}")
    if x.dtype not in (np.uint8, np.uint16):
        fail(f"x must be uint8 or uint16, got {x.dtype} (convert with 'automammo data import-arrays')")
    n = x.shape[0]
    if n == 0:
        fail("x holds no images")
    if min(x.shape[1:]) < 8:
        fail(f"images of {x.shape[1]}x{x.shape[2]} px are too small (at least 8x8)")
    for name, arr in arrays.items():
        if name != "x" and (arr.ndim != 1 or len(arr) != n):
            fail(f"array {name!r} has shape {arr.shape}, expected ({n},) to match x")

    label = arrays["label"]
    if label.dtype.kind not in "iu":
        if label.dtype.kind == "f" and np.all(np.isfinite(label)) and np.all(label == np.round(label)):
            label = label.astype(np.int64)
        else:
            fail(f"label must be integers 0-4, got dtype {label.dtype}")
    bad = np.flatnonzero((label < 0) | (label > 4))
    if bad.size:
        fail(f"label must be in 0-4; found {label[bad[0]]} at index {bad[0]} ({bad.size} bad in all)")
    label = label.astype(np.int64)

    pair = arrays["pair"]
    if pair.dtype.kind not in "iu":
        fail(f"pair must be integers, got dtype {pair.dtype}")
    pair = pair.astype(np.int64)
    bad = np.flatnonzero((pair < -1) | (pair >= n))
    if bad.size:
        fail(f"pair index {pair[bad[0]]} at index {bad[0]} is outside -1..{n - 1}")
    linked = np.flatnonzero(pair >= 0)
    bad = linked[pair[linked] == linked]
    if bad.size:
        fail(f"pair at index {bad[0]} points to itself")
    bad = linked[pair[pair[linked]] != linked]
    if bad.size:
        i = bad[0]
        fail(f"pair is not symmetric: {i} -> {pair[i]} but {pair[i]} -> {pair[pair[i]]}")
    bad = linked[(label[linked] == 0) == (label[pair[linked]] == 0)]
    if bad.size:
        i = bad[0]
        fail(f"pair {i} <-> {pair[i]} must join a baseline (label 0) and a lesion, got labels {label[i]} and {label[pair[i]]}")

    patient = arrays["patient"].astype(str)
    if np.any(patient == ""):
        fail(f"patient is empty at index {np.flatnonzero(patient == '')[0]}")
    bad = linked[patient[linked] != patient[pair[linked]]]
    if bad.size:
        i = bad[0]
        fail(f"pair {i} <-> {pair[i]} joins two patients ({str(patient[i])!r}, {str(patient[pair[i]])!r})")
    split = np.char.lower(np.char.strip(arrays["split"].astype(str)))
    bad = np.flatnonzero(~np.isin(split, SPLITS))
    if bad.size:
        fail(f"split must be 'train' or 'test'; found {str(split[bad[0]])!r} at index {bad[0]}")
    both = np.intersect1d(patient[split == "train"], patient[split == "test"])
    if both.size:
        fail(f"patient {str(both[0])!r} is in both train and test ({both.size} patients in all); "
             "a patient's patches must stay on one side of the split")
    for name in set(arrays) - set(REQUIRED):
        if name in RESERVED:
            fail(f"metadata array name {name!r} is reserved; rename it")
        if arrays[name].dtype == object:
            fail(f"metadata array {name!r} has dtype object; use numbers or strings")
    meta = {k: v for k, v in arrays.items() if k not in REQUIRED}
    return Dataset(x, label, pair, patient, split, meta, source)
