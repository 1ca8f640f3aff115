"""`automammo ensemble`, `predict` and `evaluate` through the command line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from _fixtures_bundle import finished_bundle, finished_run
from automammo.bundle import Bundle
from automammo.cli import cli
from automammo.dataset import load as load_dataset
from automammo.dicom import write_dicom
from automammo.errors import DataError
from automammo.inputs import read_image


@pytest.fixture(scope="module")
def shared():
    run_dir, data = finished_run()
    return run_dir, data, finished_bundle()


@pytest.fixture(scope="module")
def lesions(shared):
    ds = load_dataset(shared[1])
    rows = np.flatnonzero((ds.split == "test") & (ds.label > 0))
    return ds, rows


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_ensemble_command_writes_a_bundle_and_shows_the_selection(shared, tmp_path):
    run_dir, _, _ = shared
    result = invoke("ensemble", run_dir, "--meta", "logistic", "--top", "2", "--folds", "3",
                    "--out", tmp_path / "cli")
    assert result.exit_code == 0, result.output
    assert "logistic *" in result.output and "threshold" in result.output and "95% CI" in result.output
    b = Bundle.load(tmp_path / "cli.ammo")
    assert b.manifest["meta_learner"]["name"] == "logistic" and len(b.members) == 2


def test_ensemble_with_an_unknown_meta_learner_is_one_line_and_exit_2(shared, tmp_path):
    result = invoke("ensemble", shared[0], "--meta", "nope", "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert "unknown meta-learner 'nope'; known:" in result.output and "logistic" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.ammo").exists()


def test_predict_on_png_dicom_and_dataset(shared, lesions, tmp_path):
    _, data, bundle = shared
    ds, rows = lesions
    png, dcm = tmp_path / "lesion.png", tmp_path / "lesion.dcm"
    Image.fromarray(ds.x[rows[0]]).save(png)
    write_dicom(dcm, ds.x[rows[1]])
    out = tmp_path / "preds.csv"
    result = invoke("predict", bundle, png, dcm, data, "--out", out)
    assert result.exit_code == 0, result.output
    assert "predictions" in result.output and "decisions:" in result.output
    table = read_csv(out)
    lesion_rows = np.flatnonzero(ds.label > 0)
    assert len(table) == 2 + len(lesion_rows)
    # The columns docs/bundles.md lists, in its order.
    assert list(table[0]) == ["input", "split", "patient", "true_class", "p_benign", "p_malignant", "decision",
                              "threshold"]
    b = Bundle.load(bundle)
    expected = b.predict_proba(ds.x[[rows[0], rows[1], *lesion_rows]])
    got = np.array([[float(r["p_benign"]), float(r["p_malignant"])] for r in table])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    decisions = [r["decision"] for r in table]
    assert decisions == [b.classes[i] for i in b.decide(expected)]
    assert table[2]["true_class"] in ("benign", "malignant") and table[0]["true_class"] == ""


def test_sixteen_bit_files_keep_their_values_and_a_bit_depth_mismatch_is_flagged(shared, tmp_path):
    pixels = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 3).astype(np.uint16)
    write_dicom(tmp_path / "deep.dcm", pixels, bits_stored=12)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(read_image(tmp_path / "deep.dcm"), pixels)
    np.testing.assert_array_equal(read_image(tmp_path / "deep.png"), pixels)
    assert read_image(tmp_path / "deep.dcm").dtype == np.uint16
    result = CliRunner().invoke(cli, ["predict", str(shared[2]), str(tmp_path / "deep.dcm")])
    assert result.exit_code == 0
    assert "same bit depth" in result.output


def test_broken_inputs_are_one_line_errors_naming_the_file(shared, lesions, tmp_path):
    ds, rows = lesions
    good = tmp_path / "good.dcm"
    write_dicom(good, ds.x[rows[0]])
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) - 300])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for bad in (truncated, text, tmp_path / "missing.png"):
        result = invoke("predict", shared[2], bad)
        assert result.exit_code == 2, result.output
        message = result.output.strip()
        assert str(bad) in message and "Traceback" not in message and len(message.splitlines()) == 1
        with pytest.raises(DataError):
            read_image(bad)


def test_predict_refuses_a_tampered_bundle(shared, tmp_path):
    import shutil

    copy = tmp_path / "t.ammo"
    shutil.copytree(shared[2], copy)
    with open(copy / "meta.npz", "ab") as fh:
        fh.write(b"\0")
    result = invoke("predict", copy, shared[1])
    assert result.exit_code == 2 and "sha256" in result.output


def test_evaluate_prints_n_and_intervals_on_the_test_split(shared, lesions):
    _, data, bundle = shared
    ds, rows = lesions
    result = invoke("evaluate", bundle, "--data", data, "--replicates", "300")
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"{len(rows)} samples of {len(set(ds.patient[rows]))} patients" in out
    assert "95% CI" in out and "sensitivity" in out and "specificity" in out and "npv" in out
    assert "malignant called benign" in out and "Confusion matrix" in out

    report = json.loads(invoke("evaluate", bundle, "--data", data, "--replicates", "300", "--json").output)
    assert report["split"] == "test" and report["n"] == len(rows) and report["same_data"] is True
    malignant = int(np.sum(np.isin(ds.label[rows], (2, 4))))
    assert report["metrics"]["sensitivity"]["n"] == malignant
    assert report["metrics"]["malignant called benign"]["n"] == malignant
    assert sum(map(sum, report["confusion_matrix"]["counts"])) == len(rows)
    for m in report["metrics"].values():
        if m["low"] is not None:
            assert m["low"] <= m["value"] <= m["high"]
    b = Bundle.load(bundle)
    pred = b.decide(b.predict_proba(ds.x[rows]))
    truth = (np.isin(ds.label[rows], (2, 4))).astype(int)
    assert report["metrics"]["accuracy"]["value"] == pytest.approx(np.mean(pred == truth))


def test_evaluate_flags_data_of_another_bit_depth(shared, tmp_path):
    from conftest import make_dataset

    # The shared bundle was trained on 8-bit patches; these are 12-bit.
    deep = make_dataset(dtype=np.uint16).save(tmp_path / "deep.npz")
    result = CliRunner().invoke(cli, ["evaluate", str(shared[2]), "--data", str(deep), "--replicates", "100"])
    assert result.exit_code == 0, result.output
    assert "the bundle scales pixels by 255" in result.output and "uint16" in result.output
    as_json = CliRunner().invoke(cli, ["evaluate", str(shared[2]), "--data", str(deep), "--replicates", "100",
                                       "--json"])
    report = json.loads(as_json.stdout)
    assert report["dtype"] == "uint16" and "scales pixels by 255" in report["warnings"][0]


def test_evaluate_needs_a_test_split(shared, tmp_path):
    ds = load_dataset(shared[1])
    from automammo.dataset import Dataset

    Dataset.create(ds.x, ds.label, ds.pair, ds.patient, np.full(len(ds), "train")).save(tmp_path / "train.npz")
    result = invoke("evaluate", shared[2], "--data", tmp_path / "train.npz")
    assert result.exit_code == 2 and "no test samples" in result.output


def test_ensemble_by_minimum_sensitivity_shows_specificity_once(shared, tmp_path):
    result = invoke("ensemble", shared[0], "--meta", "logistic", "--top", "2", "--folds", "3",
                    "--min-sensitivity", "0.9", "--out", tmp_path / "screen")
    assert result.exit_code == 0, result.output
    # The score is the specificity then: one column for it, beside the sensitivity.
    header = next(line for line in result.output.splitlines() if "meta-learner" in line and "┃" in line)
    assert header.count("specificity") == 1 and header.count("sensitivity") == 1, header
    assert "highest specificity with sensitivity >= 0.9" in result.output


def test_inputs_of_another_bit_depth_are_flagged_even_beside_inputs_of_the_right_one(capsys):
    from types import SimpleNamespace

    from automammo.cli_bundle import _warn_bit_depth

    deep = SimpleNamespace(members=[SimpleNamespace(preprocessing=SimpleNamespace(scale_max=4095.0))])
    _warn_bit_depth(deep, {"uint16"})
    assert capsys.readouterr().err == ""
    _warn_bit_depth(deep, {"uint16", "uint8"})
    assert "scales pixels by 4095 (its training data), but some of the inputs are uint8" in \
        " ".join(capsys.readouterr().err.split())
