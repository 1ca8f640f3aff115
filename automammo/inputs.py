"""Reading what ``automammo predict`` is given: a dataset.npz, PNG/JPEG/TIFF/PGM or DICOM.

Pixels are kept as stored, like the importers keep them: an 8-bit image stays uint8, a
16-bit PNG or DICOM stays uint16 with its own values, because the bundle's preprocessing
scales by the bit depth of the data it was trained on. Any unreadable file is a one-line
``DataError`` that names it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from automammo.dicom import is_dicom_file, read_dicom
from automammo.errors import DataError
from automammo.tasks import Task

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".pgm", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom"}


@dataclass
class PredictInputs:
    """Patches to predict, in order.

    Attributes:
        names: one label per patch (file name, or ``dataset.npz#row``).
        images: raw 2-D patches (uint8 or uint16), possibly of different sizes.
        baselines: the baseline partner of each patch, or None where there is none.
        columns: extra per-patch columns for the CSV (patient, split, true class for
            dataset rows; empty strings for files).
    """

    names: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    baselines: list[np.ndarray | None] = field(default_factory=list)
    columns: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def add(self, name: str, image: np.ndarray, baseline: np.ndarray | None = None, **columns: str) -> None:
        # Columns in the order they first appear: the CSV's order does not vary between runs.
        for key in [*self.columns, *(k for k in columns if k not in self.columns)]:
            self.columns.setdefault(key, [""] * len(self.names)).append(str(columns.get(key, "")))
        self.names.append(name)
        self.images.append(image)
        self.baselines.append(baseline)

    @property
    def dtypes(self) -> set[str]:
        return {str(img.dtype) for img in self.images}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One grayscale patch from a DICOM or an image file Pillow reads.

    Returns:
        (H, W) uint8 or uint16 pixels as stored (DICOM MONOCHROME1 is inverted).

    Raises:
        DataError: missing, truncated, not an image, or an unsupported pixel format.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected an image or DICOM file")
    if path.suffix.lower() in DICOM_SUFFIXES or is_dicom_file(path):
        return read_dicom(path).pixels
    return _read_pillow(path)


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "CMYK", "YCbCr"):
                # Grayscale exports of a mammogram are often saved as RGB: luminance is
                # exactly the gray value then.
                return np.asarray(img.convert("L"), dtype=np.uint8)
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img)
            else:
                raise DataError(f"{path}: image mode {mode} is not supported; expected grayscale")
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image or DICOM file ({type(exc).__name__}: {exc})") from None
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise DataError(f"{path}: image holds NaN or Inf values")
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise DataError(f"{path}: values {arr.min()}-{arr.max()} do not fit 16 bits")
    if arr.dtype.kind == "f" and np.any(arr != np.round(arr)):
        raise DataError(f"{path}: floating-point pixels; export the image with integer gray levels")
    return arr.astype(np.uint16)


def read_inputs(paths, baselines=(), task: Task | None = None, need_baseline: bool = False) -> PredictInputs:
    """Collect patches from files and datasets.

    Args:
        paths: image files, DICOM files and/or dataset.npz files (every row of a dataset
            that ``task`` classifies, with its ``pair`` baseline).
        baselines: baseline files, one per image/DICOM file of ``paths`` in the same order.
        task: the bundle's task, to pick dataset rows and name their true class.
        need_baseline: the bundle compares lesions with baselines: refuse any patch without.

    Raises:
        DataError: an unreadable file, or baselines that do not line up with the files.
    """
    from automammo.dataset import load as load_dataset

    paths = [Path(p) for p in paths]
    files = [p for p in paths if p.suffix.lower() != ".npz"]
    baselines = [Path(b) for b in baselines]
    if baselines and len(baselines) != len(files):
        raise DataError(f"{len(baselines)} --baseline files for {len(files)} image files; give one per image, in order")
    if need_baseline and files and not baselines:
        raise DataError("this bundle compares each lesion with its baseline patch: give --baseline FILE for every image")
    out = PredictInputs()
    partner = iter(baselines)
    for path in paths:
        if path.suffix.lower() == ".npz":
            ds = load_dataset(path)
            rows = task.indices(ds) if task is not None else np.arange(len(ds))
            if rows.size == 0:
                raise DataError(f"{path}: no samples of task {task.name if task else ''}")
            y = task.targets(ds.label) if task is not None else ds.label
            for r in rows:
                b = ds.x[ds.pair[r]] if ds.pair[r] >= 0 else None
                if need_baseline and b is None:
                    raise DataError(f"{path}: row {r} has no baseline partner (pair == -1), which this bundle needs")
                truth = task.classes[y[r]] if task is not None else str(ds.label[r])
                out.add(f"{path}#{r}", ds.x[r], b, split=ds.split[r], patient=ds.patient[r], true_class=truth)
        else:
            image = read_image(path)
            b = read_image(next(partner)) if baselines else None
            out.add(str(path), image, b)
    if not out.images:
        raise DataError("nothing to predict")
    return out
