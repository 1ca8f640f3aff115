"""import-arrays: the CBIS-DDSM course arrays (baseline at 2i, lesion at 2i+1)."""

import numpy as np
import pytest
from click.testing import CliRunner

from automammo.dataset import load
from automammo.errors import DataError
from automammo_plugins import course_arrays


def course(n_pairs=6, size=16, dtype=np.uint16, seed=0, channel=True):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 65535 if dtype == np.uint16 else 255, (2 * n_pairs, size, size)).astype(dtype)
    y = np.zeros(2 * n_pairs, np.int64)
    y[1::2] = np.arange(n_pairs) % 4 + 1
    return (x[..., None] if channel else x), y


def save(tmp_path, x, y, stem="train"):
    xi, yi = tmp_path / f"{stem}_tensor.npy", tmp_path / f"{stem}_labels.npy"
    np.save(xi, x)
    np.save(yi, y)
    return xi, yi


def invoke(*args):
    return CliRunner().invoke(course_arrays.command, [str(a) for a in args])


def test_uint16_pairs_import_exactly(tmp_path):
    x, y = course()
    xi, yi = save(tmp_path, x, y)
    out = tmp_path / "ds.npz"
    result = invoke(xi, yi, out)
    assert result.exit_code == 0, result.output + repr(result.exception)
    ds = load(out)
    assert ds.x.dtype == np.uint16 and np.array_equal(ds.x, x[..., 0])  # order and values kept
    assert np.array_equal(ds.label, y)
    assert ds.pair.tolist() == [1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10]
    assert len(np.unique(ds.patient)) == 6 and ds.patient[0] == ds.patient[1] != ds.patient[2]
    assert set(ds.split) == {"train"}
    assert ds.meta["index"].tolist() == list(range(12))
    assert "12 patches" in result.output and "6 patients" in result.output


@pytest.mark.parametrize(
    "scale, dtype",
    [
        (1 / 65535, np.uint16),  # floats in [0, 1] -> uint16 round(x * 65535): exact round trip
        (1.0, np.uint8),  # whole floats in [0, 255] -> uint8 unchanged
    ],
)
def test_float_arrays_are_converted_without_rescale(tmp_path, scale, dtype):
    ints, y = course(dtype=dtype, channel=False)
    x = ints.astype(np.float64) * scale
    xi, yi = save(tmp_path, x.astype(np.float32) if dtype == np.uint8 else x, y)
    ds = course_arrays.import_arrays([xi, yi], tmp_path / "o.npz", echo=lambda *_: None)
    assert ds.x.dtype == dtype
    assert np.array_equal(ds.x, ints)


def test_fractional_0_255_floats_become_uint16(tmp_path):
    x, y = course(dtype=np.uint8, channel=False)
    xf = x.astype(np.float32) + 0.5
    xf[xf > 255] = 255
    xi, yi = save(tmp_path, xf, y)
    said = []
    ds = course_arrays.import_arrays([xi, yi], tmp_path / "o.npz", echo=said.append)
    assert ds.x.dtype == np.uint16
    assert np.array_equal(ds.x, np.rint(xf.astype(np.float64) * 257).astype(np.uint16))
    # The conversion is said in the summary, like the other conversions importers make.
    assert any(f"float pixels stored as uint16 ({xi}" in line for line in said), said


def test_nan_pixels_are_refused_and_nothing_written(tmp_path):
    x, y = course(channel=False)
    xf = x.astype(np.float32) / 65535
    xf[3, 2, 2] = np.nan
    xi, yi = save(tmp_path, xf, y)
    out = tmp_path / "o.npz"
    result = invoke(xi, yi, out)
    assert result.exit_code != 0
    assert isinstance(result.exception, DataError)
    assert str(xi) in str(result.exception) and "NaN" in str(result.exception)
    assert "(3, 2, 2)" in str(result.exception)
    assert not out.exists()


def test_out_of_range_floats_are_refused(tmp_path):
    x, y = course(channel=False)
    xi, yi = save(tmp_path, (x.astype(np.float32) - 30000) / 1000, y)  # z-scored-ish
    with pytest.raises(DataError, match="negative"):
        course_arrays.import_arrays([xi, yi], tmp_path / "o.npz", echo=lambda *_: None)


def test_pair_order_is_verified(tmp_path):
    x, y = course()
    y[4], y[5] = y[5], 0  # a lesion at an even index
    xi, yi = save(tmp_path, x, y)
    with pytest.raises(DataError, match=r"pair order.*index 4 has label \d, expected 0 \(baseline\)") as exc:
        course_arrays.import_arrays([xi, yi], tmp_path / "o.npz", echo=lambda *_: None)
    assert str(yi) in str(exc.value) and "--unpaired" in str(exc.value)
    ds = course_arrays.import_arrays([xi, yi], tmp_path / "o.npz", unpaired=True, echo=lambda *_: None)
    assert set(ds.pair.tolist()) == {-1} and len(np.unique(ds.patient)) == 12
    odd = course()[0][:5]
    xi, yi = save(tmp_path, odd, np.array([0, 1, 0, 2, 0]), "odd")
    with pytest.raises(DataError, match="odd number"):
        course_arrays.import_arrays([xi, yi], tmp_path / "o.npz", echo=lambda *_: None)


def test_label_problems(tmp_path):
    x, y = course()
    xi, _ = save(tmp_path, x, y)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([0, 7] * 6))
    with pytest.raises(DataError, match="label 7 at index 1 is outside 0-4"):
        course_arrays.import_arrays([xi, bad], tmp_path / "o.npz", echo=lambda *_: None)
    np.save(bad, y[:-2])
    with pytest.raises(DataError, match="10 labels for 12 images"):
        course_arrays.import_arrays([xi, bad], tmp_path / "o.npz", echo=lambda *_: None)
    onehot = np.eye(5, dtype=np.float32)[y]
    np.save(bad, onehot)
    ds = course_arrays.import_arrays([xi, bad], tmp_path / "o.npz", echo=lambda *_: None)
    assert np.array_equal(ds.label, y)


def test_patients_per_pair_per_image_and_conflicts(tmp_path):
    x, y = course()
    xi, yi = save(tmp_path, x, y)
    pp = tmp_path / "patients.npy"
    np.save(pp, np.array(["A", "A", "B", "B", "C", "C"]))  # one per pair
    ds = course_arrays.import_arrays([xi, yi], tmp_path / "o.npz", patients=pp, echo=lambda *_: None)
    assert ds.patient.tolist() == ["A"] * 4 + ["B"] * 4 + ["C"] * 4
    np.save(pp, np.repeat(np.arange(6), 2))  # one per image, integers
    ds = course_arrays.import_arrays([xi, yi], tmp_path / "o.npz", patients=pp, echo=lambda *_: None)
    assert ds.patient.tolist()[:4] == ["0", "0", "1", "1"]
    ids = np.repeat(np.arange(6), 2).astype(str)
    ids[3] = "zz"
    np.save(pp, ids)
    with pytest.raises(DataError, match=r"pair at index 2, 3 has two patient ids"):
        course_arrays.import_arrays([xi, yi], tmp_path / "o.npz", patients=pp, echo=lambda *_: None)


def test_test_fraction_groups_patients(tmp_path):
    x, y = course(n_pairs=20)
    xi, yi = save(tmp_path, x, y)
    pp = tmp_path / "p.npy"
    np.save(pp, np.arange(20) // 2)  # two pairs per patient
    result = invoke(xi, yi, tmp_path / "o.npz", "--patients", pp, "--test-fraction", "0.3", "--seed", "4")
    assert result.exit_code == 0, result.output
    ds = load(tmp_path / "o.npz")
    assert set(ds.split) == {"train", "test"}
    for p in np.unique(ds.patient):
        assert len(set(ds.split[ds.patient == p])) == 1
    assert 0.15 <= np.mean(ds.split == "test") <= 0.45
    result = invoke(xi, yi, tmp_path / "o2.npz", "--split", "test", "--test-fraction", "0.3")
    assert result.exit_code != 0 and not (tmp_path / "o2.npz").exists()


def test_npz_input_and_official_test_arrays(tmp_path):
    x, y = course(channel=False)
    both = tmp_path / "course.npz"
    np.savez(both, x=x, label=y)
    tx, ty = course(n_pairs=2, seed=5)
    txi, tyi = save(tmp_path, tx, ty, "test")
    result = invoke(both, tmp_path / "o.npz", "--test", txi, tyi)
    assert result.exit_code == 0, result.output + repr(result.exception)
    ds = load(tmp_path / "o.npz")
    assert len(ds) == 16 and (ds.split == "test").sum() == 4
    assert np.array_equal(ds.x[12:], tx[..., 0])
    assert not set(ds.patient[ds.split == "test"]) & set(ds.patient[ds.split == "train"])
    # Two sets of test arrays would share default patient ids: refused, nothing written.
    result = invoke(both, tmp_path / "o4.npz", "--split", "test", "--test", txi, tyi)
    assert isinstance(result.exception, DataError) and "use one or the other" in str(result.exception)
    assert not (tmp_path / "o4.npz").exists()
    anon = tmp_path / "anon.npz"
    np.savez(anon, x, y)  # arr_0, arr_1
    ds = course_arrays.import_arrays([anon], tmp_path / "o3.npz", echo=lambda *_: None)
    assert np.array_equal(ds.x, x)


def test_usage_errors(tmp_path):
    assert invoke(tmp_path / "only.npz").exit_code == 2
    x, y = course()
    xi, yi = save(tmp_path, x, y)
    assert invoke(xi, yi, tmp_path / "out.txt").exit_code == 2
    result = invoke(tmp_path / "missing.npy", yi, tmp_path / "o.npz")
    assert result.exit_code != 0 and "missing.npy: no such file" in str(result.exception)
    rgb = tmp_path / "rgb.npy"
    np.save(rgb, np.zeros((12, 16, 16, 3), np.uint8))
    with pytest.raises(DataError, match=r"rgb.npy: images must have shape"):
        course_arrays.import_arrays([rgb, yi], tmp_path / "o.npz", echo=lambda *_: None)
