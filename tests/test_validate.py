"""`automammo validate`: re-training a trial over seeds and patient-grouped folds."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from _fixtures_report import logged_bundle, logged_run
from automammo.cli import cli
from automammo.dataset import load as load_dataset
from automammo.errors import RunError
from automammo.preprocess import Preprocessing
from automammo.render import render_validation
from automammo.runs import Run
from automammo.tasks import get_task
from automammo.validate import partitions, recipes, summarize, train_arrays, validate


@pytest.fixture(scope="module")
def shared():
    run_dir, data = logged_run()
    return run_dir, data


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def arrays_of(run_dir):
    config = Run(run_dir).config()
    task = get_task(config["task"]["name"])
    ds = load_dataset(config["data"])
    return ds, task, config, train_arrays(ds, task, Preprocessing.from_dict(config["preprocessing"]), pair=False)


@pytest.fixture(scope="module")
def validated(shared):
    """2 repeats x 2 patient-grouped folds of the second-best trial, 1 epoch each, via the CLI."""
    run_dir, _ = shared
    trial = Run(run_dir).ranked("max")[1]["trial_id"]
    result = invoke("validate", run_dir, "--trial", trial, "--repeats", "2", "--folds", "2", "--epochs", "1",
                    "--seed", "7", "--json")
    assert result.exit_code == 0, result.output
    return trial, json.loads(result.stdout)


def test_mean_and_sd_are_those_of_the_reported_trainings(validated):
    _, result = validated
    (model,) = result["models"]
    units = model["units"]
    assert [(u["repeat"], u["fold"], u["seed"]) for u in units] == [(1, 1, 7), (1, 2, 7), (2, 1, 8), (2, 2, 8)]
    assert set(model["summary"]) >= {"f2", "auc", "loss", "accuracy", "f2_best", "f2_threshold"}
    for name, s in model["summary"].items():
        values = np.array([u["scores"][name] for u in units if u["scores"].get(name) is not None], dtype=float)
        assert s["n"] == len(values) == 4
        assert s["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert s["sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert (s["min"], s["max"]) == (pytest.approx(values.min()), pytest.approx(values.max()))
    for u in units:
        assert u["epochs"] == 1 and u["best_epoch"] == 1
        assert 0.0 <= u["scores"]["auc"] <= 1.0 and u["scores"]["loss"] > 0


def test_each_repeat_holds_out_every_training_sample_once(validated, shared):
    _, result = validated
    _, _, _, arrays = arrays_of(shared[0])
    units = result["models"][0]["units"]
    for repeat in (1, 2):
        folds = [u for u in units if u["repeat"] == repeat]
        assert sum(u["n_validation"] for u in folds) == len(arrays.y)
        assert all(u["n_fit"] + u["n_validation"] == len(arrays.y) for u in folds)
    assert result["design"]["folds"] == 2 and result["design"]["repeats"] == 2


def test_validation_records_the_trial_and_renders_in_80_columns(validated, shared):
    trial, result = validated
    record = next(t for t in Run(shared[0]).trials() if t["trial_id"] == trial)
    (model,) = result["models"]
    assert model["trial_id"] == trial and model["builder"] == "scratch_cnn"
    assert model["recorded"] == record["metrics"]
    assert model["hyperparameters"] == record["hyperparameters"]
    buffer = io.StringIO()
    render_validation(result, Console(file=buffer, width=80, color_system=None))
    text = buffer.getvalue()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "mean +- sd" in text and f"trial {trial}" in text and "2 x 2-fold" in text


def test_without_folds_the_run_own_split_is_used(shared):
    run_dir, _ = shared
    ds, task, config, arrays = arrays_of(run_dir)
    ((fold, fit, held),) = partitions(arrays, task, config["search"], None, repeat_seed=123)
    rows = task.indices(ds, "train")
    stored = Run(run_dir).load_preds(Run(run_dir).trials()[0]["trial_id"])
    assert fold is None
    assert np.array_equal(np.sort(rows[held]), np.sort(stored["index"]))  # the search's validation rows
    assert not set(rows[fit]) & set(rows[held])


def test_folds_never_split_a_patient_and_change_with_the_repeat(shared):
    ds, task, config, arrays = arrays_of(shared[0])
    first = partitions(arrays, task, config["search"], 3, repeat_seed=0)
    for _, fit, held in first:
        assert not set(arrays.patient[fit]) & set(arrays.patient[held])
    assert np.array_equal(np.sort(np.concatenate([h for _, _, h in first])), np.arange(len(arrays.y)))
    other = partitions(arrays, task, config["search"], 3, repeat_seed=1)
    assert any(not np.array_equal(a[2], b[2]) for a, b in zip(first, other))


def test_recorded_hyperparameters_rebuild_the_trial_architecture(shared):
    import keras
    import keras_tuner as kt

    from automammo import registry
    from automammo.builders import BuildContext

    run_dir, _ = shared
    run = Run(run_dir)
    for record in run.trials():
        _, (recipe,) = recipes(run_dir, record["trial_id"])
        builder = registry.get("builder", recipe.builder)(BuildContext(image_size=32, n_classes=2))
        hp = kt.HyperParameters()
        hp.values.update(recipe.hyperparameters)
        rebuilt = builder.build(hp)
        saved = keras.saving.load_model(run.model_path(record["trial_id"]), compile=False)
        assert rebuilt.count_params() == saved.count_params()
        assert [type(layer).__name__ for layer in rebuilt.layers] == [type(layer).__name__ for layer in saved.layers]


def test_bundle_members_are_the_recipes_and_a_lost_run_is_named(shared, tmp_path):
    bundle = logged_bundle()
    manifest = json.loads((bundle / "manifest.json").read_text())
    kind, todo = recipes(bundle)
    assert kind == "bundle"
    assert [(r.builder, r.trial_id) for r in todo] == [(m["builder"], m["trial_id"]) for m in manifest["members"]]
    with pytest.raises(RunError, match="--trial applies to runs"):
        recipes(bundle, "0")
    moved = tmp_path / "moved.ammo"
    shutil.copytree(bundle, moved)
    text = (moved / "manifest.json").read_text().replace(str(shared[0]), str(tmp_path / "gone"))
    (moved / "manifest.json").write_text(text)
    with pytest.raises(RunError, match="which is gone"):
        recipes(moved)


def test_a_bundle_that_fails_its_integrity_check_is_validated_with_a_note(tmp_path):
    copy = tmp_path / "t.ammo"
    shutil.copytree(logged_bundle(), copy)
    with open(copy / "meta.npz", "ab") as fh:
        fh.write(b"\0")
    said = []
    result = validate(copy, repeats=1, epochs=1, progress=said.append)
    assert len(result["warnings"]) == 1 and "meta.npz does not match its sha256" in result["warnings"][0]
    assert said[0].startswith("warning: integrity check failed")
    assert len(result["models"]) == len(json.loads((copy / "manifest.json").read_text())["members"])


def test_unknown_or_failed_trials_are_one_line_errors(shared, tmp_path):
    run_dir, _ = shared
    result = invoke("validate", run_dir, "--trial", "nope")
    assert result.exit_code == 2 and "no trial 'nope'; recorded: 0, 1, 2" in result.output
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("tuner", "logs"))
    with open(copy / "trials.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"trial_id": "5", "status": "FAILED", "builder": "scratch_cnn", "hyperparameters": {},
                             "error": "ResourceExhaustedError: out of memory"}) + "\n")
    result = invoke("validate", copy, "--trial", "5")
    assert result.exit_code == 2 and "out of memory" in result.output and "Traceback" not in result.output


def test_summary_leaves_out_missing_scores_and_has_no_sd_for_one_value():
    units = [{"scores": {"auc": 0.7, "f2": None}}, {"scores": {"auc": 0.9, "f2": 0.5}}]
    s = summarize(units)
    assert s["auc"]["mean"] == pytest.approx(0.8) and s["auc"]["sd"] == pytest.approx(np.std([0.7, 0.9], ddof=1))
    assert s["f2"] == {"mean": 0.5, "sd": None, "min": 0.5, "max": 0.5, "n": 1}


def test_a_k_fold_run_is_repeated_on_its_own_folds(shared):
    from automammo.splits import grouped_folds

    ds, task, config, arrays = arrays_of(shared[0])
    search = {**config["search"], "folds": 3, "seed": 5}
    own = partitions(arrays, task, search, None, repeat_seed=99)
    expected = grouped_folds(arrays.y, arrays.patient, 3, 5)
    assert [k for k, _, _ in own] == [1, 2, 3]
    for (_, fit, held), (e_fit, e_held) in zip(own, expected):
        assert np.array_equal(fit, e_fit) and np.array_equal(held, e_held)
