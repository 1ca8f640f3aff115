"""The search end to end: run layout, records, resume, refusals, bad input through the CLI."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from automammo.cli import cli
from automammo.errors import AutomammoError, DataError, RunError
from automammo.runs import Run
from automammo.search import SearchConfig, run_search


def _config(path, **kw):
    base = dict(data=str(path), task="benign-malignant", objective="f2", builders=["scratch_cnn"],
                trials=2, epochs=2, image_size=32, tensorboard=False)
    base.update(kw)
    return SearchConfig(**base)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_dataset_path):
    run_dir = tmp_path_factory.mktemp("runs") / "r"
    result = run_search(_config(small_dataset_path, trials=2, tensorboard=True), run_dir)
    return result


def test_run_layout_and_records(finished_run):
    run = Run(finished_run.run_dir)
    config = run.config()
    assert config["task"]["classes"] == ["benign", "malignant"]
    assert len(config["data_fingerprint"]) == 64 and "tensorflow" in config["versions"]
    assert "opencv-python-headless" in config["versions"]  # it resamples augmented patches
    trials = run.trials()
    assert len(trials) == 2
    for t in trials:
        assert t["status"] == "COMPLETED" and t["builder"] == "scratch_cnn"
        assert {"f2", "auc", "accuracy", "loss", "f2_best", "f2_threshold"} <= set(t["metrics"])
        # Binary F2 trials are scored at their validation-optimal threshold; 0.5 is kept too.
        assert t["score_key"] == "f2_best"
        assert t["score"] == pytest.approx(t["metrics"]["f2_best"]) and t["score"] >= t["metrics"]["f2"]
        assert 1 <= t["epochs"] <= 2 and t["seconds"] > 0
        assert "learning_rate" in t["hyperparameters"]
        preds = run.load_preds(t["trial_id"])
        assert preds["y_prob"].shape == (len(preds["index"]), 2)
    assert finished_run.best["score"] == max(t["score"] for t in trials)
    assert any(run.logs_dir.rglob("events.out.tfevents*"))


def test_best_model_reproduces_the_recorded_score(finished_run, small_dataset):
    from automammo import registry
    from automammo.preprocess import Preprocessing

    run = Run(finished_run.run_dir)
    best = finished_run.best
    model = keras.saving.load_model(run.best_model_path, safe_mode=True)
    preds = run.load_preds(best["trial_id"])
    prep = Preprocessing.from_dict(run.config()["preprocessing"])
    p = model.predict(prep.apply(small_dataset.x[preds["index"]]), verbose=0)
    np.testing.assert_allclose(p, preds["y_prob"], atol=1e-4)
    _, f2 = registry.objectives()["f2"].best_threshold(preds["y_true"], p, 1)
    assert f2 == pytest.approx(best["score"], abs=1e-6)


def test_score_is_the_kept_model_after_the_warm_up(tmp_path, small_dataset_path):
    """A thresholded objective skips a warm-up (min(patience, epochs // 4) epochs) in early
    stopping, in the trial's score and in its best epoch alike, so the oracle scores the very
    model that is saved; Keras Tuner's checkpoint holds it too, written once."""
    from automammo import registry

    result = run_search(_config(small_dataset_path, trials=2, epochs=8, patience=2), tmp_path / "r")
    run = Run(result.run_dir)
    f2 = registry.objectives()["f2"]
    for t in run.trials():
        assert t["status"] == "COMPLETED" and t["best_epoch"] >= 3
        preds = run.load_preds(t["trial_id"])
        assert f2.best_threshold(preds["y_true"], preds["y_prob"].astype(np.float64), 1)[1] == pytest.approx(
            t["score"], abs=1e-6)
        assert t["score"] == pytest.approx(t["history"]["val_f2_best"][t["best_epoch"] - 1])
    assert len(list((run.path / "tuner").rglob("checkpoint.weights.h5"))) == 2


def test_restored_epoch_counts_the_warm_up_in_absolute_epochs():
    from automammo.search import restored_epoch

    # A phase that starts at absolute epoch 2 with a warm-up of 2: nothing of it is skipped.
    assert restored_epoch([0.9, 0.5, 0.6], "max", 2, [2, 3, 4]) == 0
    # From epoch 0, the first two are the warm-up, whatever they scored.
    assert restored_epoch([0.9, 0.5, 0.6], "max", 2, [0, 1, 2]) == 2
    # Ties go to the first, as EarlyStopping's strict improvement does; min objectives too.
    assert restored_epoch([0.7, 0.7, 0.7], "max", 0, [0, 1, 2]) == 0
    assert restored_epoch([0.5, 0.3, 0.4], "min", 1, [0, 1, 2]) == 1
    # All in the warm-up: EarlyStopping restores nothing, the last epoch stays.
    assert restored_epoch([0.9, 0.5], "max", 4, [0, 1]) == 1
    assert restored_epoch([None, float("nan")], "max", 0, [0, 1]) is None
    assert restored_epoch([], "max", 0, []) is None


def test_threshold_free_objectives_have_no_warm_up(tmp_path, small_dataset_path):
    result = run_search(_config(small_dataset_path, objective="auc", trials=1, epochs=8, patience=1), tmp_path / "r")
    t = result.trials[0]
    series = t["history"]["val_auc"]
    # Patience 1 from the first epoch: training ends one epoch after its best.
    assert t["epochs"] == min(8, int(np.nanargmax(series)) + 2) and t["best_epoch"] == int(np.nanargmax(series)) + 1


def test_hyperband_continues_trials_with_their_optimizer_state(tmp_path, small_dataset_path):
    """A Hyperband round resumes a trial from its checkpoint: weights and optimizer moments
    both load (Keras would skip the moments of an unbuilt optimizer, with a warning)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_search(_config(small_dataset_path, tuner="hyperband", epochs=3, image_size=16), tmp_path / "r")
    run = Run(result.run_dir)
    trials = run.trials()
    continued = [t for t in trials if t["hyperparameters"].get("tuner/trial_id")]
    assert continued and all(t["status"] == "COMPLETED" for t in trials)
    ids = {t["trial_id"] for t in trials}
    assert all(t["hyperparameters"]["tuner/trial_id"] in ids for t in continued)
    # Each trial trains its Hyperband budget: from tuner/initial_epoch to tuner/epochs.
    budgets = [(t["hyperparameters"]["tuner/initial_epoch"], t["hyperparameters"]["tuner/epochs"]) for t in trials]
    assert [t["epochs"] for t in trials] == [last - first for first, last in budgets]
    assert min(last for _, last in budgets) < 3 and all(first > 0 for first, _ in
                                                        (budgets[trials.index(t)] for t in continued))
    skipped = [str(w.message) for w in caught if "Skipping variable loading" in str(w.message)]
    assert not skipped, skipped


def test_validation_is_patient_disjoint_from_fit(finished_run, small_dataset):
    run = Run(finished_run.run_dir)
    val_rows = run.load_preds(run.trials()[0]["trial_id"])["index"]
    train_rows = np.flatnonzero((small_dataset.split == "train") & (small_dataset.label > 0))
    fit_rows = np.setdiff1d(train_rows, val_rows)
    assert not set(small_dataset.patient[val_rows]) & set(small_dataset.patient[fit_rows])
    assert not np.any(small_dataset.split[val_rows] == "test")


def test_existing_run_is_never_overwritten(finished_run, small_dataset_path):
    with pytest.raises(RunError, match="--resume .* --overwrite"):
        run_search(_config(small_dataset_path), finished_run.run_dir)


def test_overwrite_replaces_a_run_only_once_the_new_search_checks_out(finished_run, tmp_path):
    import shutil

    from automammo.errors import AutomammoError

    copy = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, copy, ignore=shutil.ignore_patterns("tuner"))
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    with pytest.raises(AutomammoError, match="missing.npz"):
        run_search(_config(tmp_path / "missing.npz"), copy, overwrite=True)
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before


def test_overwrite_never_empties_a_folder_that_holds_no_run(tmp_path, small_dataset_path):
    folder = tmp_path / "patches"
    (folder / "benign").mkdir(parents=True)
    (folder / "benign" / "a.png").write_bytes(b"not really")
    for overwrite in (False, True):
        with pytest.raises(RunError, match="is not empty and holds no run"):
            run_search(_config(small_dataset_path), folder, overwrite=overwrite)
    assert (folder / "benign" / "a.png").read_bytes() == b"not really"


def test_a_run_under_a_file_is_one_line(tmp_path, small_dataset_path):
    with pytest.raises(RunError, match="is a file, not a directory"):
        run_search(_config(small_dataset_path), small_dataset_path / "run")


def test_resume_extends_without_duplicates(tmp_path, small_dataset_path):
    run_dir = tmp_path / "r"
    run_search(_config(small_dataset_path, trials=1, epochs=1), run_dir)
    result = run_search(_config(small_dataset_path, trials=2, epochs=1), run_dir, resume=True)
    ids = [t["trial_id"] for t in result.trials]
    assert len(ids) == 2 and len(set(ids)) == 2
    lines = (run_dir / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)


def test_resume_refuses_changed_data(tmp_path, small_dataset_path, small_dataset):
    run_dir = tmp_path / "r"
    data = tmp_path / "d.npz"
    small_dataset.save(data)
    run_search(_config(data, trials=1, epochs=1), run_dir)
    from conftest import make_dataset

    make_dataset(seed=5).save(data)
    with pytest.raises(RunError, match="data changed"):
        run_search(None, run_dir, resume=True)


def test_empty_class_is_refused_before_anything_is_written(tmp_path, small_dataset):
    arrays = dict(x=small_dataset.x, label=small_dataset.label.copy(), pair=small_dataset.pair,
                  patient=small_dataset.patient, split=small_dataset.split)
    arrays["label"][arrays["label"] == 2] = 1
    arrays["label"][arrays["label"] == 4] = 3
    from automammo.dataset import Dataset

    path = tmp_path / "benign_only.npz"
    Dataset.create(**arrays).save(path)
    with pytest.raises(DataError, match="no 'malignant' samples in train"):
        run_search(_config(path), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_objective_for_binary_tasks_only(tmp_path, small_dataset_path):
    with pytest.raises(AutomammoError, match="binary tasks only"):
        run_search(_config(small_dataset_path, task="diagnosis", objective="sens_at_spec90"), tmp_path / "r")


@pytest.mark.parametrize("args, message", [
    (["--task", "malignancy"], "unknown task 'malignancy'; known: abnormality"),
    (["--objective", "f3"], "unknown objective 'f3'; known: accuracy, auc"),
    (["--builder", "resnet9000"], "unknown builder 'resnet9000'"),
    (["--data", "missing.npz"], "missing.npz: no such file"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["search", "--run", str(tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["--meta", "nope"], "unknown meta-learner 'nope'; known:"),
    (["--task", "diagnosis", "--min-sensitivity", "0.9"], "--min-sensitivity applies to binary tasks"),
])
def test_cli_ensemble_options_are_checked_before_the_search(tmp_path, small_dataset_path, args, message):
    result = CliRunner().invoke(cli, ["search", "--data", str(small_dataset_path), "--run", str(tmp_path / "r"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "r").exists()


def test_cli_resume_refuses_other_settings_and_follows_moved_data(tmp_path, small_dataset):
    data, run_dir = tmp_path / "d.npz", tmp_path / "r"
    small_dataset.save(data)
    run_search(_config(data, trials=1, epochs=1, ensemble=False), run_dir)  # as with --no-ensemble
    before = (run_dir / "trials.jsonl").read_text()
    refused = CliRunner().invoke(cli, ["search", "--run", str(run_dir), "--resume", "--task", "diagnosis",
                                       "--no-symmetries", "--builder", "scratch_cnn"])
    assert refused.exit_code == 2, refused.output
    message = " ".join(refused.output.split())
    assert "a resumed run keeps its settings; --task diagnosis (the run's: benign-malignant); " \
           "--symmetries off (the run's: on)" in message
    assert "--builder" not in message  # the same as the run's: not a change
    assert (run_dir / "trials.jsonl").read_text() == before
    moved = tmp_path / "moved.npz"
    data.rename(moved)
    result = CliRunner().invoke(cli, ["search", "--run", str(run_dir), "--resume", "--trials", "2", "--data", str(moved)])
    assert result.exit_code == 0, result.output
    assert len(Run(run_dir).trials()) == 2 and Run(run_dir).config()["data"] == str(moved)
    # The run was started without the ensemble stage; resuming it does not add one.
    assert not (tmp_path / "r.ammo").exists() and "bundle" not in result.output
    assert "continuing the tuner's saved state in" in result.output and "Reloading Tuner" not in result.output


def test_cli_search_end_to_end(tmp_path, small_dataset_path):
    run_dir = tmp_path / "cli-run"
    result = CliRunner().invoke(cli, ["search", "--data", str(small_dataset_path), "--task", "mass-calcification",
                                      "--objective", "auc", "--trials", "1", "--epochs", "1", "--image-size", "32",
                                      "--builder", "scratch_cnn", "--run", str(run_dir), "--no-tensorboard", "--no-ensemble"])
    assert result.exit_code == 0, result.output
    assert "best trial" in result.output
    assert (run_dir / "best.keras").exists()
    again = CliRunner().invoke(cli, ["search", "--data", str(small_dataset_path), "--run", str(run_dir)])
    assert again.exit_code == 2 and "--resume" in again.output


def test_same_seed_same_trials_and_metrics(tmp_path, small_dataset_path):
    runs = [run_search(_config(small_dataset_path, trials=2, epochs=2), tmp_path / f"r{i}") for i in range(2)]
    a, b = ([(t["hyperparameters"], t["metrics"], t["epochs"]) for t in r.trials] for r in runs)
    assert a == b


def test_folds_score_each_trial_by_the_mean(tmp_path, small_dataset_path, small_dataset):
    result = run_search(_config(small_dataset_path, trials=1, epochs=1, folds=3), tmp_path / "r")
    (trial,) = result.trials
    assert trial["folds"] == 3 and len(trial["fold_scores"]) == 3
    assert trial["score"] == pytest.approx(np.mean(trial["fold_scores"]), abs=1e-9)
    assert trial["metrics"]["f2_best"] == pytest.approx(np.mean(trial["fold_scores"]), abs=1e-9)
    # The kept predictions are fold 0's: one third of the training lesions, patient-disjoint.
    run = Run(result.run_dir)
    val_rows = run.load_preds(trial["trial_id"])["index"]
    n_train = int(np.sum((small_dataset.split == "train") & (small_dataset.label > 0)))
    assert 0.2 * n_train < len(val_rows) < 0.5 * n_train


def test_cli_default_job_on_the_phantom_exports_a_bundle(tmp_path):
    """The README's main job, shrunk: no --data means the phantom; ends with a bundle."""
    run_dir = tmp_path / "phantom-run"
    result = CliRunner().invoke(cli, ["search", "--task", "benign-malignant", "--objective", "f2",
                                      "--builder", "scratch_cnn", "--trials", "2", "--epochs", "2",
                                      "--image-size", "32", "--run", str(run_dir), "--no-tensorboard"])
    assert result.exit_code == 0, result.output
    assert "generating the digital phantom" in result.output
    bundle = tmp_path / "phantom-run.ammo"
    assert (bundle / "manifest.json").exists(), result.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["task"]["name"] == "benign-malignant" and 0 < manifest["threshold"] < 1
    assert "bundle" in result.output and "threshold" in result.output
