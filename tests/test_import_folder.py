"""import-folder: PNG/JPEG/TIFF/DICOM patches in class sub-folders, pairs and patients from CSVs."""

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from automammo.dataset import load
from automammo.dicom import write_dicom
from automammo.errors import DataError
from automammo_plugins import image_folder

S = 32


def patch16(seed: int, lesion: bool, size=S) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(20000, 1500, (size, size))
    if lesion:
        r, c = np.mgrid[:size, :size]
        img[(r - size / 2) ** 2 + (c - size / 2) ** 2 <= (size / 5) ** 2] = 61234
    return np.clip(img, 0, 65535).astype(np.uint16)


def save_png(path: Path, pixels: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_csv(path: Path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def build(root: Path):
    """A train/test tree in every supported format; returns the pixels written."""
    px = {}

    def put(rel, pixels, kind="png", photometric="MONOCHROME2"):
        path = root / rel
        if kind == "dcm":
            stored = 65535 - pixels if photometric == "MONOCHROME1" else pixels
            write_dicom(path, stored.astype(np.uint16), photometric=photometric)
        else:
            save_png(path, pixels)
        px[rel] = pixels

    put("train/mass_benign/P_001_cc.png", patch16(1, True))
    put("train/baseline/P_001_cc_base.png", patch16(2, False))
    put("train/calcification_malignant/P_002/mlo.tif", patch16(3, True))
    put("train/baseline/P_002_base.dcm", patch16(4, False), "dcm", "MONOCHROME1")
    put("train/baseline/P_005_extra.png", patch16(5, False))  # a baseline without a lesion
    put("test/Mass-Malignant/P_003.dcm", patch16(6, True), "dcm")
    put("test/0/P_003_base", patch16(7, False), "dcm")  # DICOM without an extension
    put("test/3_calc_benign/P_004.png", patch16(8, True))
    (root / "train" / "baseline" / "notes.txt").write_text("ignored")
    write_csv(root / "pairs.csv", ["lesion", "baseline"], [
        ["train/mass_benign/P_001_cc.png", "train/baseline/P_001_cc_base.png"],
        ["train/calcification_malignant/P_002/mlo.tif", "./train/baseline/P_002_base.dcm"],
        ["test/Mass-Malignant/P_003.dcm", "test/0/P_003_base"],
    ])
    return px


def invoke(*args):
    return CliRunner().invoke(image_folder.command, [str(a) for a in args])


def test_import_folder_all_formats_pairs_and_splits(tmp_path):
    root = tmp_path / "patches"
    px = build(root)
    out = tmp_path / "f.npz"
    result = invoke(root, out, "--pairs", root / "pairs.csv", "--patient-pattern", r"P_\d+")
    assert result.exit_code == 0, result.output + repr(result.exception)
    ds = load(out)
    assert ds.x.dtype == np.uint16 and len(ds) == 8
    files = ds.meta["image"].tolist()
    for i, rel in enumerate(files):
        # 16-bit values survive exactly from PNG, TIFF and DICOM, MONOCHROME1 inverted back.
        assert np.array_equal(ds.x[i], px[rel]), rel
    label = dict(zip(files, ds.label.tolist()))
    assert label["train/mass_benign/P_001_cc.png"] == 1
    assert label["train/calcification_malignant/P_002/mlo.tif"] == 4
    assert label["test/Mass-Malignant/P_003.dcm"] == 2
    assert label["test/3_calc_benign/P_004.png"] == 3
    assert label["test/0/P_003_base"] == 0
    split = dict(zip(files, ds.split.tolist()))
    assert split["test/Mass-Malignant/P_003.dcm"] == "test" and split["train/baseline/P_005_extra.png"] == "train"
    idx = {f: i for i, f in enumerate(files)}
    assert ds.pair[idx["train/calcification_malignant/P_002/mlo.tif"]] == idx["train/baseline/P_002_base.dcm"]
    assert ds.pair[idx["test/Mass-Malignant/P_003.dcm"]] == idx["test/0/P_003_base"]
    assert ds.pair[idx["train/baseline/P_005_extra.png"]] == -1
    patient = dict(zip(files, ds.patient.tolist()))
    assert patient["train/calcification_malignant/P_002/mlo.tif"] == patient["train/baseline/P_002_base.dcm"] == "P_002"
    assert "3 with a baseline" in result.output


def test_default_patients_and_patients_csv(tmp_path):
    root = tmp_path / "p"
    build(root)
    ds = image_folder.import_folder(root, tmp_path / "a.npz", pairs=root / "pairs.csv", echo=lambda *_: None)
    # Without ids: a lesion and its baseline share one; unrelated files do not.
    i = list(ds.meta["image"]).index("train/mass_benign/P_001_cc.png")
    assert ds.patient[i] == ds.patient[ds.pair[i]]
    assert len(np.unique(ds.patient)) == 5
    rows = [[rel, "woman-" + rel.split("P_")[1][:3]] for rel in ds.meta["image"]]
    write_csv(tmp_path / "patients.csv", ["file", "patient"], rows)
    ds = image_folder.import_folder(root, tmp_path / "b.npz", pairs=root / "pairs.csv",
                                    patients=tmp_path / "patients.csv", echo=lambda *_: None)
    assert set(ds.patient) == {"woman-001", "woman-002", "woman-003", "woman-004", "woman-005"}


def test_mixed_sizes_need_size(tmp_path):
    root = tmp_path / "m"
    save_png(root / "baseline" / "a.png", patch16(1, False))
    save_png(root / "mass_benign" / "b.png", patch16(2, True, size=40))
    out = tmp_path / "o.npz"
    with pytest.raises(DataError) as exc:
        image_folder.import_folder(root, out, echo=lambda *_: None)
    msg = str(exc.value)
    assert "b.png: 40x40 px" in msg and "a.png is 32x32" in msg and "--size" in msg
    assert not out.exists()
    result = invoke(root, out)
    assert result.exit_code != 0 and not out.exists()
    save_png(root / "mass_malignant" / "wide.png", np.zeros((20, 30), np.uint8) + 100)
    ds = image_folder.import_folder(root, out, size=24, echo=lambda *_: None)
    assert ds.image_shape == (24, 24) and len(ds) == 3
    # 8-bit PNG beside 16-bit ones: widened exactly (x257).
    i = list(ds.meta["image"]).index("mass_malignant/wide.png")
    assert ds.x.dtype == np.uint16 and set(np.unique(ds.x[i]).tolist()) == {100 * 257}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_nan_tiff_and_unreadable_files(tmp_path):
    root = tmp_path / "n"
    save_png(root / "baseline" / "a.png", patch16(1, False))
    bad = np.full((S, S), 0.5, np.float32)
    bad[3, 4] = np.nan
    (root / "mass_benign").mkdir()
    Image.fromarray(bad).save(root / "mass_benign" / "nan.tif")
    out = tmp_path / "o.npz"
    result = invoke(root, out)
    assert result.exit_code != 0
    assert "nan.tif" in str(result.exception) and "NaN" in str(result.exception)
    assert not out.exists()
    (root / "mass_benign" / "nan.tif").write_bytes(b"II*\0garbage")
    with pytest.raises(DataError, match=r"nan.tif: unreadable image"):
        image_folder.import_folder(root, out, echo=lambda *_: None)
    lines = []
    ds = image_folder.import_folder(root, out, skip_unreadable=True, echo=lines.append)
    assert len(ds) == 1 and "unreadable image: 1" in "\n".join(lines)


def test_float_tiff_in_unit_range_becomes_uint16(tmp_path):
    root = tmp_path / "f"
    (root / "baseline").mkdir(parents=True)
    img = np.linspace(0, 1, S * S, dtype=np.float32).reshape(S, S)
    Image.fromarray(img).save(root / "baseline" / "f.tif")
    ds = image_folder.import_folder(root, tmp_path / "o.npz", echo=lambda *_: None)
    assert ds.x.dtype == np.uint16 and ds.x.max() == 65535 and ds.x.min() == 0


def test_colour_and_gray_rgb_images(tmp_path):
    root = tmp_path / "c"
    gray = np.repeat((np.arange(S * S) % 256).astype(np.uint8).reshape(S, S)[..., None], 3, axis=2)
    save_png(root / "baseline" / "gray_rgb.png", gray)
    colour = gray.copy()
    colour[..., 0] = 255
    save_png(root / "mass_benign" / "colour.png", colour)
    lines = []
    ds = image_folder.import_folder(root, tmp_path / "o.npz", echo=lines.append)
    i = list(ds.meta["image"]).index("baseline/gray_rgb.png")
    assert ds.x.dtype == np.uint8 and np.array_equal(ds.x[i], gray[..., 0])  # nothing lost
    assert "colour images converted to gray: 1" in "\n".join(lines)


def test_layout_and_csv_errors(tmp_path):
    root = tmp_path / "e"
    save_png(root / "baseline" / "a.png", patch16(1, False))
    save_png(root / "mass_benign" / "b.png", patch16(2, True))
    save_png(root / "masses" / "c.png", patch16(3, True))
    with pytest.raises(DataError, match=r"masses: holds images but is not a class folder"):
        image_folder.import_folder(root, tmp_path / "o.npz", echo=lambda *_: None)
    (root / "masses" / "c.png").unlink()
    write_csv(tmp_path / "pairs.csv", ["lesion", "base"], [["mass_benign/b.png", "baseline/a.png"]])
    with pytest.raises(DataError, match=r"pairs.csv: missing column\(s\) baseline"):
        image_folder.import_folder(root, tmp_path / "o.npz", pairs=tmp_path / "pairs.csv", echo=lambda *_: None)
    write_csv(tmp_path / "pairs.csv", ["lesion", "baseline"], [["baseline/a.png", "mass_benign/b.png"]])
    with pytest.raises(DataError, match=r"pairs.csv line 2: 'baseline/a.png' is in the baseline folder"):
        image_folder.import_folder(root, tmp_path / "o.npz", pairs=tmp_path / "pairs.csv", echo=lambda *_: None)
    (tmp_path / "pairs.csv").write_text("lesion,baseline\nmass_benign/b.png\n")
    with pytest.raises(DataError, match=r"pairs.csv line 2: no baseline on this row"):
        image_folder.import_folder(root, tmp_path / "o.npz", pairs=tmp_path / "pairs.csv", echo=lambda *_: None)
    write_csv(tmp_path / "pairs.csv", ["lesion", "baseline"], [["mass_benign/zz.png", "baseline/a.png"]])
    with pytest.raises(DataError, match=r"'mass_benign/zz.png' is not an image"):
        image_folder.import_folder(root, tmp_path / "o.npz", pairs=tmp_path / "pairs.csv", echo=lambda *_: None)
    with pytest.raises(DataError, match="does not match"):
        image_folder.import_folder(root, tmp_path / "o.npz", patient_pattern=r"P_\d+", echo=lambda *_: None)
    with pytest.raises(DataError, match=r"o.data: the dataset file must end in .npz"):
        image_folder.import_folder(root, tmp_path / "o.data", echo=lambda *_: None)
    assert not (tmp_path / "o.data").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images in class folders"):
        image_folder.import_folder(tmp_path / "empty", tmp_path / "o.npz", echo=lambda *_: None)
    assert not (tmp_path / "o.npz").exists()


def test_test_fraction_without_split_folders(tmp_path):
    root = tmp_path / "t"
    for k in range(12):
        save_png(root / "mass_benign" / f"P_{k:03d}_l.png", patch16(k, True))
        save_png(root / "calcification_benign" / f"P_{k:03d}_c.png", patch16(k + 50, True))
    ds = image_folder.import_folder(root, tmp_path / "o.npz", patient_pattern=r"(P_\d+)_", test_fraction=0.25,
                                    seed=0, echo=lambda *_: None)
    assert set(ds.split) == {"train", "test"}
    for p in np.unique(ds.patient):
        assert len(set(ds.split[ds.patient == p])) == 1
    assert np.unique(ds.patient).size == 12


def test_class_folder_names():
    assert image_folder.class_label("Mass-Benign") == 1
    assert image_folder.class_label("calc_malignant") == 4
    assert image_folder.class_label("0") == 0 and image_folder.class_label("2_mass_malignant") == 2
    assert image_folder.class_label("2_mass_benign") is None  # digit and name disagree
    assert image_folder.class_label("masses") is None
