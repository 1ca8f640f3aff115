"""dataset.npz validation: every malformed input is a one-line DataError naming the file."""

from __future__ import annotations

import numpy as np
import pytest

from automammo.dataset import Dataset, load
from automammo.errors import DataError
from automammo.tasks import TASKS, get_task


def _arrays(ds: Dataset) -> dict:
    return {"x": ds.x.copy(), "label": ds.label.copy(), "pair": ds.pair.copy(),
            "patient": ds.patient.copy(), "split": ds.split.copy()}


def test_round_trip_keeps_everything(tmp_path, small_dataset):
    path = small_dataset.save(tmp_path / "d.npz")
    back = load(path)
    assert back.fingerprint() == small_dataset.fingerprint()
    assert back.x.dtype == np.uint16
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.pop("patient"), "missing array"),
    (lambda a: a.update(x=a["x"].astype(np.float32)), "uint8 or uint16"),
    (lambda a: a.update(x=a["x"][:, :, 0]), r"shape \(N, H, W\)"),
    (lambda a: a["label"].__setitem__(3, 7), "label must be in 0-4; found 7 at index 3"),
    (lambda a: a.update(label=a["label"][:-1]), "expected"),
    (lambda a: a["pair"].__setitem__(0, 5), "not symmetric"),
    (lambda a: a["pair"].__setitem__(0, 0), "points to itself"),
    (lambda a: a["pair"].__setitem__(0, 10_000), "outside"),
    (lambda a: a["split"].__setitem__(0, "valid"), "'train' or 'test'"),
    (lambda a: a["patient"].__setitem__(0, "someone-else"), "joins two patients"),
    # rows 0-1 and 80-81 are one patient's two lesion/baseline pairs
    (lambda a: a["split"].__setitem__(slice(0, 2), "test" if a["split"][80] == "train" else "train"),
     "in both train and test"),
])
def test_invalid_arrays_are_refused(tmp_path, small_dataset, mutate, message):
    arrays = _arrays(small_dataset)
    mutate(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as err:
        load(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_reserved_metadata_name_is_refused(small_dataset):
    arrays = _arrays(small_dataset)
    with pytest.raises(DataError, match="'file' is reserved"):
        Dataset.create(**arrays, meta={"file": np.array(["a"] * len(arrays["label"]))})


def test_pair_must_join_baseline_and_lesion(small_dataset):
    arrays = _arrays(small_dataset)
    arrays["label"][0] = 1  # the baseline of pair 0-1 becomes a lesion
    with pytest.raises(DataError, match="must join a baseline"):
        Dataset.create(**arrays, source="mem")


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04 truncated"])
def test_not_an_npz(tmp_path, content):
    path = tmp_path / "broken.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="broken.npz"):
        load(path)


def test_text_and_npy_files_are_named_for_what_they_are(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("hello\n")
    with pytest.raises(DataError, match=r"notes.npz: not a dataset .npz \(not a zip archive\)$"):
        load(text)
    array = tmp_path / "x.npy"
    np.save(array, np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"x.npy: a single .npy array, not a dataset .npz .*import-arrays"):
        load(array)


def test_values_in_messages_are_plain_strings(tmp_path, small_dataset):
    arrays = _arrays(small_dataset)
    arrays["split"][0] = "foo"
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(DataError) as err:
        load(tmp_path / "s.npz")
    assert "found 'foo' at index 0" in str(err.value) and "np.str_" not in str(err.value)


def test_truncated_npz(tmp_path, small_dataset):
    path = small_dataset.save(tmp_path / "d.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="d.npz"):
        load(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load(tmp_path / "nope.npz")


def test_pickled_object_array_is_refused(tmp_path, small_dataset):
    arrays = _arrays(small_dataset)
    arrays["patient"] = arrays["patient"].astype(object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="pickled.npz"):
        load(path)


def test_task_views(small_dataset):
    ds = small_dataset
    bm = TASKS["benign-malignant"]
    y = bm.targets(ds.label)
    assert set(np.unique(y[ds.label == 0])) == {-1}
    assert np.all(y[np.isin(ds.label, [2, 4])] == 1) and np.all(y[np.isin(ds.label, [1, 3])] == 0)
    mc = TASKS["mass-calcification"].targets(ds.label)
    assert np.all(mc[np.isin(ds.label, [1, 2])] == 0) and np.all(mc[np.isin(ds.label, [3, 4])] == 1)
    assert TASKS["diagnosis"].n_classes == 4
    assert np.array_equal(TASKS["diagnosis"].targets(np.array([1, 2, 3, 4])), [0, 1, 2, 3])
    ab = TASKS["abnormality"].targets(ds.label)
    assert np.all(ab == (ds.label > 0))
    tb = TASKS["type-with-baseline"].targets(np.array([0, 1, 2, 3, 4]))
    assert list(tb) == [0, 1, 1, 2, 2]
    assert TASKS["benign-malignant"].lesions_only and not TASKS["abnormality"].lesions_only
    with pytest.raises(Exception, match="known: abnormality, benign-malignant"):
        get_task("malignancy")
