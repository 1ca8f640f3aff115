"""The built-in digital phantom: simulated lesion patches with adjacent healthy baselines.

The phantom stands in for CBIS-DDSM when a user brings no data, so that every part of
automammo can be exercised on a laptop. Each simulated breast is one large field of
anatomical texture; every lesion of that breast gets a patch centred on it and a baseline
patch (label 0) cropped from a neighbouring cell of the same field, the way the CBIS-DDSM
course data pairs an abnormality with the healthy tissue beside it.

What is simulated, and why:

- Anatomical background: fibroglandular texture has an isotropic power spectrum close to
  ``1/f**beta`` with ``beta`` near 3 (Burgess et al. 2001, Med. Phys. 28:419), which is what
  makes lesion detection in mammograms hard. It is made here by filtering white noise in the
  Fourier domain, with ``beta`` drawn per breast from 2.6-3.4, a per-breast density level,
  faint curvilinear structures (ducts, vessels, ligaments) oriented towards the nipple, and a
  per-breast exposure.
- Masses follow the BI-RADS (5th ed.) shape and margin descriptors: benign masses are round
  or oval with circumscribed margins; malignant ones are irregular, with indistinct margins
  and radiating spicules.
- Calcifications follow the BI-RADS morphology and distribution descriptors: benign ones
  are coarse, round, rim-like or popcorn-like, few and scattered; malignant ones are fine,
  pleomorphic, many, clustered and often in linear / branching (ductal) arrangements.
- Every lesion draws a latent ``suspicion`` in [0, 1] (benign low, malignant high) that
  drives its morphology continuously; ``difficulty`` widens and brings together the two
  distributions, lowers lesion contrast, raises quantum noise and makes findings of the
  other type (a calcification inside a mass, a density under a calcification cluster) more
  common, so no task is trivial and none is hopeless.
- Imaging: a Gaussian blur for the detector MTF, Gaussian quantum noise, and quantisation to
  ``bits`` (12 by default, stored as uint16, the range of digitised film and of DICOM).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from automammo.dataset import Dataset
from automammo.errors import DataError

__all__ = ["synthesize", "power_law_field", "BETA_RANGE", "GENERATOR_VERSION"]

BETA_RANGE = (2.6, 3.4)
"""Range of the per-breast power-law exponent of the anatomical texture."""

GENERATOR_VERSION = 1
"""Bumped whenever the same arguments start to give different images; a cache of generated
phantoms should make it part of its key."""

_REFERENCE_SIZE = 64.0  # lesion geometry below is stated for 64 px patches and scaled
_SPLAT_STEP = 0.4  # px between the points that trace a line (spicule, duct, vessel)


@dataclass
class _Lesion:
    """One rendered finding: its attenuation map and what it looks like."""

    attenuation: np.ndarray
    lines: list = field(default_factory=list)  # spicules as (rows, cols, peaks) for _trace
    size: float = 0.0
    morphology: str = ""
    n_specks: int = 0


def synthesize(
    n_lesions: int = 400,
    size: int = 64,
    difficulty: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    calc_fraction: float = 0.5,
    malignant_fraction: float = 0.5,
    max_lesions_per_patient: int = 3,
    bits: int = 12,
) -> Dataset:
    """Simulate lesion patches and their adjacent healthy baselines.

    Args:
        n_lesions: number of lesions; the dataset holds twice as many patches, one lesion
            patch and one baseline patch per lesion.
        size: side of the square patches in pixels (16-1024). Lesion geometry scales with it.
        difficulty: 0 (conspicuous, textbook morphology) to 1 (faint, noisy, overlapping
            morphology between benign and malignant and between masses and calcifications).
        seed: the same seed and arguments give identical arrays.
        test_fraction: fraction of lesions whose patients go to the ``test`` split, in
            [0, 1); patients are never split, and the split is balanced over the labels.
        calc_fraction: fraction of lesions that are calcifications (the rest are masses).
        malignant_fraction: fraction of malignant lesions within each lesion type.
        max_lesions_per_patient: each patient has 1 to this many lesions (at most 8).
        bits: bit depth of the stored values (8 gives uint8, 9-16 give uint16).

    Returns:
        A validated ``Dataset``; labels 0 baseline, 1 mass benign, 2 mass malignant,
        3 calcification benign, 4 calcification malignant. ``pair`` links each lesion with
        its baseline both ways. Metadata arrays: ``source`` ("phantom"), ``lesion_size``
        (diameter or cluster extent in px, 0 for baselines), ``breast_density`` (BI-RADS
        1-4), ``beta`` (the breast's texture exponent), ``suspicion`` (latent morphology
        score, NaN for baselines), ``morphology`` (BI-RADS-style descriptor, "normal" for
        baselines) and ``n_specks`` (calcification specks rendered).

    Raises:
        DataError: an argument is out of range.
    """
    _check_arguments(n_lesions, size, difficulty, seed, test_fraction, calc_fraction,
                     malignant_fraction, max_lesions_per_patient, bits)
    root = np.random.SeedSequence(seed)
    plan_rng = np.random.default_rng(root.spawn(1)[0])
    labels = _lesion_labels(plan_rng, n_lesions, calc_fraction, malignant_fraction)
    groups = _patient_groups(plan_rng, n_lesions, max_lesions_per_patient)
    test_patients = _test_patients(plan_rng, groups, labels, test_fraction)

    n = 2 * n_lesions
    dtype = np.uint8 if bits <= 8 else np.uint16
    x = np.empty((n, size, size), dtype=dtype)
    label = np.zeros(n, dtype=np.int64)
    pair = np.empty(n, dtype=np.int64)
    patient = np.empty(n, dtype=object)
    split = np.empty(n, dtype=object)
    meta = {
        "lesion_size": np.zeros(n, dtype=np.float32),
        "breast_density": np.zeros(n, dtype=np.int64),
        "beta": np.zeros(n, dtype=np.float32),
        "suspicion": np.full(n, np.nan, dtype=np.float32),
        "morphology": np.full(n, "normal", dtype=object),
        "n_specks": np.zeros(n, dtype=np.int64),
    }
    # One field size for every breast of the dataset, so that how much of the breast's
    # low-frequency texture a patch sees does not depend on its patient's lesion count.
    grid = 3 if max_lesions_per_patient <= 3 else 4 if max_lesions_per_patient <= 5 else 5
    breast_seeds = root.spawn(len(groups))
    for p, lesion_ids in enumerate(groups):
        rng = np.random.default_rng(breast_seeds[p])
        breast = _simulate_breast(rng, [labels[i] for i in lesion_ids], size, difficulty, bits, grid)
        for (lesion_patch, baseline_patch, info), i in zip(breast.patches, lesion_ids, strict=True):
            a, b = 2 * i, 2 * i + 1  # a lesion and its baseline sit side by side
            x[a], x[b] = lesion_patch, baseline_patch
            label[a] = labels[i]
            pair[a], pair[b] = b, a
            patient[a] = patient[b] = f"PH{p:05d}"
            split[a] = split[b] = "test" if p in test_patients else "train"
            for m in (a, b):
                meta["breast_density"][m] = breast.birads_density
                meta["beta"][m] = breast.beta
            meta["lesion_size"][a] = info.size
            meta["suspicion"][a] = info.suspicion
            meta["morphology"][a] = info.morphology
            meta["n_specks"][a] = info.n_specks
    meta = {k: (v.astype(str) if v.dtype == object else v) for k, v in meta.items()}
    meta["source"] = np.full(n, "phantom")
    return Dataset.create(x, label, pair, patient.astype(str), split.astype(str), meta=meta,
                          source=f"phantom(seed={seed})")


def power_law_field(rng: np.random.Generator, shape: tuple[int, int], beta: float) -> np.ndarray:
    """Zero-mean, unit-variance isotropic noise whose power spectrum falls as ``1/f**beta``.

    White Gaussian noise is shaped in the Fourier domain by ``f**(-beta/2)``; the field is
    periodic, so callers crop away from nothing in particular.

    Args:
        rng: source of the white noise.
        shape: (rows, cols) of the field.
        beta: spectral exponent (about 3 for breast tissue).

    Returns:
        A float32 array of ``shape``.
    """
    gain = np.exp(np.float32(-beta / 2.0) * _log_frequency(tuple(shape)))
    gain[0, 0] = 0.0  # no mean: it is zeroed anyway and its "power" would be infinite
    texture = sfft.irfft2(sfft.rfft2(rng.standard_normal(shape, dtype=np.float32)) * gain, s=shape)
    texture -= texture.mean()
    return (texture / texture.std()).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _log_frequency(shape: tuple[int, int]) -> np.ndarray:
    """log of the radial frequency on the rfft2 grid of ``shape`` (0 at the mean's place)."""
    freq = np.hypot(sfft.fftfreq(shape[0])[:, None], sfft.rfftfreq(shape[1])[None, :])
    freq[0, 0] = 1.0
    logf = np.log(freq).astype(np.float32)
    logf.flags.writeable = False
    return logf


# --------------------------------------------------------------------------- arguments


def _check_arguments(n_lesions, size, difficulty, seed, test_fraction, calc_fraction,
                     malignant_fraction, max_lesions_per_patient, bits) -> None:
    def integer(name, value, low, high):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise DataError(f"phantom: {name} must be an integer, got {value!r}")
        if not low <= value <= high:
            raise DataError(f"phantom: {name} must be within {low}-{high}, got {value}")

    def fraction(name, value, low=0.0, high=1.0, high_open=False):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise DataError(f"phantom: {name} must be a number, got {value!r}")
        ok = low <= value < high if high_open else low <= value <= high
        if not (math.isfinite(value) and ok):
            bound = f"{low} <= {name} < {high}" if high_open else f"within {low}-{high}"
            raise DataError(f"phantom: {name} must be {bound}, got {value}")

    integer("n_lesions", n_lesions, 1, 1_000_000)
    integer("size", size, 16, 1024)
    integer("seed", seed, 0, 2**63 - 1)
    integer("max_lesions_per_patient", max_lesions_per_patient, 1, 8)
    integer("bits", bits, 8, 16)
    fraction("difficulty", difficulty)
    fraction("test_fraction", test_fraction, high_open=True)
    fraction("calc_fraction", calc_fraction)
    fraction("malignant_fraction", malignant_fraction)


# --------------------------------------------------------------------------- study design


def _lesion_labels(rng, n, calc_fraction, malignant_fraction) -> np.ndarray:
    """Exact class counts (up to rounding), in random order."""
    n_calc = int(round(n * calc_fraction))
    n_mass = n - n_calc
    n_mass_mal = int(round(n_mass * malignant_fraction))
    n_calc_mal = int(round(n_calc * malignant_fraction))
    labels = np.repeat([1, 2, 3, 4], [n_mass - n_mass_mal, n_mass_mal, n_calc - n_calc_mal, n_calc_mal])
    return rng.permutation(labels)


def _patient_groups(rng, n, max_per_patient) -> list[list[int]]:
    """Consecutive lesion ids grouped into patients of 1..max_per_patient lesions."""
    # Most patients in screening-recall cohorts have one finding, fewer have several.
    weights = 0.5 ** np.arange(max_per_patient)
    weights /= weights.sum()
    groups, start = [], 0
    while start < n:
        k = int(rng.choice(np.arange(1, max_per_patient + 1), p=weights))
        groups.append(list(range(start, min(n, start + k))))
        start += k
    return groups


def _test_patients(rng, groups, labels, test_fraction) -> set[int]:
    """Patients for ``test``: greedy, so that test holds ``test_fraction`` of every label."""
    if test_fraction == 0:
        return set()
    target = test_fraction * np.bincount(labels, minlength=5).astype(float)
    counts = np.zeros(5)
    chosen = set()
    for p in rng.permutation(len(groups)):
        if counts.sum() >= target.sum() or len(chosen) == len(groups) - 1:
            break
        add = np.bincount(labels[groups[p]], minlength=5)
        if np.abs(counts + add - target).sum() < np.abs(counts - target).sum():
            chosen.add(int(p))
            counts += add
    return chosen


# --------------------------------------------------------------------------- one breast


@dataclass
class _LesionInfo:
    size: float
    suspicion: float
    morphology: str
    n_specks: int


@dataclass
class _Breast:
    beta: float
    birads_density: int
    patches: list  # (lesion patch, baseline patch, _LesionInfo) per lesion


def _simulate_breast(rng, labels, size, difficulty, bits, grid) -> _Breast:
    """One breast: a texture field of ``grid`` x ``grid`` cells, its lesions, and a
    (lesion, baseline) crop in two neighbouring cells per lesion."""
    scale = size / _REFERENCE_SIZE
    gap = max(4, size // 8)
    cell = size + gap
    side = grid * cell
    beta = float(rng.uniform(*BETA_RANGE))
    density = float(rng.uniform(0.1, 0.9))  # mean glandular fraction
    density_logit = math.log(density / (1.0 - density))

    texture = power_law_field(rng, (side, side), beta)
    lesion_layer = np.zeros((side, side), np.float32)
    lines = _curvilinear_structures(rng, side)

    contrast = 1.0 - 0.5 * difficulty
    noise_sd = 0.01 + 0.025 * difficulty
    gain = rng.uniform(0.9, 1.1)
    offset = rng.uniform(-0.03, 0.03)
    mtf_sigma = 0.5 * max(scale, 0.5)
    line_sigma = 0.35 * max(scale, 0.5)
    margin = int(math.ceil(4 * math.hypot(mtf_sigma, line_sigma))) + 1

    cells = _pick_cell_pairs(rng, len(labels), grid)
    crops = []
    for lab, (lesion_cell, baseline_cell) in zip(labels, cells, strict=True):
        r0, c0 = _cell_origin(rng, lesion_cell, cell, gap)
        suspicion = _draw_suspicion(rng, malignant=lab in (2, 4), difficulty=difficulty)
        if lab in (1, 2):
            lesion = _render_mass(rng, size, scale, suspicion, contrast, difficulty)
        else:
            lesion = _render_calcification(rng, size, scale, suspicion, contrast, difficulty)
        lesion_layer[r0:r0 + size, c0:c0 + size] += lesion.attenuation
        lines += [(rows + r0, cols + c0, peaks) for rows, cols, peaks in lesion.lines]
        info = _LesionInfo(lesion.size, suspicion, lesion.morphology, lesion.n_specks)
        crops.append(((r0, c0), _cell_origin(rng, baseline_cell, cell, gap), info))

    line_layer = _trace((side, side), lines)
    max_value = 2**bits - 1
    dtype = np.uint8 if bits <= 8 else np.uint16

    def image(r0, c0):
        lo_r, lo_c = max(0, r0 - margin), max(0, c0 - margin)
        window = (slice(lo_r, r0 + size + margin), slice(lo_c, c0 + size + margin))
        # Glandular fraction through a gentle logistic, so the texture stays close to linear
        # in the power-law field (and keeps its spectrum) while bounded to [0, 1].
        glandular = 1.0 / (1.0 + np.exp(-(1.1 * texture[window] + density_logit)))
        # Dense tissue masks what lies in it: a lesion shows less over glandular tissue.
        tissue = glandular + lesion_layer[window] * (1.0 - 0.4 * glandular)
        t = ndimage.gaussian_filter(tissue, mtf_sigma)
        t += _line_image(line_layer[window], math.hypot(mtf_sigma, line_sigma))
        t = t[r0 - lo_r:r0 - lo_r + size, c0 - lo_c:c0 - lo_c + size]
        t = t + rng.normal(0.0, noise_sd, t.shape)
        # Film / detector response: fat near the bottom of the range, dense tissue and
        # calcium near the top, a little headroom left as in a digitised film.
        value = gain * (0.12 + 0.62 * t) + offset
        return np.clip(np.rint(value * max_value), 0, max_value).astype(dtype)

    patches = [(image(*lo), image(*bo), info) for lo, bo, info in crops]
    birads = int(np.digitize(density, [0.3, 0.5, 0.7])) + 1
    return _Breast(beta, birads, patches)


def _line_image(traced, sigma):
    """Lines of Gaussian cross-section ``sigma`` whose crest is the traced peak value."""
    return ndimage.gaussian_filter(traced, sigma) * (math.sqrt(2 * np.pi) * sigma)


def _pick_cell_pairs(rng, n, grid) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``n`` disjoint pairs of neighbouring grid cells: (lesion cell, baseline cell)."""
    candidates = [((i, j), (i, j + 1)) for i in range(grid) for j in range(grid - 1)]
    candidates += [((i, j), (i + 1, j)) for i in range(grid - 1) for j in range(grid)]
    while True:  # a greedy pass can strand cells; it then simply draws again
        used, pairs = set(), []
        for k in rng.permutation(len(candidates)):
            a, b = candidates[k]
            if a in used or b in used:
                continue
            used.update((a, b))
            pairs.append((a, b) if rng.random() < 0.5 else (b, a))
            if len(pairs) == n:
                return pairs


def _cell_origin(rng, cell_index, cell, gap) -> tuple[int, int]:
    """Top-left corner of a patch inside its cell, jittered within the gap."""
    i, j = cell_index
    return (i * cell + int(rng.integers(0, gap + 1)), j * cell + int(rng.integers(0, gap + 1)))


def _draw_suspicion(rng, malignant: bool, difficulty: float) -> float:
    """The latent morphology score: benign near 0, malignant near 1, overlapping with difficulty."""
    separation = 0.8 - 0.6 * difficulty
    spread = 0.07 + 0.2 * difficulty
    centre = 0.5 + (separation / 2 if malignant else -separation / 2)
    return float(np.clip(rng.normal(centre, spread), 0.0, 1.0))


def _curvilinear_structures(rng, side) -> list:
    """Faint ducts, vessels and ligaments running roughly towards the nipple, as a list of
    traced lines (rows, cols, peaks) for ``_trace``."""
    heading = rng.uniform(0, np.pi)
    lines = []
    for _ in range(int(rng.integers(6, 14))):
        n_steps = int(rng.uniform(0.4, 1.0) * side / _SPLAT_STEP)
        # A slow random walk of the heading: gently curving, never kinked.
        angle = heading + rng.normal(0, 0.35) + np.cumsum(rng.normal(0, 0.015, n_steps))
        start = rng.uniform(0, side, 2)
        rows = start[0] + _SPLAT_STEP * np.cumsum(np.sin(angle))
        cols = start[1] + _SPLAT_STEP * np.cumsum(np.cos(angle))
        lines.append((rows, cols, np.full(n_steps, rng.uniform(0.03, 0.08))))
    return lines


def _trace(shape, lines) -> np.ndarray:
    """Rasterise lines given as points ``_SPLAT_STEP`` apart, each spread bilinearly over
    its four pixels; ``_line_image`` then blurs them into lines whose crest is ``peaks``."""
    h, w = shape
    rows = np.concatenate([line[0] for line in lines])
    cols = np.concatenate([line[1] for line in lines])
    weights = np.concatenate([line[2] for line in lines]) * _SPLAT_STEP
    inside = (rows >= 0) & (rows < h - 1) & (cols >= 0) & (cols < w - 1)
    rows, cols, weights = rows[inside], cols[inside], weights[inside]
    r0, c0 = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
    fr, fc = rows - r0, cols - c0
    index = r0 * w + c0
    traced = np.bincount(
        np.concatenate([index, index + 1, index + w, index + w + 1]),
        weights=np.concatenate([weights * (1 - fr) * (1 - fc), weights * (1 - fr) * fc,
                                weights * fr * (1 - fc), weights * fr * fc]),
        minlength=h * w,
    )
    return traced.reshape(h, w).astype(np.float32)


# --------------------------------------------------------------------------- masses


def _render_mass(rng, size, scale, suspicion, contrast, difficulty) -> _Lesion:
    """A mass: an ellipsoidal density whose margin grows lobulated, blurred and spiculated
    with ``suspicion`` (BI-RADS shape: oval/round -> lobulated -> irregular; margin:
    circumscribed -> indistinct -> spiculated)."""
    m = suspicion
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = (size - 1) / 2 + rng.uniform(-0.05, 0.05, 2) * size
    radius = rng.uniform(0.09, 0.2) * size
    elongation = rng.uniform(1.0, 1.5)
    tilt = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    r = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)

    # Boundary radius as a function of angle: an ellipse, then low-order lobes, then the
    # high-order jaggedness of an infiltrating margin.
    boundary = radius / np.sqrt((np.cos(theta - tilt) / math.sqrt(elongation)) ** 2
                                + (np.sin(theta - tilt) * math.sqrt(elongation)) ** 2)
    lobulation = _ramp(m, 0.15, 0.6) * rng.uniform(0.5, 1.0)
    irregularity = _ramp(m, 0.4, 0.9) * rng.uniform(0.6, 1.0)
    # Summed on a fine ring of angles and looked up per pixel: far cheaper than 14 cosines
    # per pixel on large patches.
    ring = np.linspace(-np.pi, np.pi, 1025)
    modulation = np.ones_like(ring)
    for k in range(3, 6):
        modulation += 0.1 * lobulation * rng.uniform(0.3, 1.0) * np.cos(k * ring + rng.uniform(0, 2 * np.pi))
    for k in range(6, 17):
        modulation += 0.07 * irregularity * rng.uniform(0.2, 1.0) * np.cos(k * ring + rng.uniform(0, 2 * np.pi))
    boundary = boundary * np.interp(theta, ring, modulation).astype(np.float32)

    margin_width = (0.35 + 2.2 * _ramp(m, 0.3, 0.85) * rng.uniform(0.6, 1.0)) * max(scale, 0.5)
    u = r / boundary
    dome = np.sqrt(np.clip(1.0 - u**2, 0.0, 1.0))
    edge = _sigmoid((boundary - r) / margin_width)
    # High density is itself a (weak) BI-RADS sign of malignancy.
    amplitude = contrast * rng.uniform(0.3, 0.45) * (1.0 + 0.15 * (m - 0.5))
    attenuation = amplitude * (0.45 + 0.55 * dome) * edge

    lines = []
    n_spicules = int(rng.poisson(18 * _ramp(m, 0.4, 0.9)))
    for _ in range(n_spicules):
        lines.append(_spicule(rng, size, cy, cx, radius, elongation, tilt, amplitude))

    morphology = _mass_descriptor(m, elongation, n_spicules)
    lesion = _Lesion(attenuation.astype(np.float32), lines, 2.0 * radius, morphology)
    # Coarse or fine calcifications inside a mass occur; they blur mass vs calcification.
    if rng.random() < 0.03 + 0.12 * difficulty:
        specks = int(rng.integers(1, 3)) if m < 0.5 else int(rng.integers(2, 6))
        lesion.n_specks = _add_specks_near(rng, lesion.attenuation, cy, cx, 0.6 * radius, specks,
                                           scale, contrast, fine=m >= 0.5)
    return lesion


def _spicule(rng, size, cy, cx, radius, elongation, tilt, amplitude):
    """A radiating, tapering line from inside the margin outwards, as (rows, cols, peaks)."""
    angle = rng.uniform(0, 2 * np.pi)
    base = radius / math.sqrt((math.cos(angle - tilt) / math.sqrt(elongation)) ** 2
                              + (math.sin(angle - tilt) * math.sqrt(elongation)) ** 2)
    start = 0.85 * base
    room = 0.5 * size - 2.0 - math.hypot(cy - (size - 1) / 2, cx - (size - 1) / 2)
    length = min(rng.uniform(0.5, 2.2) * radius, max(room - start, 1.0))
    # A slight deviation from the radial direction, so spicules do not all meet at one point.
    direction = angle + rng.normal(0, 0.08)
    t = np.arange(0.0, length, _SPLAT_STEP)
    rows = cy + start * math.sin(angle) + t * math.sin(direction)
    cols = cx + start * math.cos(angle) + t * math.cos(direction)
    taper = 1.0 - t / length
    return rows, cols, amplitude * rng.uniform(0.4, 0.9) * taper


def _mass_descriptor(m, elongation, n_spicules) -> str:
    shape = "irregular" if m > 0.6 else "lobulated" if m > 0.35 else "oval" if elongation > 1.2 else "round"
    if n_spicules >= 3:
        margin = "spiculated"
    elif m > 0.55:
        margin = "ill-defined"
    elif m > 0.35:
        margin = "microlobulated"
    else:
        margin = "circumscribed"
    return f"mass {shape} {margin}"


# --------------------------------------------------------------------------- calcifications


def _render_calcification(rng, size, scale, suspicion, contrast, difficulty) -> _Lesion:
    """A calcification finding whose BI-RADS morphology and distribution follow ``suspicion``.

    Low: few coarse specks (round, rim / eggshell, popcorn), scattered. Middle: amorphous,
    tiny faint specks in a loose cluster. High: many fine pleomorphic specks in a tight
    cluster, often along linear / branching ductal paths.
    """
    m = suspicion
    layer = np.zeros((size, size), np.float32)
    centre = (size - 1) / 2 + rng.uniform(-0.05, 0.05, 2) * size
    px = max(scale, 0.5)  # speck sizes are in 64-px units
    if m < 0.4:
        kind = rng.choice(["round", "rim", "popcorn"], p=[0.55, 0.2, 0.25])
        count = int(rng.integers(1, 5)) if kind != "round" else int(rng.integers(2, 7))
        spots = centre + rng.normal(0, rng.uniform(0.12, 0.22) * size, (count, 2))
        for y, x in _inside(spots, size, 4 * px):
            r = rng.uniform(1.3, 2.6) * px
            amp = contrast * rng.uniform(0.6, 0.95)
            if kind == "rim":
                _disc(layer, y, x, r * 1.3, r * 1.3, 0.0, amp)
                _disc(layer, y, x, r * 0.8, r * 0.8, 0.0, -0.7 * amp)
            elif kind == "popcorn":
                for dy, dx in rng.normal(0, 0.8 * r, (int(rng.integers(3, 6)), 2)):
                    _disc(layer, y + dy, x + dx, 0.8 * r, 0.8 * r, 0.0, amp)
            else:
                _disc(layer, y, x, r, r * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi), amp)
        descriptor = {"round": "calcification round scattered", "rim": "calcification rim scattered",
                      "popcorn": "calcification coarse popcorn"}[str(kind)]
    elif m < 0.6:
        count = int(rng.integers(5, 16))
        spots = centre + rng.normal(0, rng.uniform(0.08, 0.14) * size, (count, 2))
        for y, x in _inside(spots, size, 3 * px):
            r = rng.uniform(0.5, 0.9) * px
            _disc(layer, y, x, r, r, 0.0, contrast * rng.uniform(0.45, 0.8))
        descriptor = "calcification amorphous clustered"
    else:
        count = int(np.clip(rng.normal(6 + 20 * m, 4), 6, 32))
        linear = rng.random() < _ramp(m, 0.6, 1.0) * 0.8
        if linear:
            spots, headings = _branching_path(rng, centre, count, size)
        else:
            spots = centre + rng.normal(0, rng.uniform(0.08, 0.13) * size, (count, 2))
            headings = rng.uniform(0, np.pi, count)
        keep = _inside_mask(spots, size, 3 * px)
        for (y, x), heading in zip(spots[keep], headings[keep], strict=True):
            # Pleomorphic: specks differ in size, elongation and density, and some are
            # broken into two fragments along their duct.
            r = rng.uniform(0.35, 0.8) * px
            stretch = math.sqrt(rng.uniform(1.0, 3.0 if linear else 1.8))
            amp = contrast * rng.uniform(0.6, 1.2)
            _disc(layer, y, x, r * stretch, r / stretch, heading, amp)
            if rng.random() < 0.35:
                shift = (r * stretch + 0.9 * px) * rng.choice([-1.0, 1.0])
                _disc(layer, y + shift * math.sin(heading), x + shift * math.cos(heading),
                      0.7 * r * stretch, 0.7 * r / stretch, heading, amp)
        descriptor = ("calcification fine-linear branching" if linear
                      else "calcification fine pleomorphic clustered")
    specks = _inside(spots, size, 3 * px)
    extent = 2.0 * np.max(np.hypot(*(specks - specks.mean(0)).T)) + 4 * px if len(specks) else 0.0
    # A faint density under a cluster (focal asymmetry) blurs calcification vs mass.
    if rng.random() < 0.03 + 0.12 * difficulty:
        yy, xx = np.mgrid[0:size, 0:size]
        width = rng.uniform(0.1, 0.18) * size
        glow = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * width**2))
        layer += (contrast * rng.uniform(0.06, 0.14) * glow).astype(np.float32)
    return _Lesion(layer, [], float(extent), descriptor, len(specks))


def _branching_path(rng, centre, count, size):
    """Speck positions along a small duct tree (a trunk and 1-3 side branches), with the
    heading of the duct at each speck: casts of calcified ductal carcinoma in situ."""
    heading = rng.uniform(0, np.pi)
    length = rng.uniform(0.25, 0.4) * size
    trunk_start = centre - 0.5 * length * np.array([np.sin(heading), np.cos(heading)])
    segments = [(trunk_start, heading, length)]
    for _ in range(int(rng.integers(1, 4))):
        start, angle, seg_length = segments[0]
        fork = start + rng.uniform(0.2, 0.8) * seg_length * np.array([np.sin(angle), np.cos(angle)])
        segments.append((fork, angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.9),
                         rng.uniform(0.1, 0.2) * size))
    lengths = np.array([seg[2] for seg in segments])
    which = rng.choice(len(segments), size=count, p=lengths / lengths.sum())
    spots, headings = [], []
    for k in which:
        start, angle, seg_length = segments[k]
        along = np.array([np.sin(angle), np.cos(angle)])
        across = np.array([along[1], -along[0]])
        spots.append(start + rng.uniform(0, seg_length) * along + rng.normal(0, 0.008 * size) * across)
        headings.append(angle)
    return np.array(spots), np.array(headings)


def _add_specks_near(rng, layer, cy, cx, spread, count, scale, contrast, fine) -> int:
    px = max(scale, 0.5)
    spots = np.array([cy, cx]) + rng.normal(0, spread, (count, 2))
    spots = _inside(spots, layer.shape[0], 3 * px)
    for y, x in spots:
        r = (rng.uniform(0.5, 0.9) if fine else rng.uniform(1.2, 2.0)) * px
        _disc(layer, y, x, r, r, 0.0, contrast * rng.uniform(0.5, 0.9))
    return len(spots)


def _inside_mask(spots, size, border) -> np.ndarray:
    spots = np.asarray(spots, dtype=float).reshape(-1, 2)
    return np.all((spots >= border) & (spots <= size - 1 - border), axis=1)


def _inside(spots, size, border) -> np.ndarray:
    """The speck positions that lie at least ``border`` px inside the patch."""
    spots = np.asarray(spots, dtype=float).reshape(-1, 2)
    return spots[_inside_mask(spots, size, border)]


def _disc(layer, cy, cx, ry, rx, angle, amplitude, softness=0.35) -> None:
    """Add a soft-edged ellipse (semi-axes ``ry`` along ``angle`` and ``rx`` across it)."""
    reach = max(ry, rx) + 3.0
    r0, r1 = max(0, int(cy - reach)), min(layer.shape[0], int(cy + reach) + 2)
    c0, c1 = max(0, int(cx - reach)), min(layer.shape[1], int(cx + reach) + 2)
    if r0 >= r1 or c0 >= c1:
        return
    yy, xx = np.mgrid[r0:r1, c0:c1]
    dy, dx = yy - cy, xx - cx
    along = dy * math.sin(angle) + dx * math.cos(angle)
    across = -dy * math.cos(angle) + dx * math.sin(angle)
    rho = np.hypot(along / ry, across / rx)
    mean_r = math.sqrt(ry * rx)
    layer[r0:r1, c0:c1] += (amplitude * _sigmoid((1.0 - rho) * mean_r / softness)).astype(layer.dtype)


# --------------------------------------------------------------------------- helpers


def _ramp(value, low, high) -> float:
    """0 below ``low``, 1 above ``high``, a smoothstep between."""
    t = min(max((value - low) / (high - low), 0.0), 1.0)
    return t * t * (3 - 2 * t)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))
