"""CBIS-DDSM importer: the TCIA download (case-description CSVs + DICOM tree) to dataset.npz.

``automammo data import-cbis ROOT OUT.npz`` finds the four case-description CSVs
(``mass_case_description_train_set.csv``, ``mass_case_description_test_set.csv``,
``calc_case_description_train_set.csv``, ``calc_case_description_test_set.csv``) and the
DICOM files anywhere below ROOT, and writes one lesion patch and one adjacent healthy
baseline patch per abnormality.

The traps of the real download, and what is done about them:

- The CSV paths do not match the disk. The CSV says
  ``Mass-Training_P_00001_LEFT_CC/1.3.6.../1.3.6.../000000.dcm``, the NBIA retriever writes
  ``CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/<study>/<series>/1-1.dcm`` (or descriptive
  folder names with dates). Only the top series folder name is reliable, so files are
  indexed by the nearest folder whose name looks like ``Mass-Training_P_00001_LEFT_CC`` (the
  full film) or ``..._CC_1`` (the ROI series of abnormality 1); files in other layouts are
  indexed by their DICOM PatientID, which CBIS-DDSM sets to that same folder name.
- Cropped image and ROI mask are sometimes swapped (in the CSV and in the file order of a
  series). The mask is told by content: it is binary and has the full film's size.
- A film can carry several abnormalities, from the mass and the calc CSVs both; every
  baseline keeps off every lesion of its film.
- A few patients have lesions in the official train CSVs and the official test CSVs. Their
  training lesions are left out (counted), so that no patient is on both sides of the
  split (``dataset.npz`` refuses that leak).
- Pathology ``BENIGN_WITHOUT_CALLBACK`` is benign.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from automammo import hookimpl
from automammo.dataset import check_out_path
from automammo.dicom import read_dicom, read_header
from automammo.errors import DataError
from automammo.importers import Importer
from automammo.patches import (
    Box,
    PatchCollector,
    TissueMask,
    crop,
    lesion_box,
    mask_bbox,
    place_baseline,
    resize_patch,
)

#: The four case-description files of the TCIA release: (abnormality kind, split) -> name.
CSV_FILES = {
    ("mass", "train"): "mass_case_description_train_set.csv",
    ("mass", "test"): "mass_case_description_test_set.csv",
    ("calc", "train"): "calc_case_description_train_set.csv",
    ("calc", "test"): "calc_case_description_test_set.csv",
}

#: Columns every CSV must have, as spelled in the release. Matching ignores case and treats
#: ``_`` as a space (the release itself writes ``breast_density`` in one file and
#: ``breast density`` in the other).
REQUIRED_COLUMNS = (
    "patient_id",
    "left or right breast",
    "image view",
    "abnormality id",
    "abnormality type",
    "pathology",
    "image file path",
    "cropped image file path",
    "ROI mask file path",
)

#: Optional descriptive columns copied into the metadata when present.
OPTIONAL_COLUMNS = (
    "breast density",
    "assessment",
    "subtlety",
    "mass shape",
    "mass margins",
    "calc type",
    "calc distribution",
)

#: A CBIS-DDSM series folder: the full film, or with ``_<abnormality id>`` an ROI series.
FOLDER_RE = re.compile(r"^(mass|calc)-(training|test)_(p_\d+)_(left|right)_(cc|mlo)(?:_(\d+))?$", re.IGNORECASE)

PATHOLOGY = {"benign": "benign", "benign_without_callback": "benign", "malignant": "malignant"}
LABELS = {("mass", "benign"): 1, ("mass", "malignant"): 2, ("calc", "benign"): 3, ("calc", "malignant"): 4}
TYPE_KIND = {"mass": "mass", "calcification": "calc", "calc": "calc"}


def _norm(column: str) -> str:
    return re.sub(r"[\s_]+", " ", column.strip().lower())


def _clean_path(value: str) -> str:
    # The release has Windows separators in places and a newline inside the quoted ROI
    # path of many rows.
    return value.strip().replace("\\", "/").strip("/")


def _file_index(name: str) -> int | None:
    """0-based position of a file in its series: ``000001.dcm`` -> 1, ``1-2.dcm`` -> 1."""
    stem = Path(name).stem
    m = re.fullmatch(r"\d+-(\d+)", stem)
    if m:
        return int(m.group(1)) - 1
    if stem.isdigit():
        return int(stem)
    return None


@dataclass
class Case:
    """One row of a case-description CSV: one abnormality on one film."""

    csv: str
    line: int
    kind: str  # mass | calc
    split: str  # train | test
    patient: str
    side: str
    view: str
    abnormality_id: int
    label: int
    image_folder: str
    roi_folder: str
    crop_name: str
    roi_name: str
    meta: dict = field(default_factory=dict)

    @property
    def film(self) -> tuple[str, str, str]:
        """One physical film: a mass and a calc row can point at the same one."""
        return (self.patient, self.side, self.view)

    @property
    def where(self) -> str:
        return f"{self.csv} line {self.line}"


# --------------------------------------------------------------------------- CSVs


def find_csvs(root: Path) -> dict[tuple[str, str], Path]:
    """The case-description CSVs below ``root`` (the shallowest copy of each name)."""
    wanted = {name.lower(): key for key, name in CSV_FILES.items()}
    found: dict[tuple[str, str], Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth > 4:
            dirnames[:] = []  # the CSVs sit near the top, not among 10,000 DICOM folders
            continue
        for name in sorted(filenames):
            key = wanted.get(name.lower())
            if key is not None:
                path = Path(dirpath) / name
                if key not in found or len(path.parts) < len(found[key].parts):
                    found[key] = path
    return found


def read_cases(path: Path, kind: str, split: str, skipped: PatchCollector) -> list[Case]:
    """Parse one case-description CSV; rows that cannot be used are counted in ``skipped``.

    Raises:
        DataError: the CSV cannot be read, or lacks required columns (all of them named).
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            # The line where each row starts: the release quotes paths that end in a line
            # break, so a row can span lines, and line_num is where it ended.
            rows, ended = [], reader.line_num
            for row in reader:
                rows.append((ended + 1, row))
                ended = reader.line_num
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({type(exc).__name__}: {exc})") from None
    columns = {_norm(c): c for c in header if c is not None}
    missing = [c for c in REQUIRED_COLUMNS if _norm(c) not in columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} "
            f"(found: {', '.join(repr(c) for c in header) or 'no header'})"
        )

    def get(row: dict, name: str) -> str:
        value = row.get(columns.get(_norm(name), ""), "")
        return (value or "").strip()

    cases = []
    for line, row in rows:
        where = f"{path.name} line {line}"
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        if any(row.get(columns[_norm(c)]) is None for c in REQUIRED_COLUMNS):
            fields = sum(v is not None for k, v in row.items() if k is not None)
            skipped.skip("row shorter than the header", example=f"{where}: {fields} of {len(header)} fields")
            continue
        atype = TYPE_KIND.get(get(row, "abnormality type").lower())
        if atype is None:
            skipped.skip("unknown abnormality type", example=f"{where}: {get(row, 'abnormality type')!r}")
            continue
        if atype != kind:
            # A calc row in the mass CSV: trust the row, which describes the lesion.
            skipped.note(f"abnormality type differs from the CSV's ({path.name})")
        pathology = PATHOLOGY.get(get(row, "pathology").lower())
        if pathology is None:
            skipped.skip("unknown pathology", example=f"{where}: {get(row, 'pathology')!r}")
            continue
        try:
            abn_id = int(float(get(row, "abnormality id")))
        except ValueError:
            skipped.skip("bad abnormality id", example=where)
            continue
        patient = get(row, "patient_id")
        side = get(row, "left or right breast").upper()
        view = get(row, "image view").upper()
        if not patient:
            skipped.skip("no patient id", example=where)
            continue
        image_path = _clean_path(get(row, "image file path"))
        roi_path = _clean_path(get(row, "ROI mask file path"))
        crop_path = _clean_path(get(row, "cropped image file path"))
        prefix = f"{'Mass' if atype == 'mass' else 'Calc'}-{'Training' if split == 'train' else 'Test'}"
        image_folder = image_path.split("/")[0] if image_path else ""
        if not FOLDER_RE.match(image_folder) or FOLDER_RE.match(image_folder).group(6):
            image_folder = f"{prefix}_{patient}_{side}_{view}"
        roi_folder = roi_path.split("/")[0] if roi_path else ""
        if not FOLDER_RE.match(roi_folder) or not FOLDER_RE.match(roi_folder).group(6):
            roi_folder = f"{image_folder}_{abn_id}"
        meta = {}
        for name in OPTIONAL_COLUMNS:
            meta[name] = get(row, name)
        cases.append(
            Case(
                csv=path.name,
                line=line,
                kind=atype,
                split=split,
                patient=patient,
                side=side,
                view=view,
                abnormality_id=abn_id,
                label=LABELS[(atype, pathology)],
                image_folder=image_folder,
                roi_folder=roi_folder,
                crop_name=crop_path.rsplit("/", 1)[-1],
                roi_name=roi_path.rsplit("/", 1)[-1],
                meta=meta,
            )
        )
    return cases


# --------------------------------------------------------------------------- DICOM tree


class DicomTree:
    """The DICOM files below ROOT, indexed by CBIS-DDSM series folder name (lower case).

    Files are keyed by the nearest enclosing folder whose name is a CBIS-DDSM series name.
    Files without one (a flattened or renamed copy) are keyed by their DICOM PatientID,
    read lazily the first time a lookup misses.
    """

    def __init__(self, root: Path):
        self.root = root
        self.by_folder: dict[str, list[Path]] = defaultdict(list)
        self.loose: list[Path] = []
        self._loose_indexed = False
        self.count = 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            dcms = [f for f in sorted(filenames) if f.lower().endswith(".dcm")]
            if not dcms:
                continue
            key = self._folder_key(Path(dirpath))
            for f in dcms:
                self.count += 1
                if key is None:
                    self.loose.append(Path(dirpath) / f)
                else:
                    self.by_folder[key].append(Path(dirpath) / f)

    def _folder_key(self, directory: Path) -> str | None:
        rel = directory.relative_to(self.root) if directory != self.root else Path()
        for part in reversed((self.root.name, *rel.parts)):
            if FOLDER_RE.match(part):
                return part.lower()
        return None

    def files(self, folder: str) -> list[Path]:
        key = folder.lower()
        if key not in self.by_folder and self.loose and not self._loose_indexed:
            self._loose_indexed = True
            for path in self.loose:
                try:
                    pid = read_header(path).patient_id
                except DataError:
                    continue  # reported when (if) a row needs it
                if FOLDER_RE.match(pid):
                    self.by_folder[pid.lower()].append(path)
        return list(self.by_folder.get(key, []))


def _is_binary(pixels: np.ndarray) -> bool:
    top = pixels.max()
    # O(n) without sorting 10 million pixels: binary means every pixel is 0 or the maximum.
    return bool(top > 0 and not np.any((pixels != 0) & (pixels != top)))


@dataclass
class Resolved:
    """Where a case's pixels are: its film and the bounding box of its ROI mask."""

    case: Case
    image: Path
    shape: tuple[int, int]
    bbox: Box


class Resolver:
    """Finds the full film and the ROI mask of each case, by folder name and content."""

    def __init__(self, tree: DicomTree, collector: PatchCollector):
        self.tree = tree
        self.c = collector
        self._films: dict[str, tuple[Path, tuple[int, int]] | str] = {}

    def film(self, case: Case) -> tuple[Path, tuple[int, int]] | str:
        """The full film's path and (rows, cols), or the reason it could not be had."""
        key = case.image_folder.lower()
        if key not in self._films:
            self._films[key] = self._find_film(case)
        return self._films[key]

    def _find_film(self, case: Case):
        files = self.tree.files(case.image_folder)
        if not files:
            return f"full film DICOM not found|{case.image_folder}"
        headers = []
        problem = ""
        for path in files:
            try:
                headers.append(read_header(path))
            except DataError as exc:
                problem = str(exc)
        if not headers:
            return f"unreadable DICOM|{problem}"
        # One file is the rule; if a folder holds several, prefer the one that calls itself
        # the full mammogram, then the largest.
        headers.sort(key=lambda h: ("full" not in h.series_description.lower(), -h.rows * h.columns, h.path))
        h = headers[0]
        return Path(h.path), (h.rows, h.columns)

    def mask_bbox(self, case: Case, shape: tuple[int, int]) -> Box | str:
        """The ROI mask's bounding box, or the reason it could not be had."""
        files = self.tree.files(case.roi_folder)
        if not files:
            return "ROI series not found"
        candidates = []
        other_sizes = []
        unreadable = None
        for path in files:
            try:
                h = read_header(path)
            except DataError as exc:
                unreadable = str(exc)
                continue
            if (h.rows, h.columns) != tuple(shape):
                other_sizes.append((h.rows, h.columns, path))
                continue
            candidates.append(path)
        masks = []
        for path in candidates:
            try:
                pixels = read_dicom(path).pixels
            except DataError as exc:
                unreadable = str(exc)
                continue
            if _is_binary(pixels):
                masks.append((path, pixels))
            elif np.count_nonzero(pixels) == 0:
                masks.append((path, pixels))
        if not masks:
            if unreadable:
                return f"unreadable DICOM|{unreadable}"
            if other_sizes:
                # A binary file of another size is a mask that does not fit its film (a
                # known defect of a few CBIS-DDSM series); the crop is never binary.
                for rows, cols, path in other_sizes:
                    try:
                        px = read_dicom(path).pixels
                    except DataError:
                        continue
                    if _is_binary(px):
                        return f"ROI mask size differs from the film|{path}: {rows}x{cols} vs film {shape[0]}x{shape[1]}"
            return "no ROI mask in the series"
        if len(masks) > 1:
            # Two binary full-size images in one series: take the one the CSV names.
            wanted = _file_index(case.roi_name)
            masks.sort(key=lambda m: (_file_index(m[0].name) != wanted, str(m[0])))
        path, pixels = masks[0]
        # Only files sharing one series folder have a meaningful order to be swapped in
        # (crop and mask in separate series are each 1-1.dcm).
        shared = [p for p in files if p.parent == path.parent]
        mine, crop_index = _file_index(path.name), _file_index(case.crop_name)
        if len(shared) > 1 and mine is not None and mine == crop_index != _file_index(case.roi_name):
            self.c.note("cropped image / ROI mask swapped in the CSV (resolved by content)")
        box = mask_bbox(pixels)
        return "empty ROI mask" if box is None else box


# --------------------------------------------------------------------------- import


def import_cbis(
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: int = 150,
    margin: float = 0.2,
    min_side: int | None = None,
    min_tissue: float = 0.9,
    limit: int | None = None,
    echo=print,
):
    """Import a CBIS-DDSM download below ``root`` into ``out``; see the module docstring.

    Args:
        root: folder holding the CSVs and the DICOM tree (any depth).
        out: the dataset file to write (atomically; nothing is written on error).
        size: side of the saved patches in pixels.
        margin: fraction of the lesion's longer side added around it on each side.
        min_side: smallest patch side in film pixels before resizing (default ``size``: a
            small calcification cluster is cut at native resolution, never blown up).
        min_tissue: smallest fraction of breast tissue in a baseline patch.
        limit: at most this many abnormalities from each CSV (a quick look at the data).
        echo: where progress lines go.

    Returns:
        The written ``Dataset``.

    Raises:
        DataError: no CSV, a CSV lacking columns, no DICOM, or nothing usable.
    """
    root, out = Path(root), check_out_path(out)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected the CBIS-DDSM download folder)")
    if size < 8:
        raise DataError(f"--size must be at least 8, got {size}")
    min_side = size if min_side is None else min_side
    c = PatchCollector()
    csvs = find_csvs(root)
    if not csvs:
        raise DataError(
            f"{root}: no CBIS-DDSM case-description CSV found (expected any of "
            f"{', '.join(CSV_FILES.values())})"
        )
    cases: list[Case] = []
    selected: set[int] = set()
    for key in CSV_FILES:
        if key not in csvs:
            continue
        rows = read_cases(csvs[key], key[0], key[1], c)
        for i, case in enumerate(rows):
            if limit is None or i < limit:
                selected.add(len(cases))
            cases.append(case)
    if len(selected) < len(cases):
        c.note("abnormalities beyond --limit not imported", len(cases) - len(selected))
    echo(f"read {len(cases)} abnormalities from {len(csvs)} CSV file(s): "
         + ", ".join(p.name for p in csvs.values()))
    tree = DicomTree(root)
    if tree.count == 0:
        raise DataError(f"{root}: no .dcm files found below it (download the DICOM tree from TCIA)")
    echo(f"indexed {tree.count} DICOM files")

    # Patients on both sides of the official split: their test lesions stay (the official
    # test set is what results are compared on), their training lesions go.
    test_patients = {cs.patient for cs in cases if cs.split == "test"}
    overlap = {cs.patient for cs in cases if cs.split == "train"} & test_patients
    left_out = {cs.patient for i, cs in enumerate(cases) if i in selected and cs.split == "train"} & overlap
    if left_out:
        c.note("patients with lesions in both official splits (their training lesions left out)", len(left_out))

    films: dict[tuple, list[int]] = defaultdict(list)
    for i, case in enumerate(cases):
        films[case.film].append(i)
    resolver = Resolver(tree, c)
    todo = [f for f, idx in films.items() if any(i in selected for i in idx)]

    for film in _progress(todo, "cutting patches"):
        idx = films[film]
        # Every lesion of the film, selected or not, is found first: the baselines must
        # keep off all of them.
        resolved: dict[int, Resolved] = {}
        for i in idx:
            case = cases[i]
            found = resolver.film(case)
            if isinstance(found, str):
                if i in selected:
                    reason, _, detail = found.partition("|")
                    c.skip(reason, example=f"{case.where}: {detail}")
                continue
            image, shape = found
            box = resolver.mask_bbox(case, shape)
            if isinstance(box, str):
                if i in selected:
                    reason, _, detail = box.partition("|")
                    c.skip(reason, example=f"{case.where}: {detail or case.roi_folder}")
                continue
            resolved[i] = Resolved(case, image, shape, box)
        images: dict[Path, tuple[np.ndarray, TissueMask] | None] = {}
        for i in idx:
            if i not in selected or i not in resolved:
                continue
            r = resolved[i]
            case = r.case
            if case.split == "train" and case.patient in overlap:
                c.skip("patient also in the official test set", example=case.where)
                continue
            if r.image not in images:
                try:
                    pixels = read_dicom(r.image).pixels
                    images[r.image] = (pixels, TissueMask.from_image(pixels))
                except DataError as exc:
                    images[r.image] = None
                    c.remember("unreadable DICOM", str(exc))
            if images[r.image] is None:
                c.skip("unreadable DICOM")
                continue
            pixels, tissue = images[r.image]
            if pixels.shape != r.shape:
                c.skip("full film size differs from its header", example=str(r.image))
                continue
            if not r.bbox.inside(pixels.shape):
                c.skip("ROI outside the film", example=case.where)
                continue
            patch_box = lesion_box(r.bbox, pixels.shape, margin=margin, min_side=min_side)
            keep_out = [o.bbox for o in resolved.values() if o.shape == r.shape]
            placed = place_baseline(patch_box, pixels.shape, keep_out, tissue, min_tissue=min_tissue)
            if placed is None:
                c.skip("no room for a baseline", example=case.where)
                continue
            base_box, placement = placed
            rel = _relative(r.image, root)
            common = {
                "source": "cbis-ddsm",
                "image": rel,
                "side": case.side,
                "view": case.view,
                "abnormality_id": case.abnormality_id,
                "lesion_px": max(r.bbox.height, r.bbox.width),
                "patch_px": patch_box.height,
                "density": _int(case.meta.get("breast density")),
                "assessment": _int(case.meta.get("assessment")),
                "subtlety": _int(case.meta.get("subtlety")),
                "descriptor": " | ".join(
                    v for k, v in case.meta.items() if k.startswith(("mass ", "calc ")) and v
                ),
            }
            c.add_pair(
                resize_patch(crop(pixels, patch_box), size),
                resize_patch(crop(pixels, base_box), size),
                case.label,
                case.patient,
                case.split,
                {**common, "row0": patch_box.top, "col0": patch_box.left, "placement": "lesion"},
                {**common, "row0": base_box.top, "col0": base_box.left, "placement": placement},
            )
    return c.finish(out, echo)


def _int(value) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return -1


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _progress(items, description: str):
    if not sys.stderr.isatty():
        return items
    from rich.console import Console
    from rich.progress import track

    return track(items, description=description, console=Console(stderr=True), transient=True)


@click.command("import-cbis")
@click.argument("root", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size", default=150, show_default=True, type=click.IntRange(8, 4096),
              help="Side of the saved patches in pixels.")
@click.option("--margin", default=0.2, show_default=True, type=click.FloatRange(0, 5),
              help="Context around the lesion: this fraction of its longer side on each side.")
@click.option("--min-side", default=None, type=click.IntRange(1, None),
              help="Smallest patch side in film pixels before resizing  [default: --size].")
@click.option("--min-tissue", default=0.9, show_default=True, type=click.FloatRange(0, 1),
              help="Smallest fraction of breast tissue in a baseline patch.")
@click.option("--limit", default=None, type=click.IntRange(1, None),
              help="At most N abnormalities from each CSV (a quick look).")
def command(root, out, size, margin, min_side, min_tissue, limit):
    """CBIS-DDSM from TCIA (case-description CSVs + DICOM tree) into OUT.npz.

    One lesion patch (the ROI mask's bounding box, squared, with margin) and one adjacent
    healthy baseline patch per abnormality, 16-bit pixels kept, the official train/test
    split and the CSVs' patient ids.
    """
    import_cbis(root, out, size=size, margin=margin, min_side=min_side, min_tissue=min_tissue,
                limit=limit, echo=click.echo)


@hookimpl
def automammo_register_importers():
    return [
        Importer(
            name="import-cbis",
            description="CBIS-DDSM (TCIA DICOM tree + case-description CSVs): lesion and baseline patches, 16-bit",
            command=command,
        )
    ]
