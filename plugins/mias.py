"""mini-MIAS importer: 322 PGM films and ``Info.txt`` to dataset.npz.

The database (Suckling et al., 1994; the "mini" version digitised at 200 microns and
padded to 1024 x 1024) gives each abnormality as one row of ``Info.txt``::

    REFNUM BG CLASS SEVERITY X Y RADIUS
    mdb001 G CIRC B 535 425 197

BG is the background tissue (F fatty, G glandular, D dense); CLASS is CALC
(calcification), CIRC / SPIC / MISC (circumscribed, spiculated, ill-defined masses), ARCH
(architectural distortion), ASYM (asymmetry) or NORM; SEVERITY is B or M. X, Y are the
centre in pixels **from the bottom-left corner** (so the row is ``height - 1 - Y``), RADIUS
is in pixels. Some rows lack coordinates (calcifications spread over the film) or severity;
a film may have several rows. Films come in left/right pairs of one woman (mdb001 +
mdb002, mdb003 + mdb004, ...), which is the patient id. There is no official split.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from automammo import hookimpl
from automammo.dataset import check_out_path
from automammo.errors import DataError
from automammo.importers import Importer
from automammo.patches import (
    PatchCollector,
    TissueMask,
    circle_bbox,
    crop,
    lesion_box,
    place_baseline,
    resize_patch,
)

MASS_CLASSES = ("CIRC", "SPIC", "MISC")
EXTRA_MASS_CLASSES = ("ARCH", "ASYM")
CLASSES = ("CALC", *MASS_CLASSES, *EXTRA_MASS_CLASSES, "NORM")
REF_RE = re.compile(r"^mdb(\d{3})$", re.IGNORECASE)


# --------------------------------------------------------------------------- PGM


def read_pgm(path: str | os.PathLike) -> np.ndarray:
    """Read a binary (P5) PGM image.

    Header: ``P5``, width, height, maxval, separated by whitespace, with ``#`` comments
    allowed before the single whitespace byte that ends the header. maxval < 256 gives
    uint8 pixels, up to 65535 big-endian uint16 pixels (the Netpbm rule).

    Raises:
        DataError: not a P5 PGM, a malformed header, or fewer pixel bytes than the header
            promises; the message names the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data[:2] != b"P5":
        magic = data[:2].decode("latin-1", "replace")
        hint = " (ASCII P2 PGM: convert it to binary P5)" if magic == "P2" else ""
        raise DataError(f"{path}: not a binary PGM (starts with {magic!r}, expected 'P5'){hint}")
    fields: list[int] = []
    pos = 2
    n = len(data)
    while len(fields) < 3:
        # Skip whitespace and comments between header fields.
        while pos < n and (data[pos : pos + 1].isspace() or data[pos : pos + 1] == b"#"):
            if data[pos : pos + 1] == b"#":
                end = data.find(b"\n", pos)
                pos = n if end < 0 else end + 1
            else:
                pos += 1
        start = pos
        while pos < n and data[pos : pos + 1].isdigit():
            pos += 1
        if start == pos:
            raise DataError(f"{path}: malformed PGM header (expected width, height and maxval after 'P5')")
        fields.append(int(data[start:pos]))
    if pos >= n or not data[pos : pos + 1].isspace():
        raise DataError(f"{path}: malformed PGM header (no whitespace after maxval)")
    pos += 1
    width, height, maxval = fields
    if width <= 0 or height <= 0 or not 0 < maxval < 65536:
        raise DataError(f"{path}: malformed PGM header (width {width}, height {height}, maxval {maxval})")
    dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
    need = width * height * dtype.itemsize
    if n - pos < need:
        raise DataError(f"{path}: truncated PGM ({n - pos} pixel bytes, {width}x{height} needs {need})")
    pixels = np.frombuffer(data, dtype=dtype, count=width * height, offset=pos).reshape(height, width)
    return pixels.astype(np.uint8 if maxval < 256 else np.uint16)


def write_pgm(path: str | os.PathLike, pixels: np.ndarray) -> Path:
    """Write a binary (P5) PGM; uint8 pixels with maxval 255, uint16 big-endian with 65535."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected 2-D uint8/uint16 pixels, got {pixels.dtype} {pixels.shape}")
    maxval = 255 if pixels.dtype == np.uint8 else 65535
    body = pixels.astype(">u2").tobytes() if maxval > 255 else pixels.tobytes()
    path = Path(path)
    path.write_bytes(f"P5\n{pixels.shape[1]} {pixels.shape[0]}\n{maxval}\n".encode() + body)
    return path


# --------------------------------------------------------------------------- Info.txt


@dataclass(frozen=True)
class InfoRow:
    """One row of Info.txt. ``x``, ``y``, ``radius`` are None when the row has none."""

    ref: str
    line: int
    background: str
    cls: str
    severity: str | None
    x: float | None
    y: float | None
    radius: float | None
    unreadable: bool = False  # something stood where the coordinates go, but not 3 numbers

    @property
    def number(self) -> int:
        return int(REF_RE.match(self.ref).group(1))

    @property
    def patient(self) -> str:
        """The woman: films 2k-1 and 2k are her left and right breast."""
        first = self.number - (1 - self.number % 2)
        return f"mdb{first:03d}+mdb{first + 1:03d}"


def parse_info(path: str | os.PathLike) -> list[InfoRow]:
    """Parse Info.txt: every line whose first word is ``mdbNNN``; the prose is ignored.

    Raises:
        DataError: the file cannot be read or holds no ``mdbNNN`` row.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens or not REF_RE.match(tokens[0]):
            continue
        ref = tokens[0].lower()
        background = tokens[1].upper() if len(tokens) > 1 else ""
        cls = tokens[2].upper() if len(tokens) > 2 else ""
        rest = tokens[3:]
        severity = None
        if rest and rest[0].upper() in ("B", "M"):
            severity = rest[0].upper()
            rest = rest[1:]
        numbers = []
        for tok in rest[:3]:
            try:
                numbers.append(float(tok))
            except ValueError:
                break  # "*NOTE 3*" and the like: no coordinates
        x, y, radius = numbers if len(numbers) == 3 else (None, None, None)
        unreadable = bool(rest) and len(numbers) < 3 and not rest[0].startswith("*")
        rows.append(InfoRow(ref, number, background, cls, severity, x, y, radius, unreadable))
    if not rows:
        raise DataError(f"{path}: no 'mdbNNN ...' rows; is this the mini-MIAS Info.txt?")
    return rows


def find_info(directory: Path) -> Path:
    for candidate in sorted(directory.iterdir()):
        if candidate.is_file() and candidate.name.lower() in ("info.txt", "info", "info.text"):
            return candidate
    raise DataError(f"{directory}: no Info.txt (pass --info FILE if it lives elsewhere)")


def find_films(directory: Path) -> dict[str, Path]:
    """``mdbNNN`` -> its .pgm file, below ``directory`` (case-insensitive)."""
    films = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() == ".pgm" and REF_RE.match(stem):
                films.setdefault(stem.lower(), Path(dirpath) / name)
    return films


# --------------------------------------------------------------------------- import


def _label(row: InfoRow, include_arch_asym: bool) -> int | str:
    """Dataset label 1-4 for a row, or the reason it is left out."""
    if row.cls == "NORM":
        return "normal film (no lesion)"
    if row.cls not in CLASSES:
        return "unknown class"
    if row.cls in EXTRA_MASS_CLASSES and not include_arch_asym:
        return "architectural distortion / asymmetry (see --include-arch-asym)"
    if row.severity is None:
        return "no severity"
    malignant = row.severity == "M"
    if row.cls == "CALC":
        return 4 if malignant else 3
    return 2 if malignant else 1


def import_mias(
    directory: str | os.PathLike,
    out: str | os.PathLike,
    size: int = 128,
    margin: float = 0.2,
    min_side: int = 64,
    min_tissue: float = 0.9,
    include_arch_asym: bool = False,
    test_fraction: float = 0.0,
    seed: int = 0,
    info: str | os.PathLike | None = None,
    echo=print,
):
    """Import mini-MIAS from ``directory`` into ``out``; see the module docstring.

    Args:
        directory: folder with ``mdbNNN.pgm`` films (any depth) and ``Info.txt``.
        out: the dataset file to write (atomically).
        size: side of the saved patches.
        margin: fraction of the lesion diameter added around it on each side.
        min_side: smallest patch side in film pixels (a calcification of radius 3 px
            still gets 64 px = 12.8 mm of context).
        min_tissue: smallest fraction of breast tissue in a baseline patch.
        include_arch_asym: count architectural distortions and asymmetries as masses.
        test_fraction: hold out this share of the women as ``test`` (0: all ``train``).
        seed: seed of that hold-out.
        info: Info.txt elsewhere than in ``directory``.
        echo: where progress lines go.

    Returns:
        The written ``Dataset``.
    """
    directory, out = Path(directory), check_out_path(out)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory (expected the mini-MIAS folder)")
    info_path = Path(info) if info is not None else find_info(directory)
    rows = parse_info(info_path)
    films = find_films(directory)
    if not films:
        raise DataError(f"{directory}: no mdbNNN.pgm films found")
    echo(f"read {len(rows)} rows from {info_path}, found {len(films)} films")
    c = PatchCollector()
    by_film: dict[str, list[InfoRow]] = defaultdict(list)
    for row in rows:
        by_film[row.ref].append(row)
    for ref in sorted(by_film):
        film_rows = by_film[ref]
        wanted = []
        for row in film_rows:
            label = _label(row, include_arch_asym)
            if isinstance(label, str):
                c.skip(label, example=f"{info_path.name} line {row.line}: {ref} {row.cls}")
            elif row.x is None and row.unreadable:
                c.skip("unreadable coordinates (expected x y radius)",
                       example=f"{info_path.name} line {row.line}: {ref}")
            elif row.x is None:
                c.skip("no coordinates", example=f"{info_path.name} line {row.line}: {ref}")
            else:
                wanted.append((row, label))
        if not wanted:
            continue
        if ref not in films:
            c.skip("film not found", n=len(wanted), example=f"{ref}.pgm")
            continue
        # A damaged film is an error, not a skip: the database is small and fixed, so a bad
        # file means a broken download the user should repair, not data to work around.
        pixels = read_pgm(films[ref])
        height, width = pixels.shape
        tissue = TissueMask.from_image(pixels)
        # Every located abnormality of the film is kept out of every baseline, including
        # ARCH / ASYM rows that are not imported: they are not healthy tissue either.
        keep_out = []
        for row in film_rows:
            if row.x is not None and row.cls != "NORM":
                keep_out.append(circle_bbox(height - 1 - row.y, row.x, row.radius))
        for row, label in wanted:
            if not (0 <= row.x < width and 0 <= row.y < height) or row.radius <= 0:
                c.skip("coordinates off the film", example=f"{info_path.name} line {row.line}: {ref} "
                       f"x={row.x:g} y={row.y:g} r={row.radius:g} on {width}x{height}")
                continue
            centre_row = height - 1 - row.y  # Info.txt counts Y from the bottom
            bbox = circle_bbox(centre_row, row.x, row.radius)
            patch_box = lesion_box(bbox, pixels.shape, margin=margin, min_side=min_side)
            placed = place_baseline(patch_box, pixels.shape, keep_out, tissue, min_tissue=min_tissue)
            if placed is None:
                c.skip("no room for a baseline", example=f"{info_path.name} line {row.line}: {ref}")
                continue
            base_box, placement = placed
            common = {
                "source": "mini-mias",
                "image": ref,
                "background": row.background,
                "mias_class": row.cls,
                "lesion_px": int(math.ceil(2 * row.radius)),
                "patch_px": patch_box.height,
            }
            c.add_pair(
                resize_patch(crop(pixels, patch_box), size),
                resize_patch(crop(pixels, base_box), size),
                label,
                row.patient,
                "train",
                {**common, "row0": patch_box.top, "col0": patch_box.left, "placement": "lesion"},
                {**common, "row0": base_box.top, "col0": base_box.left, "placement": placement},
            )
    return c.finish(out, echo, test_fraction, seed)


@click.command("import-mias")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size", default=128, show_default=True, type=click.IntRange(8, 1024),
              help="Side of the saved patches in pixels.")
@click.option("--margin", default=0.2, show_default=True, type=click.FloatRange(0, 5),
              help="Context around the lesion: this fraction of its diameter on each side.")
@click.option("--min-side", default=64, show_default=True, type=click.IntRange(1, 1024),
              help="Smallest patch side in film pixels (200 micron pixels) before resizing.")
@click.option("--min-tissue", default=0.9, show_default=True, type=click.FloatRange(0, 1),
              help="Smallest fraction of breast tissue in a baseline patch.")
@click.option("--include-arch-asym", is_flag=True,
              help="Count architectural distortions (ARCH) and asymmetries (ASYM) as masses.")
@click.option("--test-fraction", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Hold out this share of the women as the test split (grouped, stratified).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the test hold-out.")
@click.option("--info", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Info.txt, when it is not in DIR.")
def command(directory, out, size, margin, min_side, min_tissue, include_arch_asym, test_fraction, seed, info):
    """mini-MIAS (mdbNNN.pgm films + Info.txt) into OUT.npz.

    One lesion patch (the Info.txt circle, squared, with margin) and one adjacent healthy
    baseline patch per located abnormality; patient = the woman (film pair mdb001+mdb002).
    """
    import_mias(directory, out, size=size, margin=margin, min_side=min_side, min_tissue=min_tissue,
                include_arch_asym=include_arch_asym, test_fraction=test_fraction, seed=seed, info=info,
                echo=click.echo)


@hookimpl
def automammo_register_importers():
    return [
        Importer(
            name="import-mias",
            description="mini-MIAS (PGM films + Info.txt): lesion and baseline patches, patients = film pairs",
            command=command,
        )
    ]
