"""import-mias on hand-written P5 PGM films and an Info.txt shaped like the real one."""

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from automammo.dataset import load
from automammo.errors import DataError
from automammo.patches import Box
from automammo_plugins import mias

N = 1024
LESION = 250

INFO = """\
MIAS database - Info.txt (test copy)
1st column: MIAS database reference number.
2nd column: Character of background tissue: F Fatty, G Fatty-glandular, D Dense-glandular
3rd column: Class of abnormality present: CALC CIRC SPIC MISC ARCH ASYM NORM
4th column: Severity of abnormality; B Benign, M Malignant
5th,6th columns: x,y image-coordinates of centre of abnormality.
7th column: Approximate radius (in pixels) of a circle enclosing the abnormality.

mdb001 G CIRC B 300 700 40
mdb002 F SPIC M 250 300 30
mdb002 F CALC M 260 420 4
mdb003 D NORM
mdb004 G CALC B
mdb004 G CALC B *NOTE 3*
mdb005 F ARCH M 300 500 35
mdb006 F CIRC M 6 512 20
mdb007 G CIRC B 2000 2000 10
mdb008 F MISC B 300 500 30
mdb001 G CIRC B 3OO 700 40
"""

# Where each located row's disc is drawn: (refnum) -> [(x, y, radius)] with y from the bottom.
DISCS = {
    "mdb001": [(300, 700, 40)],
    "mdb002": [(250, 300, 30), (260, 420, 4)],
    "mdb005": [(300, 500, 35)],
    "mdb006": [(6, 512, 20)],
}


def film(seed: int, discs) -> np.ndarray:
    """8-bit 1024 x 1024: breast against the left edge, discs drawn at Info.txt positions."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[:N, :N]
    breast = ((r - N / 2) / (N * 0.47)) ** 2 + (c / (N * 0.6)) ** 2 <= 1
    img = rng.normal(12, 3, (N, N))
    img[breast] = rng.normal(120, 12, breast.sum())
    img = np.clip(img, 0, 200)
    for x, y, radius in discs:
        row = N - 1 - y  # Info.txt's Y counts from the bottom
        img[(r - row) ** 2 + (c - x) ** 2 <= radius**2] = LESION
    return img.astype(np.uint8)


def write_pgm_by_hand(path: Path, pixels: np.ndarray, comment=True):
    header = b"P5\n" + (b"# CREATOR: test\n" if comment else b"") + f"{pixels.shape[1]} {pixels.shape[0]}\n255\n".encode()
    path.write_bytes(header + pixels.tobytes())


def build(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Info.txt").write_text(INFO)
    for k, ref in enumerate(("mdb001", "mdb002", "mdb003", "mdb004", "mdb005", "mdb006", "mdb007")):
        write_pgm_by_hand(root / f"{ref}.pgm", film(k, DISCS.get(ref, [])), comment=k % 2 == 0)
    # mdb008 is listed but its film is missing.
    return root


def located_box(x, y, radius) -> Box:
    row = N - 1 - y
    return Box(row - radius, x - radius, 2 * radius + 1, 2 * radius + 1)


def test_read_pgm_hand_written_header_variants(tmp_path):
    pixels = (np.arange(12 * 10) % 256).astype(np.uint8).reshape(12, 10)
    write_pgm_by_hand(tmp_path / "a.pgm", pixels)
    assert np.array_equal(mias.read_pgm(tmp_path / "a.pgm"), pixels)
    wide = (np.arange(6 * 4, dtype=np.uint16) * 2500).reshape(6, 4)
    mias.write_pgm(tmp_path / "b.pgm", wide)
    got = mias.read_pgm(tmp_path / "b.pgm")
    assert got.dtype == np.uint16 and np.array_equal(got, wide)  # big-endian 16-bit


@pytest.mark.parametrize(
    "data, words",
    [
        (b"P2\n2 2\n255\n1 2 3 4\n", "not a binary PGM"),
        (b"P6\n2 2\n255\n" + b"\0" * 12, "not a binary PGM"),
        (b"P5\n1024 abc\n255\n", "malformed PGM header"),
        (b"P5\n4 4\n255\n" + b"\0" * 10, "truncated PGM"),
        (b"P5\n4 4\n70000\n" + b"\0" * 32, "malformed PGM header"),
    ],
)
def test_bad_pgm_names_the_file(tmp_path, data, words):
    path = tmp_path / "mdb042.pgm"
    path.write_bytes(data)
    with pytest.raises(DataError, match=words) as exc:
        mias.read_pgm(path)
    assert str(path) in str(exc.value)


def test_parse_info_keeps_rows_without_coordinates(tmp_path):
    (tmp_path / "Info.txt").write_text(INFO)
    rows = mias.parse_info(tmp_path / "Info.txt")
    assert [r.ref for r in rows][:3] == ["mdb001", "mdb002", "mdb002"]
    norm = next(r for r in rows if r.cls == "NORM")
    assert norm.severity is None and norm.x is None
    notes = [r for r in rows if r.ref == "mdb004"]
    assert len(notes) == 2 and all(r.x is None and r.severity == "B" and not r.unreadable for r in notes)
    typo = rows[-1]  # "3OO": a letter O where a digit belongs
    assert typo.ref == "mdb001" and typo.x is None and typo.unreadable
    assert rows[0].patient == rows[1].patient == "mdb001+mdb002"
    assert next(r for r in rows if r.ref == "mdb005").patient == "mdb005+mdb006"


def test_import_mias_cuts_the_lesions_at_bottom_left_coordinates(tmp_path):
    root = build(tmp_path / "mias")
    out = tmp_path / "mias.npz"
    result = CliRunner().invoke(mias.command, [str(root), str(out), "--size", "64", "--min-side", "64"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    ds = load(out)
    assert ds.x.dtype == np.uint8 and ds.image_shape == (64, 64)
    lesions = np.flatnonzero(ds.label > 0)
    # mdb001 CIRC B, mdb002 SPIC M + CALC M, mdb006 CIRC M (at the border); ARCH left out.
    got = sorted((str(ds.meta["image"][i]), int(ds.label[i])) for i in lesions)
    assert got == [("mdb001", 1), ("mdb002", 2), ("mdb002", 4), ("mdb006", 2)]
    assert set(ds.split) == {"train"}
    for i in lesions:
        j = ds.pair[i]
        ref = str(ds.meta["image"][i])
        side = int(ds.meta["patch_px"][i])
        patch = Box(int(ds.meta["row0"][i]), int(ds.meta["col0"][i]), side, side)
        base = Box(int(ds.meta["row0"][j]), int(ds.meta["col0"][j]), side, side)
        assert patch.inside((N, N)) and base.inside((N, N))
        # The lesion patch holds its disc (had Y been read from the top, it would not).
        assert np.any(ds.x[i] >= LESION - 5)
        assert ds.x[j].max() < LESION - 20 and ds.x[j].mean() > 60  # healthy breast tissue
        for disc in DISCS[ref]:
            assert not base.overlaps(located_box(*disc))
        assert ds.patient[i] == ds.patient[j]
    # The border lesion (x = 6): the patch was shifted inside, the disc kept whole.
    border = next(i for i in lesions if ds.meta["image"][i] == "mdb006")
    assert int(ds.meta["col0"][border]) == 0
    # Film pair = one woman.
    p = {str(ds.meta["image"][i]): str(ds.patient[i]) for i in lesions}
    assert p["mdb001"] == p["mdb002"] == "mdb001+mdb002" and p["mdb006"] == "mdb005+mdb006"
    out_text = result.output
    for reason in ("no coordinates: 2", "unreadable coordinates (expected x y radius): 1", "normal film (no lesion): 1", "coordinates off the film: 1",
                   "film not found: 1", "architectural distortion / asymmetry (see --include-arch-asym): 1"):
        assert reason in out_text, reason


def test_tiny_calcification_gets_the_floor_size(tmp_path):
    root = build(tmp_path / "mias")
    ds = mias.import_mias(root, tmp_path / "o.npz", size=32, min_side=80, echo=lambda *_: None)
    calc = next(i for i in range(len(ds)) if ds.label[i] == 4)
    assert int(ds.meta["patch_px"][calc]) == 80 and int(ds.meta["lesion_px"][calc]) == 8
    assert ds.image_shape == (32, 32)


def test_include_arch_asym_and_patient_grouped_test_fraction(tmp_path):
    root = build(tmp_path / "mias")
    ds = mias.import_mias(root, tmp_path / "o.npz", size=32, include_arch_asym=True, test_fraction=0.5,
                          seed=0, echo=lambda *_: None)
    arch = [i for i in range(len(ds)) if ds.meta["mias_class"][i] == "ARCH" and ds.label[i] > 0]
    assert len(arch) == 1 and ds.label[arch[0]] == 2
    assert set(ds.split) == {"train", "test"}
    for p in np.unique(ds.patient):
        assert len(set(ds.split[ds.patient == p])) == 1


def test_bad_film_header_fails_without_output(tmp_path):
    root = build(tmp_path / "mias")
    (root / "mdb002.pgm").write_bytes(b"P5\n1024\n")
    out = tmp_path / "o.npz"
    result = CliRunner().invoke(mias.command, [str(root), str(out)])
    assert result.exit_code != 0
    assert isinstance(result.exception, DataError) and "mdb002.pgm" in str(result.exception)
    assert not out.exists() and not list(tmp_path.glob(".o.npz*"))


def test_no_info_and_nothing_usable(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no Info.txt"):
        mias.import_mias(tmp_path / "a", tmp_path / "o.npz", echo=lambda *_: None)
    root = tmp_path / "b"
    root.mkdir()
    (root / "Info.txt").write_text("mdb003 D NORM\nmdb004 G CALC B\n")
    write_pgm_by_hand(root / "mdb003.pgm", film(0, []))
    with pytest.raises(DataError, match="nothing usable.*normal film"):
        mias.import_mias(root, tmp_path / "o.npz", echo=lambda *_: None)
    assert not (tmp_path / "o.npz").exists()
