"""Patch geometry and dataset assembly shared by every importer.

The importers differ in how they find a lesion (a CBIS-DDSM ROI mask, a mini-MIAS circle,
a ready-cut file); from there on they do the same things, and do them here:

- ``Box``: an axis-aligned rectangle in pixel coordinates (rows, columns);
- ``lesion_box``: the square patch around a lesion, with margin and a floor, kept inside
  the image;
- ``TissueMask``: where the breast is (Otsu threshold, largest component, holes filled);
- ``place_baseline``: a patch of the same size directly left / right / above / below the
  lesion patch, not overlapping it or any other lesion of the film, inside breast tissue;
- ``crop`` and ``resize_patch``: cut and resize without changing the dtype (16 bits stay
  16 bits);
- ``to_canonical_dtype``: the only conversions an importer may make to pixel values
  (lossless, or a documented fixed scale; never a data-dependent min-max rescale);
- ``PatchCollector``: gathers lesion/baseline pairs, counts what was skipped and why, and
  builds the validated ``Dataset``;
- ``holdout_split``: a patient-grouped, class-stratified test hold-out for sources without
  an official split.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from automammo.dataset import Dataset
from automammo.errors import DataError

#: Order in which baseline positions are tried; ties in tissue cover go to the earliest.
PLACEMENTS = ("left", "right", "above", "below")


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Box:
    """A rectangle of pixels: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int

    @property
    def bottom(self) -> int:
        """One past the last row."""
        return self.top + self.height

    @property
    def right(self) -> int:
        """One past the last column."""
        return self.left + self.width

    @property
    def center(self) -> tuple[float, float]:
        return (self.top + self.height / 2.0, self.left + self.width / 2.0)

    def overlaps(self, other: "Box") -> bool:
        """True when the two boxes share at least one pixel (touching edges do not count)."""
        return (
            self.top < other.bottom
            and other.top < self.bottom
            and self.left < other.right
            and other.left < self.right
        )

    def contains(self, other: "Box") -> bool:
        """True when every pixel of ``other`` is inside this box."""
        return (
            self.top <= other.top
            and self.left <= other.left
            and other.bottom <= self.bottom
            and other.right <= self.right
        )

    def inside(self, shape: Sequence[int]) -> bool:
        """True when the box lies entirely within an image of ``shape`` (rows, cols)."""
        return self.top >= 0 and self.left >= 0 and self.bottom <= shape[0] and self.right <= shape[1]

    def shifted(self, drow: int, dcol: int) -> "Box":
        return Box(self.top + drow, self.left + dcol, self.height, self.width)


def mask_bbox(mask: np.ndarray) -> Box | None:
    """The tight bounding box of the non-zero pixels of ``mask``; None when it is empty."""
    rows = np.flatnonzero(np.any(mask, axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(np.any(mask, axis=0))
    return Box(int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1))


def circle_bbox(row: float, col: float, radius: float) -> Box:
    """The bounding box of a circle (mini-MIAS gives lesions as centre and radius)."""
    r = max(float(radius), 0.5)
    top = int(math.floor(row - r))
    left = int(math.floor(col - r))
    side = int(math.ceil(row + r)) - top
    return Box(top, left, side, int(math.ceil(col + r)) - left)


def lesion_box(lesion: Box, shape: Sequence[int], margin: float = 0.2, min_side: int = 0) -> Box:
    """The square patch around a lesion, inside an image of ``shape``.

    The side is the lesion's longer side plus ``margin`` of it on every side
    (``side = longest * (1 + 2 * margin)``), at least ``min_side``: the margin keeps the
    lesion's border and some surrounding tissue, which is where a margin's character
    (circumscribed, spiculated) shows; the floor stops a tiny calcification from being
    blown up from a handful of pixels. The square is centred on the lesion and then
    shifted, not shrunk, to stay inside the image, so the lesion stays whole. Only when
    the square is larger than the image itself is it cut to the image's shorter side.

    Args:
        lesion: the lesion's bounding box.
        shape: the image's (rows, cols).
        margin: fraction of the longer lesion side added on each side.
        min_side: smallest side in pixels.

    Returns:
        A square ``Box`` inside the image.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    rows, cols = int(shape[0]), int(shape[1])
    longest = max(lesion.height, lesion.width)
    side = int(math.ceil(longest * (1.0 + 2.0 * margin)))
    side = max(side, int(min_side), 1)
    side = min(side, rows, cols)
    crow, ccol = lesion.center
    top = int(round(crow - side / 2.0))
    left = int(round(ccol - side / 2.0))
    top = min(max(top, 0), rows - side)
    left = min(max(left, 0), cols - side)
    return Box(top, left, side, side)


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    """The pixels of ``box``; refuses a box that leaves the image (no silent padding)."""
    if not box.inside(image.shape):
        raise ValueError(f"box {box} is outside an image of shape {image.shape}")
    return image[box.top : box.bottom, box.left : box.right]


def resize_patch(patch: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D patch to ``size`` x ``size`` keeping its dtype and value scale.

    Bilinear interpolation with Gaussian anti-aliasing when shrinking (so fine
    calcifications are averaged, not aliased into noise); values are rounded and clipped
    to the dtype's range, so a uint16 patch stays a uint16 patch with the same intensity
    scale.
    """
    from skimage.transform import resize  # imported here: only importers need it

    if patch.ndim != 2:
        raise ValueError(f"expected a 2-D patch, got shape {patch.shape}")
    if patch.shape == (size, size):
        return patch.copy()
    dtype = patch.dtype
    shrinking = min(patch.shape) > size
    out = resize(
        patch.astype(np.float64),
        (size, size),
        order=1,
        mode="reflect",
        anti_aliasing=shrinking,
        preserve_range=True,
    )
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(dtype)


class TissueMask:
    """Where the breast is, for the question "is this box inside breast tissue?".

    Computed on a subsampled copy of the image (a mask needs no 50-micron precision, and a
    4000 x 3000 film then takes milliseconds): Otsu's threshold separates the tissue from
    the dark film background, the largest connected component drops labels and scanner
    marks, and holes are filled so that dark fatty tissue inside the breast still counts as
    breast. Coverage queries use a summed-area table, so trying many boxes is cheap.
    """

    def __init__(self, mask: np.ndarray, step: int, shape: Sequence[int]):
        self.mask = mask.astype(bool)
        self.step = int(step)
        self.shape = (int(shape[0]), int(shape[1]))
        sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
        sat[1:, 1:] = np.cumsum(np.cumsum(self.mask, axis=0), axis=1)
        self._sat = sat

    @classmethod
    def from_image(cls, image: np.ndarray, max_side: int = 512) -> "TissueMask":
        """Segment the breast in a full film (2-D, any integer or float dtype)."""
        from scipy import ndimage
        from skimage.filters import threshold_otsu

        step = max(1, int(math.ceil(max(image.shape) / float(max_side))))
        small = np.asarray(image[::step, ::step], dtype=np.float64)
        if small.max() == small.min():
            # A flat image has no background to separate from: call it all tissue rather
            # than none, so that synthetic flat test films still get baselines.
            return cls(np.ones(small.shape, bool), step, image.shape)
        mask = small > threshold_otsu(small)
        # An opening cuts the thin bright strips of scanned film edges and rulers that
        # would otherwise join the breast's component (and, with hole filling, enclose
        # background as "tissue").
        mask = ndimage.binary_opening(mask, structure=np.ones((5, 5), bool))
        if not mask.any():
            mask = small > threshold_otsu(small)
        labels, n = ndimage.label(mask)
        if n > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            mask = labels == int(np.argmax(sizes))
        mask = ndimage.binary_fill_holes(mask)
        return cls(mask, step, image.shape)

    def fraction(self, box: Box) -> float:
        """Fraction of ``box`` covered by tissue (0 for a box outside the image)."""
        top = max(box.top, 0) // self.step
        left = max(box.left, 0) // self.step
        bottom = -(-min(box.bottom, self.shape[0]) // self.step)
        right = -(-min(box.right, self.shape[1]) // self.step)
        bottom = min(bottom, self.mask.shape[0])
        right = min(right, self.mask.shape[1])
        if bottom <= top or right <= left:
            return 0.0
        s = self._sat
        inside = s[bottom, right] - s[top, right] - s[bottom, left] + s[top, left]
        return float(inside) / float((bottom - top) * (right - left))

    def full(self) -> np.ndarray:
        """The mask at the image's own resolution (for pictures and tests)."""
        big = np.repeat(np.repeat(self.mask, self.step, axis=0), self.step, axis=1)
        return big[: self.shape[0], : self.shape[1]]


def place_baseline(
    patch: Box,
    shape: Sequence[int],
    keep_out: Iterable[Box] = (),
    tissue: TissueMask | None = None,
    min_tissue: float = 0.9,
    gap: int = 0,
) -> tuple[Box, str] | None:
    """Where to cut the healthy baseline patch next to a lesion patch.

    The candidates are the four boxes of the lesion patch's size directly left of, right
    of, above and below it, ``gap`` pixels apart (adjacent, so that the baseline shows the
    same breast region and density as the lesion, the whole point of a baseline). A
    candidate is valid when it lies inside the image, overlaps no box of ``keep_out`` (every
    lesion of the film: the baseline must be healthy tissue) and is at least ``min_tissue``
    breast tissue. Among valid candidates the one with the most tissue wins, ties going in
    the order left, right, above, below, so the result is deterministic.

    Args:
        patch: the lesion patch.
        shape: the image's (rows, cols).
        keep_out: boxes no baseline may touch: the lesion bounding boxes of the film.
        tissue: the film's breast mask; None accepts any position inside the image.
        min_tissue: smallest tissue fraction of a valid baseline.
        gap: pixels between the lesion patch and the baseline.

    Returns:
        ``(box, placement)`` with placement one of ``PLACEMENTS``, or None when no
        candidate is valid (no room for a baseline).
    """
    keep_out = list(keep_out)
    step_r, step_c = patch.height + gap, patch.width + gap
    candidates = {
        "left": patch.shifted(0, -step_c),
        "right": patch.shifted(0, step_c),
        "above": patch.shifted(-step_r, 0),
        "below": patch.shifted(step_r, 0),
    }
    best: tuple[float, Box, str] | None = None
    for name in PLACEMENTS:
        box = candidates[name]
        if not box.inside(shape) or box.overlaps(patch):
            continue
        if any(box.overlaps(k) for k in keep_out):
            continue
        cover = 1.0 if tissue is None else tissue.fraction(box)
        if cover < min_tissue:
            continue
        if best is None or cover > best[0]:
            best = (cover, box, name)
    return None if best is None else (best[1], best[2])


# --------------------------------------------------------------------------- pixel values


def to_canonical_dtype(arr: np.ndarray, where: str) -> np.ndarray:
    """Convert pixel values to uint8 or uint16 without a data-dependent rescale.

    Rules (one image or a whole stack; the decision is made on the whole array so that
    every image of a stack keeps the same scale):

    - uint8 and uint16 are kept as they are;
    - other integers (int16, int32, int64, uint32 ...) must be non-negative; they become
      uint8 when every value fits in 0-255 and uint16 when they fit in 0-65535;
    - floats must be finite; values in [0, 1] are taken as a fraction of full scale and
      become uint16 (``round(x * 65535)``: 16 bits keep far more of a float's precision
      than 8 would); values in [0, 255] become uint8 when all are whole numbers (8-bit data
      stored as float) and uint16 scaled by 257 otherwise (so 255.0 is still full scale);
      whole numbers in [0, 65535] become uint16 as they are;
    - anything else (negative, z-scored, larger than 16 bits) is refused: squeezing it into
      16 bits would need a min-max rescale, which destroys the intensity scale that makes
      one image comparable with another.

    Args:
        arr: pixel values.
        where: the file (and index) named in the error message.

    Raises:
        DataError: NaN or infinite values, negative values, or a range that no lossless
            rule covers.
    """
    arr = np.asarray(arr)
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if arr.dtype == bool:
        raise DataError(f"{where}: pixel values are booleans (a mask?), expected a grayscale image")
    if arr.size == 0:
        raise DataError(f"{where}: holds no pixels")
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise DataError(f"{where}: negative pixel values (min {lo}); expected unsigned grayscale")
        if hi <= 255:
            return arr.astype(np.uint8)
        if hi <= 65535:
            return arr.astype(np.uint16)
        raise DataError(f"{where}: pixel values up to {hi} do not fit in 16 bits")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            kind = "NaN" if np.isnan(arr[tuple(bad)]) else "infinite"
            raise DataError(
                f"{where}: {int((~finite).sum())} NaN/infinite pixel value(s), first ({kind}) "
                f"at index {tuple(int(i) for i in bad)}"
            )
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0:
            raise DataError(
                f"{where}: float pixel values in [{lo:g}, {hi:g}] are negative (normalised or "
                f"z-scored?); give raw intensities (uint8/uint16, or floats in [0, 1] or [0, 255])"
            )
        integral = bool(np.all(arr == np.round(arr)))
        if hi <= 1.0:
            return np.rint(arr.astype(np.float64) * 65535.0).astype(np.uint16)
        if hi <= 255.0:
            if integral:
                return arr.astype(np.uint8)
            return np.rint(arr.astype(np.float64) * 257.0).astype(np.uint16)
        if hi <= 65535.0 and integral:
            return arr.astype(np.uint16)
        raise DataError(
            f"{where}: float pixel values in [{lo:g}, {hi:g}] are neither in [0, 1], nor in "
            f"[0, 255], nor whole numbers in [0, 65535]; convert them to uint8/uint16 yourself "
            f"(a min-max rescale here would lose the intensity scale)"
        )
    raise DataError(f"{where}: unsupported pixel dtype {arr.dtype}")


# --------------------------------------------------------------------------- assembly


#: Names a metadata array may not take: the dataset's own arrays, and the parameters of
#: ``np.savez_compressed`` (an array called ``file`` would collide with its first argument).
RESERVED_META = frozenset({"x", "label", "pair", "patient", "split", "file", "allow_pickle"})


class PatchCollector:
    """Gathers patches for one importer run and builds the ``Dataset``.

    Each lesion is added together with its baseline (``add_pair``) or alone
    (``add_single``); anything left out is counted with ``skip(reason)``, so that the
    importer can say what it kept, what it skipped and why. Every added patch carries the
    same metadata keys (``meta``): the first call fixes them.
    """

    def __init__(self) -> None:
        self.x: list[np.ndarray] = []
        self.label: list[int] = []
        self.pair: list[int] = []
        self.patient: list[str] = []
        self.split: list[str] = []
        self.meta: dict[str, list] = {}
        self.skipped: Counter = Counter()
        self.notes: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.label)

    def _add(self, patch: np.ndarray, label: int, partner: int, patient: str, split: str, meta: dict) -> int:
        if not self.meta and not self.x:
            clash = set(meta) & RESERVED_META
            if clash:
                raise ValueError(f"metadata name(s) {sorted(clash)} are reserved")
            self.meta = {k: [] for k in meta}
        if set(meta) != set(self.meta):
            raise ValueError(f"metadata keys {sorted(meta)} differ from {sorted(self.meta)}")
        if patch.ndim != 2:
            raise ValueError(f"expected a 2-D patch, got shape {patch.shape}")
        index = len(self.label)
        self.x.append(patch)
        self.label.append(int(label))
        self.pair.append(int(partner))
        self.patient.append(str(patient))
        self.split.append(str(split))
        for k, v in meta.items():
            self.meta[k].append(v)
        return index

    def add_pair(
        self,
        lesion: np.ndarray,
        baseline: np.ndarray,
        label: int,
        patient: str,
        split: str,
        lesion_meta: dict,
        baseline_meta: dict,
    ) -> tuple[int, int]:
        """Add a lesion (label 1-4) and its baseline (label 0); returns their indices."""
        if not 1 <= int(label) <= 4:
            raise ValueError(f"a lesion label is 1-4, got {label}")
        n = len(self.label)
        # Baseline first, lesion second: the course format's order (2i, 2i+1), which
        # keeps the file readable by hand and by the seed notebooks.
        self._add(baseline, 0, n + 1, patient, split, baseline_meta)
        self._add(lesion, label, n, patient, split, lesion_meta)
        return n + 1, n

    def add_single(self, patch: np.ndarray, label: int, patient: str, split: str, meta: dict) -> int:
        """Add a patch without a partner."""
        return self._add(patch, label, -1, patient, split, meta)

    def skip(self, reason: str, n: int = 1, example: str | None = None) -> None:
        """Count ``n`` items left out for ``reason``; ``example`` (a file, a row) is shown."""
        self.skipped[reason] += n
        if example is not None and len(self.examples.setdefault(reason, [])) < 3:
            self.examples[reason].append(str(example))

    def remember(self, reason: str, example: str) -> None:
        """Keep an example for ``reason`` without counting a skip (counted elsewhere)."""
        if len(self.examples.setdefault(reason, [])) < 3:
            self.examples[reason].append(str(example))

    def note(self, what: str, n: int = 1) -> None:
        """Count something worth telling the user that did not drop data."""
        self.notes[what] += n

    def build(self, source: str) -> Dataset:
        """The validated dataset; a ``DataError`` when nothing usable was found.

        Patches of mixed dtypes (8-bit PNGs beside 16-bit DICOMs) are brought to uint16 by
        multiplying the 8-bit ones by 257, which is exact and maps 255 to 65535.
        """
        if not self.x:
            detail = self.skip_text() or "no lesions"
            first = next((ex[0] for ex in self.examples.values() if ex), None)
            if first:
                detail += f"; e.g. {first}"
            raise DataError(f"{source}: nothing usable was found ({detail})")
        shapes = Counter(p.shape for p in self.x)
        if len(shapes) > 1:
            raise DataError(f"{source}: patches of different sizes {sorted(shapes)}; resize them to one size")
        dtypes = {p.dtype for p in self.x}
        if dtypes == {np.dtype(np.uint8), np.dtype(np.uint16)}:
            n8 = sum(p.dtype == np.uint8 for p in self.x)
            self.x = [p.astype(np.uint16) * np.uint16(257) if p.dtype == np.uint8 else p for p in self.x]
            self.note("8-bit patches widened to 16 bits (x257)", n8)
        elif len(dtypes) > 1:
            raise DataError(f"{source}: patches of dtypes {sorted(map(str, dtypes))}")
        meta = {k: np.asarray(v) for k, v in self.meta.items()}
        return Dataset.create(
            x=np.stack(self.x),
            label=np.asarray(self.label, dtype=np.int64),
            pair=np.asarray(self.pair, dtype=np.int64),
            patient=np.asarray(self.patient, dtype=str),
            split=np.asarray(self.split, dtype=str),
            meta=meta,
            source=source,
        )

    def skip_text(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())

    def finish(self, out, echo, test_fraction: float = 0.0, seed: int = 0) -> Dataset:
        """Hold out a patient-grouped test part if asked, validate, save atomically, report."""
        if test_fraction and len(self):
            self.split = list(holdout_split(np.asarray(self.patient), np.asarray(self.label), test_fraction, seed))
        ds = self.build(str(out))
        ds.save(out)
        for line in self.summary(ds, out):
            echo(line)
        return ds

    def summary(self, ds: Dataset, out) -> list[str]:
        """Lines telling what was written, kept and skipped."""
        from automammo.dataset import LABEL_NAMES

        lesions = int(np.sum(ds.label > 0))
        paired = int(np.sum((ds.label > 0) & (ds.pair >= 0)))
        lines = [
            f"wrote {out}: {len(ds)} patches {ds.x.shape[1]}x{ds.x.shape[2]} {ds.x.dtype}, "
            f"{lesions} lesions ({paired} with a baseline), {len(np.unique(ds.patient))} patients",
        ]
        for split in ("train", "test"):
            sel = ds.split == split
            if sel.any():
                counts = np.bincount(ds.label[sel], minlength=5)
                parts = ", ".join(f"{LABEL_NAMES[i]} {c}" for i, c in enumerate(counts) if c)
                lines.append(f"  {split}: {int(sel.sum())} patches ({parts})")
        skipped = sum(self.skipped.values())
        lines.append(f"skipped {skipped}" + (f": {self.skip_text()}" if skipped else ""))
        for reason, examples in self.examples.items():
            lines.append(f"  {reason}, e.g. " + "; ".join(examples))
        for what, n in self.notes.most_common():
            lines.append(f"note: {what}: {n}")
        return lines


# --------------------------------------------------------------------------- splits


def holdout_split(patient: np.ndarray, label: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Hold out about ``fraction`` of the patients as ``test``, stratified by class.

    No patient is on both sides. Patients are visited in a seeded random order and each
    goes to test when that brings the per-class test counts closer to ``fraction`` of the
    class totals (lesions only: baselines follow their lesion's patient), so rare classes
    get their share. Deterministic for a seed.

    Args:
        patient: group id per sample.
        label: label 0-4 per sample.
        fraction: share of samples to hold out, 0 < fraction < 1.
        seed: random seed.

    Returns:
        An array of ``"train"`` / ``"test"`` per sample.

    Raises:
        DataError: a fraction outside (0, 1) or fewer than two patients.
    """
    patient = np.asarray(patient).astype(str)
    label = np.asarray(label, dtype=np.int64)
    if not 0.0 < fraction < 1.0:
        raise DataError(f"test fraction must be between 0 and 1, got {fraction}")
    groups, inverse = np.unique(patient, return_inverse=True)
    if len(groups) < 2:
        raise DataError(f"a test hold-out needs at least 2 patients, found {len(groups)}")
    # Stratify on lesion classes when there are lesions; a dataset of baselines only (or
    # one class) falls back to plain counts.
    strat = np.where(label > 0, label, 0) if np.any(label > 0) else np.zeros_like(label)
    weight = (label > 0) if np.any(label > 0) else np.ones(len(label), bool)
    counts = np.zeros((len(groups), 5), dtype=np.float64)
    np.add.at(counts, (inverse[weight], strat[weight]), 1.0)
    target = counts.sum(axis=0) * fraction
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    test = np.zeros(len(groups), bool)
    current = np.zeros(5)
    for g in order:
        after = current + counts[g]
        if np.abs(after - target).sum() < np.abs(current - target).sum():
            test[g] = True
            current = after
    if not test.any():
        test[order[0]] = True
    if test.all():
        test[order[-1]] = False
    return np.where(test[inverse], "test", "train")
