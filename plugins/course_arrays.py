"""Course-arrays importer: the CBIS-DDSM course's NumPy arrays to dataset.npz.

The course hands out an images array (N, H, W) or (N, H, W, 1) and a labels array of 0-4,
in pairs: the baseline (label 0) at even index 2i and its lesion (label 1-4) at 2i + 1.
There are no patient ids, so each pair is its own patient unless ``--patients`` says
otherwise, and the split is whatever the file is (``--split``), or a patient-grouped hold-out
(``--test-fraction``), or, with ``--test``, the course's own test arrays.

Pixel values are converted only losslessly or by a fixed, documented scale (see
``automammo.patches.to_canonical_dtype``): floats in [0, 1] become uint16, floats in
[0, 255] become uint8 when whole and uint16 (x 257) otherwise, NaN / Inf are refused.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import click
import numpy as np

from automammo import hookimpl
from automammo.errors import DataError
from automammo.importers import Importer
from automammo.patches import PatchCollector, to_canonical_dtype

IMAGE_KEYS = ("x", "images", "image", "X", "imgs", "data", "tensor")
LABEL_KEYS = ("label", "labels", "y", "Y", "target", "targets")
PATIENT_KEYS = ("patient", "patients", "patient_id", "patient_ids")


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path}: not a plain {what} array ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable {what} file ({type(exc).__name__}: {exc})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
        raise DataError(f"{path}: is an .npz archive; give it alone as the first argument")
    return arr


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Images, labels and (if present) patients from one .npz archive."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable .npz ({type(exc).__name__}: {exc})") from None

    def pick(keys):
        return next((arrays[k] for k in keys if k in arrays), None)

    images, labels, patients = pick(IMAGE_KEYS), pick(LABEL_KEYS), pick(PATIENT_KEYS)
    if images is None or labels is None:
        # Two unnamed arrays (savez(x, y) writes arr_0, arr_1): the one with pixels is x.
        rest = [a for k, a in arrays.items() if k not in PATIENT_KEYS]
        if len(rest) == 2:
            rest.sort(key=lambda a: a.ndim)
            labels, images = rest
        else:
            raise DataError(
                f"{path}: cannot tell images from labels among arrays {sorted(arrays)}; "
                f"name them x and label"
            )
    return images, labels, patients


def _labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    elif labels.ndim == 2 and labels.shape[1] == 5:
        # One-hot, as a Keras notebook might have saved it.
        rows = labels.sum(axis=1)
        if not (np.all(np.isin(labels, (0, 1))) and np.all(rows == 1)):
            raise DataError(f"{where}: labels of shape {labels.shape} are not one-hot over the 5 classes")
        labels = labels.argmax(axis=1)
    if labels.ndim != 1:
        raise DataError(f"{where}: labels must have shape (N,), got {labels.shape}")
    if len(labels) != n:
        raise DataError(f"{where}: {len(labels)} labels for {n} images")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise DataError(f"{where}: labels must be whole numbers 0-4")
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers 0-4, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels > 4))
    if bad.size:
        raise DataError(f"{where}: label {labels[bad[0]]} at index {bad[0]} is outside 0-4 ({bad.size} bad in all)")
    return labels


def _images(images: np.ndarray, where: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise DataError(f"{where}: images must have shape (N, H, W) or (N, H, W, 1), got {images.shape}")
    if images.shape[0] == 0:
        raise DataError(f"{where}: holds no images")
    return to_canonical_dtype(images, where)


def check_pairs(labels: np.ndarray, where: str) -> None:
    """The course's order: baseline (0) at every even index, a lesion (1-4) at every odd one."""
    if len(labels) % 2:
        raise DataError(
            f"{where}: {len(labels)} images is an odd number, but the course format stores pairs "
            f"(baseline at 2i, lesion at 2i+1); use --unpaired for a file without pairs"
        )
    even_bad = np.flatnonzero(labels[0::2] != 0) * 2
    odd_bad = np.flatnonzero(labels[1::2] == 0) * 2 + 1
    bad = np.sort(np.concatenate([even_bad, odd_bad]))
    if bad.size:
        i = int(bad[0])
        expected = "0 (baseline)" if i % 2 == 0 else "1-4 (a lesion)"
        raise DataError(
            f"{where}: not in the course's pair order (baseline at even index 2i, its lesion at "
            f"2i+1): index {i} has label {labels[i]}, expected {expected}; {bad.size} misplaced "
            f"in all (use --unpaired to import without pairs)"
        )


def _patients(patients: np.ndarray | None, n: int, paired: bool, prefix: str, where: str) -> np.ndarray:
    if patients is None:
        # No ids in the course format: each pair (or image) is its own patient, which is
        # the only assumption that cannot put one lesion on both sides of a split.
        ids = np.arange(n) // 2 if paired else np.arange(n)
        return np.array([f"{prefix}{'pair' if paired else 'image'}-{i:06d}" for i in ids])
    patients = np.asarray(patients)
    if patients.ndim == 2 and patients.shape[1] == 1:
        patients = patients[:, 0]
    if patients.ndim != 1:
        raise DataError(f"{where}: patient ids must have shape (N,), got {patients.shape}")
    if patients.dtype.kind == "f" and np.all(np.isfinite(patients)) and np.all(patients == np.round(patients)):
        patients = patients.astype(np.int64)
    patients = patients.astype(str)
    if paired and len(patients) == n // 2 and len(patients) != n:
        patients = np.repeat(patients, 2)
    if len(patients) != n:
        per_pair = f" or {n // 2} (one per pair)" if paired else ""
        raise DataError(f"{where}: {len(patients)} patient ids, expected {n} (one per image){per_pair}")
    if np.any(np.char.strip(patients) == ""):
        raise DataError(f"{where}: empty patient id at index {int(np.flatnonzero(np.char.strip(patients) == '')[0])}")
    if paired:
        bad = np.flatnonzero(patients[0::2] != patients[1::2])
        if bad.size:
            i = int(bad[0]) * 2
            raise DataError(
                f"{where}: the pair at index {i}, {i + 1} has two patient ids "
                f"({str(patients[i])!r}, {str(patients[i + 1])!r}); a baseline comes from its lesion's patient"
            )
    return patients


def import_arrays(
    inputs: list[str | os.PathLike],
    out: str | os.PathLike,
    patients: str | os.PathLike | None = None,
    split: str = "train",
    test_fraction: float = 0.0,
    seed: int = 0,
    test: tuple[str, str] | None = None,
    unpaired: bool = False,
    echo=print,
):
    """Import course arrays into ``out``.

    Args:
        inputs: ``[IMAGES.npy, LABELS.npy]`` or ``[ARRAYS.npz]``.
        out: the dataset file to write (atomically).
        patients: a .npy of patient ids, one per image or one per pair.
        split: ``train`` or ``test`` for every image of ``inputs``.
        test_fraction: hold out this share of the patients as ``test`` (with split train).
        seed: seed of that hold-out.
        test: ``(IMAGES.npy, LABELS.npy)`` of the course's test set, imported as ``test``.
        unpaired: the arrays are not in pair order; import every image on its own.
        echo: where the summary goes.

    Returns:
        The written ``Dataset``.
    """
    inputs = [Path(p) for p in inputs]
    split = split.lower()
    if split not in ("train", "test"):
        raise DataError(f"--split must be train or test, got {split!r}")
    if split == "test" and test is not None:
        # Both files would be test data with the same default patient ids (test-pair-000000 ...):
        # unrelated pairs would be merged into one patient.
        raise DataError("--split test makes the first arrays test data; --test adds test arrays to training "
                        "arrays: use one or the other")
    if test_fraction and (split == "test" or test is not None):
        raise DataError("--test-fraction holds out part of a training file; it cannot be combined "
                        "with --split test or --test")
    if len(inputs) == 1 and inputs[0].suffix.lower() == ".npz":
        images, labels, file_patients = load_npz(inputs[0])
        img_where = lab_where = str(inputs[0])
    elif len(inputs) == 2:
        images, labels = _load_npy(inputs[0], "images"), _load_npy(inputs[1], "labels")
        file_patients, img_where, lab_where = None, str(inputs[0]), str(inputs[1])
    else:
        raise DataError("give IMAGES.npy LABELS.npy, or one ARRAYS.npz, before OUT.npz")
    parts = [(images, labels, img_where, lab_where, split)]
    if test is not None:
        t_img, t_lab = Path(test[0]), Path(test[1])
        parts.append((_load_npy(t_img, "images"), _load_npy(t_lab, "labels"), str(t_img), str(t_lab), "test"))

    c = PatchCollector()
    shape = None
    for k, (imgs, labs, iw, lw, part_split) in enumerate(parts):
        x = _images(imgs, iw)
        if np.issubdtype(np.asarray(imgs).dtype, np.floating):
            c.note(f"float pixels stored as {x.dtype} ({iw}; see the conversion rules in docs/data.md)", len(x))
        y = _labels(labs, len(x), lw)
        if shape is not None and x.shape[1:] != shape:
            raise DataError(f"{iw}: images of {x.shape[1]}x{x.shape[2]} px, but the training "
                            f"images are {shape[0]}x{shape[1]}")
        shape = x.shape[1:]
        if not unpaired:
            check_pairs(y, lw)
        pid_source = patients if k == 0 else None
        if pid_source is not None:
            pids = _patients(_load_npy(Path(pid_source), "patient id"), len(x), not unpaired, "", str(pid_source))
        elif k == 0 and file_patients is not None:
            pids = _patients(file_patients, len(x), not unpaired, "", iw)
        else:
            pids = _patients(None, len(x), not unpaired, f"{part_split}-", iw)
        name = Path(iw).name
        if unpaired:
            for i in range(len(x)):
                c.add_single(x[i], int(y[i]), pids[i], part_split,
                             {"source": "course-arrays", "image": name, "index": i})
        else:
            for i in range(0, len(x), 2):
                c.add_pair(x[i + 1], x[i], int(y[i + 1]), pids[i], part_split,
                           {"source": "course-arrays", "image": name, "index": i + 1},
                           {"source": "course-arrays", "image": name, "index": i})
    return c.finish(out, echo, test_fraction, seed)


@click.command("import-arrays")
@click.argument("paths", nargs=-1, required=True, metavar="IMAGES.npy LABELS.npy OUT.npz | ARRAYS.npz OUT.npz",
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--patients", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="A .npy of patient ids, one per image or one per pair [default: each pair its own patient].")
@click.option("--split", default="train", show_default=True, type=click.Choice(["train", "test"]),
              help="The split of these images.")
@click.option("--test-fraction", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Hold out this share of the patients as test (grouped, stratified).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the test hold-out.")
@click.option("--test", "test", nargs=2, default=None, type=click.Path(dir_okay=False, path_type=Path),
              metavar="IMAGES.npy LABELS.npy", help="The course's test arrays, imported as the test split.")
@click.option("--unpaired", is_flag=True, help="The arrays are not in baseline/lesion pair order.")
def command(paths, patients, split, test_fraction, seed, test, unpaired):
    """CBIS-DDSM course arrays (baseline at 2i, lesion at 2i+1) into OUT.npz.

    IMAGES: (N, H, W) or (N, H, W, 1), uint8 / uint16 / float; LABELS: 0-4. One .npz
    holding both (x and label) works too.
    """
    if len(paths) < 2:
        raise click.UsageError("give IMAGES.npy LABELS.npy OUT.npz, or ARRAYS.npz OUT.npz")
    *inputs, out = paths
    if Path(out).suffix.lower() != ".npz":
        raise click.UsageError(f"the last argument is the output and must end in .npz, got {out}")
    import_arrays(inputs, out, patients=patients, split=split, test_fraction=test_fraction, seed=seed,
                  test=test, unpaired=unpaired, echo=click.echo)


@hookimpl
def automammo_register_importers():
    return [
        Importer(
            name="import-arrays",
            description="CBIS-DDSM course arrays (.npy/.npz, baseline at 2i and lesion at 2i+1)",
            command=command,
        )
    ]
