"""The bundle: round trip in a fresh process, and every way a bundle from others is refused."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from _fixtures_bundle import finished_bundle, finished_run
from automammo.bundle import Bundle, write_bundle
from automammo.dataset import load as load_dataset
from automammo.errors import BundleError


@pytest.fixture(scope="module")
def bundle_dir():
    return finished_bundle()


@pytest.fixture(scope="module")
def test_patches():
    _, data = finished_run()
    ds = load_dataset(data)
    rows = np.flatnonzero((ds.split == "test") & (ds.label > 0))
    return ds.x[rows]


@pytest.fixture
def copy(bundle_dir, tmp_path):
    """A private copy of the shared bundle, to tamper with."""
    target = tmp_path / "copy.ammo"
    shutil.copytree(bundle_dir, target)
    return target


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _rewrite(path, manifest):
    (path / "manifest.json").write_text(json.dumps(manifest))


def _rehash(path, name):
    manifest = _manifest(path)
    manifest["files"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    _rewrite(path, manifest)


def test_layout_and_manifest(bundle_dir):
    manifest = _manifest(bundle_dir)
    assert manifest["format"] == "automammo-bundle" and manifest["format_version"] == 1
    files = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()}
    assert files == set(manifest["files"]) | {"manifest.json"}
    assert manifest["meta_learner"]["file"] == "meta.npz"
    assert manifest["oof"]["file"] == "oof.npz"
    assert all(f.startswith("members/") and f.endswith(".keras")
               for f in files - {"manifest.json", "meta.npz", "oof.npz"})
    assert manifest["task"] == {"name": "benign-malignant", "classes": ["benign", "malignant"], "positive": 1}
    assert manifest["objective"]["name"] == "f2" and manifest["image_size"] == 32
    for member in manifest["members"]:
        assert member["builder"] == "scratch_cnn" and member["inputs"] == "single" and member["hyperparameters"]
    assert {"tensorflow", "keras", "numpy", "scikit-learn"} <= set(manifest["versions"])
    assert manifest["validation"]["metrics"]["f2"]["n"] == manifest["validation"]["n"]
    assert not list(bundle_dir.parent.glob(".*.tmp")), "no temporary directory is left behind"


def test_round_trip_in_a_fresh_process_predicts_the_same(bundle_dir, test_patches, tmp_path):
    here = Bundle.load(bundle_dir).predict_proba(test_patches)
    np.save(tmp_path / "x.npy", test_patches)
    script = textwrap.dedent(f"""
        import numpy as np
        from automammo.bundle import Bundle
        b = Bundle.load({str(bundle_dir)!r})
        np.save({str(tmp_path / "p.npy")!r}, b.predict_proba(np.load({str(tmp_path / "x.npy")!r})))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    there = np.load(tmp_path / "p.npy")
    np.testing.assert_allclose(there, here, atol=1e-6)
    np.testing.assert_allclose(here.sum(axis=1), 1.0, atol=1e-9)


def test_patches_of_other_sizes_are_resized_by_the_stored_preprocessing(bundle_dir, test_patches):
    b = Bundle.load(bundle_dir)
    mixed = [test_patches[0], np.kron(test_patches[1], np.ones((2, 2), dtype=np.uint8))]
    p = b.predict_proba(mixed)
    # Same pixels in a batch of another size: equal up to float32 kernel rounding.
    np.testing.assert_allclose(p[0], b.predict_proba(test_patches[:1])[0], atol=1e-5)
    assert p.shape == (2, 2)
    assert set(b.decide(p)) <= {0, 1}


def test_a_tampered_member_is_refused(copy):
    member = next((copy / "members").glob("*.keras"))
    data = bytearray(member.read_bytes())
    data[len(data) // 2] ^= 0xFF
    member.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        Bundle.load(copy)


def test_an_unknown_format_version_is_refused(copy):
    manifest = _manifest(copy)
    manifest["format_version"] = 2
    _rewrite(copy, manifest)
    with pytest.raises(BundleError, match="format version 2 is not supported"):
        Bundle.load(copy)


@pytest.mark.parametrize("path", ["../outside.keras", "members/../../outside.keras", "/etc/passwd.keras",
                                  "members\\..\\x.keras"])
def test_a_path_leaving_the_bundle_is_refused(copy, path):
    (copy.parent / "outside.keras").write_bytes(b"x")
    manifest = _manifest(copy)
    manifest["members"][0]["file"] = path
    manifest["files"][path] = hashlib.sha256(b"x").hexdigest()
    _rewrite(copy, manifest)
    with pytest.raises(BundleError, match="outside the bundle|plain relative path"):
        Bundle.load(copy)


def test_a_symbolic_link_out_of_the_bundle_is_refused(copy):
    member = next((copy / "members").glob("*.keras"))
    outside = copy.parent / "elsewhere.keras"
    shutil.move(member, outside)
    member.symlink_to(outside)
    with pytest.raises(BundleError, match="resolves outside"):
        Bundle.load(copy)


def _lambda_model(path):
    import keras

    inp = keras.Input((32, 32, 1), name="lesion")
    x = keras.layers.Lambda(lambda t: t * 2.0)(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="probabilities")(x)).save(path)


def test_a_member_with_a_lambda_layer_is_refused(copy, tmp_path):
    member = next((copy / "members").glob("*.keras"))
    _lambda_model(tmp_path / "lambda.keras")
    shutil.copyfile(tmp_path / "lambda.keras", member)
    _rehash(copy, member.relative_to(copy).as_posix())
    with pytest.raises(BundleError, match="Lambda"):
        Bundle.load(copy)


def test_a_member_referring_to_code_outside_keras_is_refused(copy):
    member = next((copy / "members").glob("*.keras"))
    with zipfile.ZipFile(member) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    config = json.loads(entries["config.json"])
    config["config"]["layers"][1]["module"] = "os"
    config["config"]["layers"][1]["registered_name"] = "system"
    entries["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(member, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    _rehash(copy, member.relative_to(copy).as_posix())
    with pytest.raises(BundleError, match="outside Keras"):
        Bundle.load(copy)


def test_a_pickle_in_place_of_the_meta_learner_is_never_loaded(copy):
    (copy / "meta.npz").write_bytes(pickle.dumps({"coef": np.ones(3)}))
    _rehash(copy, "meta.npz")
    with pytest.raises(BundleError, match="pickle"):
        Bundle.load(copy)
    # An .npz holding an object array (which would need pickle) is refused as well.
    np.savez(copy / "meta.npz", coef=np.array([{"a": 1}], dtype=object))
    _rehash(copy, "meta.npz")
    with pytest.raises(BundleError, match="pickle"):
        Bundle.load(copy)


def test_a_meta_file_that_is_not_npz_is_refused(copy):
    shutil.move(copy / "meta.npz", copy / "meta.pkl")
    manifest = _manifest(copy)
    manifest["files"]["meta.pkl"] = manifest["files"].pop("meta.npz")
    manifest["meta_learner"]["file"] = "meta.pkl"
    _rewrite(copy, manifest)
    with pytest.raises(BundleError, match="not a .npz"):
        Bundle.load(copy)


def test_unlisted_missing_or_unreadable_files_are_refused(copy):
    (copy / "extra.py").write_text("print('hello')")
    with pytest.raises(BundleError, match="extra.py is not listed"):
        Bundle.load(copy)
    (copy / "extra.py").unlink()
    (copy / "meta.npz").unlink()
    with pytest.raises(BundleError, match="meta.npz is missing"):
        Bundle.load(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        Bundle.load(copy)
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.load(copy / "members")


def test_mutated_manifest_bytes_give_a_clean_error_or_the_same_bundle(bundle_dir, tmp_path, test_patches):
    rng = np.random.default_rng(0)
    original = (bundle_dir / "manifest.json").read_bytes()
    target = tmp_path / "fuzz.ammo"
    shutil.copytree(bundle_dir, target)
    expected = None
    for _ in range(25):
        data = bytearray(original)
        for pos in rng.integers(0, len(data), rng.integers(1, 4)):
            data[pos] = rng.integers(0, 256)
        (target / "manifest.json").write_bytes(bytes(data))
        try:
            b = Bundle.load(target)
        except BundleError:
            continue
        if expected is None:
            expected = Bundle.load(bundle_dir).predict_proba(test_patches[:4])
        assert np.all(np.isfinite(b.predict_proba(test_patches[:4])))


def test_a_failed_export_check_leaves_nothing(bundle_dir, tmp_path):
    source = Bundle.load(bundle_dir)
    manifest = {k: v for k, v in source.manifest.items() if k not in ("format", "format_version", "files")}
    members = [(bundle_dir / m["file"], m["file"]) for m in manifest["members"]]

    def refuse(bundle):
        raise BundleError("check failed")

    with pytest.raises(BundleError, match="check failed"):
        write_bundle(tmp_path / "never.ammo", manifest, members, source.meta, check=refuse)
    assert list(tmp_path.iterdir()) == []
    written = write_bundle(tmp_path / "ok.ammo", manifest, members, source.meta)
    assert Bundle.load(written).threshold == source.threshold


def _pair_bundle(tmp_path):
    """A bundle of one lesion+baseline member, written through the normal writer."""
    import keras

    from automammo.preprocess import Preprocessing
    from automammo_plugins.meta_learners import Mean

    lesion, baseline = keras.Input((16, 16, 1), name="lesion"), keras.Input((16, 16, 1), name="baseline")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Subtract()([lesion, baseline]))
    out = keras.layers.Dense(2, activation="softmax", name="probabilities")(x)
    keras.Model({"lesion": lesion, "baseline": baseline}, out).save(tmp_path / "pair.keras")
    prep = Preprocessing(16, 255.0).to_dict()
    manifest = {
        "task": {"name": "benign-malignant", "classes": ["benign", "malignant"], "positive": 1},
        "threshold": 0.5, "threshold_rule": {"rule": "fixed", "objective": None},
        "objective": {"name": "auc", "direction": "max"}, "features": "probs",
        "preprocessing": prep, "image_size": 16,
        "members": [{"file": "members/m0-pair.keras", "builder": "toy", "trial_id": "0", "run": "",
                     "inputs": "pair", "feature_size": 2, "hyperparameters": {}, "preprocessing": prep}],
        "meta_learner": {"selection": "given"}, "validation": {}, "data": {}, "versions": {},
    }
    meta = Mean(2).fit(np.array([[0.2, 0.8], [0.7, 0.3]]), np.array([1, 0]))
    return write_bundle(tmp_path / "pair.ammo", manifest, [(tmp_path / "pair.keras", "members/m0-pair.keras")], meta)


def test_a_pair_bundle_needs_and_uses_baselines(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from automammo.cli import cli

    b = Bundle.load(_pair_bundle(tmp_path))
    assert b.needs_baseline
    rng = np.random.default_rng(0)
    lesions, baselines = rng.integers(0, 256, (2, 3, 16, 16), dtype=np.uint8)
    p = b.predict_proba(lesions, baselines)
    assert p.shape == (3, 2)
    assert not np.allclose(p, b.predict_proba(lesions, lesions))  # the baseline is an input
    with pytest.raises(BundleError, match="baseline"):
        b.predict_proba(lesions)
    Image.fromarray(lesions[0]).save(tmp_path / "l.png")
    Image.fromarray(baselines[0]).save(tmp_path / "b.png")
    ok = CliRunner().invoke(cli, ["predict", str(b.path), str(tmp_path / "l.png"),
                                  "--baseline", str(tmp_path / "b.png"), "--out", str(tmp_path / "p.csv")])
    assert ok.exit_code == 0, ok.output
    assert f"{p[0, 1]:.6f}" in (tmp_path / "p.csv").read_text()
    missing = CliRunner().invoke(cli, ["predict", str(b.path), str(tmp_path / "l.png")])
    assert missing.exit_code == 2 and "--baseline" in missing.output


def test_out_of_fold_arrays_of_the_wrong_shape_are_refused(tmp_path):
    from automammo.bundle import read_oof

    np.savez(tmp_path / "oof.npz", rows=np.arange(4), y_true=np.zeros(4, int), y_prob=np.zeros((4, 3)),
             decisions=np.zeros(4, int), groups=np.array(["p"] * 4))
    manifest = {"oof": {"file": "oof.npz"}, "files": {"oof.npz": "0" * 64},
                "task": {"classes": ["benign", "malignant"]}}
    with pytest.raises(BundleError, match="oof.npz: arrays of inconsistent shapes"):
        read_oof(tmp_path, manifest)
    np.savez(tmp_path / "oof.npz", rows=np.arange(4))
    with pytest.raises(BundleError, match="not the out-of-fold arrays"):
        read_oof(tmp_path, manifest)
    assert read_oof(tmp_path, {"files": {}}) is None
