"""Image-folder importer: ready-cut patches in class sub-folders to dataset.npz.

Layout (``DIR`` is the argument)::

    DIR/baseline/...                 DIR/train/baseline/...
    DIR/mass_benign/...         or   DIR/train/mass_benign/...
    DIR/mass_malignant/...           DIR/test/...
    DIR/calcification_benign/...
    DIR/calcification_malignant/...

Class folders are named by the five labels (case, ``_``, ``-`` and spaces do not matter;
``calc`` for ``calcification`` and the digits ``0``-``4`` work too); files may sit at any
depth below them. Images: PNG, JPEG, TIFF (8 or 16 bit, or float, see
``to_canonical_dtype``) and DICOM (``.dcm`` or any file with the DICOM preamble).

Optional CSVs (paths relative to DIR, ``/`` separated):

- ``--pairs pairs.csv`` with columns ``lesion,baseline`` (and optionally ``patient``): the
  baseline file that goes with each lesion file;
- ``--patients patients.csv`` with columns ``file,patient``: the patient of each file.

Without either, ``--patient-pattern REGEX`` takes the patient id from each file's relative
path (the first group, or the whole match), and failing that each lesion, with its baseline,
is its own patient (said in the summary: if one woman has several files, give ids).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import click
import numpy as np

from automammo import hookimpl
from automammo.dataset import check_out_path
from automammo.dicom import is_dicom_file, read_dicom
from automammo.errors import DataError
from automammo.importers import Importer
from automammo.patches import PatchCollector, resize_patch, to_canonical_dtype

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"}

CLASS_NAMES = {
    "baseline": 0,
    "mass benign": 1,
    "mass malignant": 2,
    "calcification benign": 3,
    "calcification malignant": 4,
    "calc benign": 3,
    "calc malignant": 4,
}
SPLIT_NAMES = ("train", "test")


def class_label(folder: str) -> int | None:
    """Label 0-4 of a class folder name, None when it is not one."""
    name = re.sub(r"[\s_\-]+", " ", folder.strip().lower())
    if name in CLASS_NAMES:
        return CLASS_NAMES[name]
    m = re.fullmatch(r"([0-4])(?: (.*))?", name)
    if m and (m.group(2) is None or CLASS_NAMES.get(m.group(2)) == int(m.group(1))):
        return int(m.group(1))  # "0", "1_mass_benign", ...
    return None


def _is_image(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    return path.suffix == "" and is_dicom_file(path)


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """Read one grayscale image as uint8/uint16.

    Returns:
        ``(pixels, converted)``: converted is True when a colour image was turned to gray.

    Raises:
        DataError: unreadable, multi-page, or with values no lossless rule covers; the
            message names the file.
    """
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom") or is_dicom_file(path):
        return read_dicom(path).pixels, False
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                raise DataError(f"{path}: {img.n_frames} pages/frames; one image per file, please")
            img.load()
            mode = img.mode
            converted = False
            if mode in ("1",):
                raise DataError(f"{path}: a 1-bit (mask) image, expected grayscale")
            if mode in ("P", "PA"):
                img = img.convert("RGBA" if mode == "PA" else "RGB")
                mode = img.mode
            if mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                arr = np.asarray(img.convert("RGB") if mode != "LA" else img)
                if mode == "LA":
                    arr = arr[..., 0]
                elif np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
                    arr = arr[..., 0]  # a gray image saved as RGB: nothing lost
                else:
                    arr = np.asarray(img.convert("L"))  # ITU-R 601 luma
                    converted = True
            else:
                arr = np.asarray(img)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: image of shape {arr.shape}, expected 2-D grayscale")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return to_canonical_dtype(arr, str(path)), converted


def scan(directory: Path) -> list[tuple[str, int, str | None]]:
    """``(relative path, label, split or None)`` of every image below the class folders.

    Raises:
        DataError: no class folder, or a folder holding images whose name is not a class.
    """
    subdirs = {p.name.lower(): p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")}
    roots: list[tuple[Path, str | None]]
    split_dirs = [s for s in SPLIT_NAMES if s in subdirs]
    class_dirs = [p.name for p in subdirs.values() if class_label(p.name) is not None]
    if split_dirs and class_dirs:
        raise DataError(
            f"{directory}: mixes split folders ({', '.join(split_dirs)}) with class folders "
            f"({', '.join(sorted(class_dirs))}); put the class folders under train/ and test/"
        )
    roots = [(subdirs[s], s) for s in split_dirs] if split_dirs else [(directory, None)]
    found = []
    for root, split in roots:
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            label = class_label(folder.name)
            images = sorted(p for p in folder.rglob("*") if p.is_file() and _is_image(p))
            if label is None:
                if images:
                    raise DataError(
                        f"{folder}: holds images but is not a class folder; name it one of "
                        f"baseline, mass_benign, mass_malignant, calcification_benign, "
                        f"calcification_malignant (or 0-4)"
                    )
                continue
            for p in images:
                found.append((p.relative_to(directory).as_posix(), label, split))
    if not found:
        raise DataError(
            f"{directory}: no images in class folders (expected sub-folders baseline, mass_benign, "
            f"mass_malignant, calcification_benign, calcification_malignant, optionally under train/ and test/)"
        )
    return found


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            rows = [(reader.line_num, {k.strip().lower(): (v or "").strip() for k, v in row.items() if k})
                    for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({type(exc).__name__}: {exc})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(header) or 'no header'})")
    return rows


def _rel(value: str) -> str:
    value = value.strip().replace("\\", "/")
    while value.startswith("./"):
        value = value[2:]
    return value


def import_folder(
    directory: str | os.PathLike,
    out: str | os.PathLike,
    size: int | None = None,
    pairs: str | os.PathLike | None = None,
    patients: str | os.PathLike | None = None,
    patient_pattern: str | None = None,
    test_fraction: float = 0.0,
    seed: int = 0,
    skip_unreadable: bool = False,
    echo=print,
):
    """Import a folder of patches into ``out``; see the module docstring.

    Args:
        directory: the folder with class sub-folders (optionally under train/ and test/).
        out: the dataset file to write (atomically).
        size: resize every patch to this square size; without it all must share one size.
        pairs: CSV ``lesion,baseline[,patient]``.
        patients: CSV ``file,patient``.
        patient_pattern: regular expression giving the patient id from a relative path.
        test_fraction: hold out this share of the patients as test (no train/test folders).
        seed: seed of that hold-out.
        skip_unreadable: count unreadable files instead of stopping at the first.
        echo: where the summary goes.

    Returns:
        The written ``Dataset``.
    """
    directory, out = Path(directory), check_out_path(out)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    entries = scan(directory)
    label_of = {rel: label for rel, label, _ in entries}
    split_of = {rel: split for rel, _, split in entries}
    has_split_folders = any(s is not None for _, _, s in entries)
    if test_fraction and has_split_folders:
        raise DataError(f"{directory}: has train/ and test/ folders; --test-fraction would override them")
    c = PatchCollector()

    # Pairs first: they decide which files are baselines of which lesions.
    partner: dict[str, str] = {}
    pair_patient: dict[str, str] = {}
    if pairs is not None:
        pairs = Path(pairs)
        for line, row in _read_csv(pairs, ("lesion", "baseline")):
            lesion, base = _rel(row["lesion"]), _rel(row["baseline"])
            where = f"{pairs} line {line}"
            for column, rel in (("lesion", lesion), ("baseline", base)):
                if not rel:
                    raise DataError(f"{where}: no {column} on this row")
                if rel not in label_of:
                    raise DataError(f"{where}: {rel!r} is not an image in a class folder of {directory}")
            if label_of[lesion] == 0:
                raise DataError(f"{where}: {lesion!r} is in the baseline folder, expected a lesion")
            if label_of[base] != 0:
                raise DataError(f"{where}: {base!r} is not in the baseline folder")
            for rel in (lesion, base):
                if rel in partner:
                    raise DataError(f"{where}: {rel!r} is already paired with {partner[rel]!r}")
            if split_of[lesion] != split_of[base]:
                raise DataError(f"{where}: {lesion!r} and {base!r} are in different splits")
            partner[lesion], partner[base] = base, lesion
            if row.get("patient"):
                pair_patient[lesion] = pair_patient[base] = row["patient"]

    patient_of: dict[str, str] = {}
    if patients is not None:
        patients = Path(patients)
        for line, row in _read_csv(patients, ("file", "patient")):
            rel = _rel(row["file"])
            if rel not in label_of:
                raise DataError(f"{patients} line {line}: {rel!r} is not an image in a class folder of {directory}")
            if not row["patient"]:
                raise DataError(f"{patients} line {line}: empty patient id")
            patient_of[rel] = row["patient"]
    pattern = re.compile(patient_pattern) if patient_pattern else None

    def patient(rel: str) -> str:
        if rel in patient_of:
            return patient_of[rel]
        if rel in pair_patient:
            return pair_patient[rel]
        if pattern is not None:
            m = pattern.search(rel)
            if m is None:
                raise DataError(f"{directory / rel}: --patient-pattern {pattern.pattern!r} does not match {rel!r}")
            return m.group(1) if m.groups() else m.group(0)
        if patients is not None:
            raise DataError(f"{patients}: no patient for {rel!r}")
        anchor = rel if label_of[rel] else partner.get(rel, rel)
        return f"file:{anchor}"  # each lesion (with its baseline) its own patient

    if patients is None and pattern is None and not pair_patient:
        c.note("lesions without a patient id (no --pairs, --patients or --patient-pattern): each is its own "
               "patient, with its baseline if paired", sum(1 for _, label, _ in entries if label))

    # Read every image; sizes are checked before anything is resized or written.
    pixels: dict[str, np.ndarray] = {}
    first_shape: tuple[tuple[int, int], str] | None = None
    for rel, _, _ in entries:
        try:
            arr, converted = read_image(directory / rel)
        except DataError as exc:
            if not skip_unreadable:
                raise
            c.skip("unreadable image", example=str(exc))
            continue
        if converted:
            c.note("colour images converted to gray")
        if size is None:
            if first_shape is None:
                first_shape = (arr.shape, rel)
            elif arr.shape != first_shape[0]:
                raise DataError(
                    f"{directory / rel}: {arr.shape[0]}x{arr.shape[1]} px, but "
                    f"{directory / first_shape[1]} is {first_shape[0][0]}x{first_shape[0][1]}; images of "
                    f"mixed sizes need --size N to resize them all to N x N"
                )
        else:
            if arr.shape[0] != arr.shape[1]:
                # Cut the central square rather than stretch: stretching would change a
                # lesion's shape and margin, which is what the classifier should read.
                side = min(arr.shape)
                top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
                arr = arr[top : top + side, left : left + side]
                c.note("non-square images cut to their central square")
            arr = resize_patch(arr, size)
        if min(arr.shape) < 8:
            raise DataError(f"{directory / rel}: {arr.shape[0]}x{arr.shape[1]} px is too small (at least 8x8)")
        pixels[rel] = arr

    done: set[str] = set()
    for rel, label, split in entries:
        if rel in done or rel not in pixels:
            continue
        split = split or "train"
        meta = {"source": "image-folder", "image": rel}
        other = partner.get(rel)
        if other is not None and other in pixels:
            lesion, base = (rel, other) if label else (other, rel)
            p_l, p_b = patient(lesion), patient(base)
            if p_l != p_b:
                raise DataError(f"{pairs}: lesion {lesion!r} (patient {p_l!r}) and its baseline {base!r} "
                                f"(patient {p_b!r}) belong to different patients")
            c.add_pair(pixels[lesion], pixels[base], label_of[lesion], p_l, split,
                       {"source": "image-folder", "image": lesion}, {"source": "image-folder", "image": base})
            done.update((lesion, base))
        else:
            if other is not None:
                c.note("partner unreadable: imported without pair")
            c.add_single(pixels[rel], label, patient(rel), split, meta)
            done.add(rel)
    return c.finish(out, echo, test_fraction, seed)


@click.command("import-folder")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size", default=None, type=click.IntRange(8, 4096),
              help="Resize every patch to SIZE x SIZE (required when sizes differ).")
@click.option("--pairs", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="CSV with columns lesion,baseline[,patient]: each lesion's baseline file.")
@click.option("--patients", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="CSV with columns file,patient.")
@click.option("--patient-pattern", default=None,
              help=r"Regular expression taking the patient id from a file's relative path, e.g. 'P_\d+'.")
@click.option("--test-fraction", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Hold out this share of the patients as test (when there are no train/test folders).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the test hold-out.")
@click.option("--skip-unreadable", is_flag=True, help="Count unreadable files instead of stopping.")
def command(directory, out, size, pairs, patients, patient_pattern, test_fraction, seed, skip_unreadable):
    """Patches in class sub-folders (PNG/JPEG/TIFF/DICOM) into OUT.npz.

    Sub-folders baseline, mass_benign, mass_malignant, calcification_benign,
    calcification_malignant, optionally under train/ and test/.
    """
    if patient_pattern is not None:
        try:
            re.compile(patient_pattern)
        except re.error as exc:
            raise click.BadParameter(f"not a regular expression: {exc}", param_hint="--patient-pattern")
    import_folder(directory, out, size=size, pairs=pairs, patients=patients, patient_pattern=patient_pattern,
                  test_fraction=test_fraction, seed=seed, skip_unreadable=skip_unreadable, echo=click.echo)


@hookimpl
def automammo_register_importers():
    return [
        Importer(
            name="import-folder",
            description="PNG/JPEG/TIFF/DICOM patches in class sub-folders, optional baseline pairs CSV",
            command=command,
        )
    ]
