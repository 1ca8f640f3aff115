"""Thresholds, metrics with intervals, member choice, and the ensemble's data discipline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from sklearn import metrics as skm

from _fixtures_bundle import finished_run
from automammo import registry
from automammo.dataset import load as load_dataset
from automammo.ensemble import Candidate, ensemble_and_export, make_folds, select_members, stacking_rows
from automammo.errors import AutomammoError, RunError
from automammo.evaluation import (ThresholdRule, _weighted_auc, candidate_thresholds, clinical_metrics,
                                  cross_validated_decisions, min_sensitivity_threshold)
from automammo.runs import Run
from automammo.splits import fit_validation_split
from automammo.tasks import get_task

F2 = registry.get("objective", "f2")


def probs_of(p_pos):
    return np.stack([1 - p_pos, p_pos], axis=1)


# -- thresholds -------------------------------------------------------------------------------


def test_f2_threshold_on_a_constructed_example_is_the_known_optimum():
    # Negatives at .1 .2 .4, positives at .3 .6 .7. Cutting between .2 and .3 calls every
    # positive and one negative: F2 = 15/16, above every other cut (3 calls of 3 positives
    # and 3 negatives: 15/18; between .4 and .6: 10/14). The midpoint is 0.25.
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.4, 0.3, 0.6, 0.7])
    assert ThresholdRule(F2).choose(y, p, positive=1) == pytest.approx(0.25)


def test_f2_threshold_matches_a_brute_force_scan():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1).round(3)
    chosen = ThresholdRule(F2).choose(y, p, positive=1)
    grid = np.linspace(0, 1.001, 20021)
    called = p[None, :] >= grid[:, None]
    tp, fp = (called & (y == 1)).sum(1), (called & (y == 0)).sum(1)
    fn = (y == 1).sum() - tp
    scan = 5 * tp / (5 * tp + 4 * fn + fp)
    assert skm.fbeta_score(y, (p >= chosen).astype(int), beta=2) == pytest.approx(scan.max())


def test_min_sensitivity_picks_the_highest_specificity_at_that_sensitivity():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 400)
    p = np.clip(rng.normal(0.4 + 0.2 * y, 0.15), 0, 1)
    for target in (0.8, 0.9, 0.95):
        t = min_sensitivity_threshold(y == 1, p, target)
        sens, spec = np.mean(p[y == 1] >= t), np.mean(p[y == 0] < t)
        assert sens >= target
        grid = np.concatenate([np.unique(p), np.unique(p) + 1e-9])
        feasible = [np.mean(p[y == 0] < g) for g in grid if np.mean(p[y == 1] >= g) >= target]
        assert spec == pytest.approx(max(feasible))


def test_candidate_thresholds_sit_between_scores_and_cover_both_ends():
    t = candidate_thresholds(np.array([0.2, 0.2, 0.6, 0.9]))
    np.testing.assert_allclose(t, [0.1, 0.4, 0.75, 0.95])


def test_each_fold_is_decided_by_a_threshold_chosen_without_it():
    rng = np.random.default_rng(5)
    y = np.tile([0, 1], 30)
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.15), 0, 1)
    folds = [(np.setdiff1d(np.arange(60), f), f) for f in np.array_split(rng.permutation(60), 3)]
    rule = ThresholdRule(F2)
    decided, used = cross_validated_decisions(y, p, folds, rule, positive=1)
    for others, fold in folds:
        t = rule.choose(y[others], p[others], 1)
        assert np.all(used[fold] == t)
        np.testing.assert_array_equal(decided[fold], (p[fold] >= t).astype(int))


def test_a_threshold_free_objective_keeps_one_half():
    assert ThresholdRule(registry.get("objective", "auc")).choose(np.array([0, 1]), np.array([0.1, 0.9]), 1) == 0.5


# -- metrics -----------------------------------------------------------------------------------


def test_weighted_auc_equals_scikit_learn_with_ties_and_weights():
    rng = np.random.default_rng(6)
    s = rng.integers(0, 10, 200) / 10.0
    t = rng.integers(0, 2, 200).astype(bool)
    w = rng.integers(0, 4, (3, 200)).astype(float)
    for row in w:
        assert _weighted_auc(s, t, row[None])[0] == pytest.approx(skm.roc_auc_score(t, s, sample_weight=row))


def test_binary_metrics_equal_scikit_learn_with_sizes_and_intervals():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 120)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    pred = (p >= 0.45).astype(int)
    groups = np.repeat(np.arange(40), 3)
    r = clinical_metrics(y, probs_of(p), pred, ("benign", "malignant"), 1, groups, replicates=500)
    m = r["metrics"]
    assert r["n"] == 120 and r["n_patients"] == 40 and r["bootstrap"]["unit"] == "patient"
    assert m["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["auc"]["value"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["f2"]["value"] == pytest.approx(skm.fbeta_score(y, pred, beta=2))
    assert m["sensitivity"]["value"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"]["value"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["ppv"]["value"] == pytest.approx(skm.precision_score(y, pred))
    assert m["npv"]["value"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
    assert m["sensitivity"]["n"] == int(np.sum(y == 1)) and m["ppv"]["n"] == int(np.sum(pred == 1))
    assert m["malignant called benign"]["value"] == np.sum((y == 1) & (pred == 0))
    assert r["confusion_matrix"]["counts"] == skm.confusion_matrix(y, pred).tolist()
    for v in m.values():
        assert v["low"] <= v["value"] <= v["high"]


def test_patient_bootstrap_is_wider_than_sample_bootstrap_for_clustered_errors():
    # Whole patients are right or wrong: resampling patches would pretend to 4x the data.
    y = np.tile([0, 1], 80)
    groups = np.repeat(np.arange(40), 4)
    pred = np.where(np.repeat(np.arange(40) % 4 == 0, 4), 1 - y, y)
    p = probs_of(pred * 0.8 + 0.1)
    by_patient = clinical_metrics(y, p, pred, ("a", "b"), 1, groups)["metrics"]["accuracy"]
    by_sample = clinical_metrics(y, p, pred, ("a", "b"), 1, None)["metrics"]["accuracy"]
    assert by_patient["high"] - by_patient["low"] > 1.5 * (by_sample["high"] - by_sample["low"])


def test_multiclass_metrics_are_macro_averages():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 4, 200)
    p = rng.dirichlet(np.ones(4), 200) + 0.5 * np.eye(4)[y]
    p /= p.sum(1, keepdims=True)
    pred = p.argmax(1)
    task = get_task("diagnosis")
    r = clinical_metrics(y, p, pred, task.classes, None, replicates=200)
    m = r["metrics"]
    assert m["f1"]["value"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["auc"]["value"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))
    malignant, benign = [1, 3], [0, 2]
    assert m["malignant called benign"]["value"] == np.sum(np.isin(y, malignant) & np.isin(pred, benign))


# -- members -------------------------------------------------------------------------------------


def _fake(builder, trial):
    return Candidate(Run("/nonexistent"), {}, {"trial_id": trial, "builder": builder}, np.arange(3), np.zeros((3, 2)))


def test_diverse_takes_each_builders_best_before_any_second_best():
    ranked = [(_fake(b, str(i)), 1.0 - i / 10) for i, b in enumerate(["a", "a", "b", "a", "c", "b"])]
    plain = [c.trial_id for c, _ in select_members(ranked, 3, diverse=False)]
    diverse = [c.trial_id for c, _ in select_members(ranked, 4, diverse=True)]
    assert plain == ["0", "1", "2"]
    assert diverse == ["0", "2", "4", "1"]


def test_meta_learner_folds_count_patients_per_class_not_samples():
    from automammo.errors import DataError

    # Three malignant rows, all of one patient: no fold split can fit on both classes.
    y = np.array([0, 0, 1, 1, 1, 0])
    groups = np.array(["a", "b", "c", "c", "c", "d"])
    with pytest.raises(DataError, match="as few as 1 patients have a class: too few to cross-validate"):
        make_folds(y, groups, 5, seed=0)
    # Two patients per class: two folds, each fitted on both classes.
    groups = np.array(["a", "b", "c", "c", "e", "b"])
    folds = make_folds(y, groups, 5, seed=0)
    assert len(folds) == 2 and all(set(y[others]) == {0, 1} for others, _ in folds)
    for others, fold in folds:
        assert not set(groups[others]) & set(groups[fold])


def test_stacking_rows_are_those_every_run_held_out():
    a = Candidate(Run("/a"), {}, {"trial_id": "0"}, np.array([5, 1, 9, 3]), np.zeros((4, 2)))
    b = Candidate(Run("/b"), {}, {"trial_id": "0"}, np.array([3, 4, 5, 7]), np.zeros((4, 2)))
    np.testing.assert_array_equal(stacking_rows([a, b]), [3, 5])
    c = Candidate(Run("/c"), {}, {"trial_id": "0"}, np.array([2]), np.zeros((1, 2)))
    with pytest.raises(RunError, match="share no validation rows"):
        stacking_rows([a, c])


# -- the whole stage on a finished run ---------------------------------------------------------------


@pytest.fixture(scope="module")
def run_and_data():
    return finished_run()


def test_ensemble_fits_on_rows_no_member_trained_on_and_never_reads_test(run_and_data, tmp_path):
    run_dir, data = run_and_data
    result = ensemble_and_export([run_dir, run_dir], tmp_path / "e", top=2, folds=4)
    assert result.bundle == tmp_path / "e.ammo" and (result.bundle / "manifest.json").exists()
    ds = load_dataset(data)
    task = get_task("benign-malignant")
    rows = task.indices(ds, "train")
    fit_pos, val_pos = fit_validation_split(task.targets(ds.label[rows]), ds.patient[rows], 0.25, 0)
    fit_patients = set(ds.patient[rows[fit_pos]])
    stacked = Run(run_dir).load_preds(Run(run_dir).trials()[0]["trial_id"])["index"]
    np.testing.assert_array_equal(np.sort(stacked), np.sort(rows[val_pos]))
    assert not fit_patients & set(ds.patient[stacked])
    assert set(ds.split[stacked]) == {"train"}
    val = result.manifest["validation"]
    assert val["n"] == len(stacked) and val["n_patients"] == len(set(ds.patient[stacked]))
    assert val["folds"] == 4
    assert 0.0 <= result.threshold <= 1.0
    # Selection: the chosen meta-learner's cross-validated score is the best of all tried.
    scores = {n: a["score"] for n, a in result.assessments.items() if a["score"] is not None}
    assert set(scores) == set(registry.meta_learners())
    assert scores[result.meta] == max(scores.values()) == result.score
    for metric in val["metrics"].values():
        assert {"value", "low", "high", "n"} <= set(metric)
    assert len(result.manifest["members"]) == 2  # the run given twice counts once


def test_min_sensitivity_and_penultimate_features(run_and_data, tmp_path):
    run_dir, _ = run_and_data
    result = ensemble_and_export([run_dir], tmp_path / "p.ammo", meta="logistic", top=2,
                                 features="penultimate", min_sensitivity=0.9)
    manifest = result.manifest
    assert manifest["features"] == "penultimate" and manifest["threshold_rule"]["min_sensitivity"] == 0.9
    assert all(m["feature_size"] > 2 for m in manifest["members"])
    assert manifest["validation"]["score"]["name"] == "specificity"
    assert list(result.assessments) == ["logistic"]


def test_mean_cannot_stack_penultimate_features(run_and_data, tmp_path):
    with pytest.raises(AutomammoError, match="mean stacks probs"):
        ensemble_and_export([run_and_data[0]], tmp_path / "x", meta="mean", features="penultimate")
    assert not (tmp_path / "x.ammo").exists()


def test_runs_on_another_task_or_other_data_are_refused(run_and_data, tmp_path):
    run_dir, _ = run_and_data
    for key, value, message in (("task", {"name": "mass-calcification", "classes": ["mass", "calcification"],
                                          "positive": 1}, "task"),
                                ("data_fingerprint", "0" * 64, "other data")):
        other = tmp_path / key
        shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("models", "tuner"))
        config = json.loads((other / "config.json").read_text())
        config[key] = value
        (other / "config.json").write_text(json.dumps(config))
        with pytest.raises(RunError, match=message):
            ensemble_and_export([run_dir, other], tmp_path / "x")


def test_a_moved_dataset_is_named_and_can_be_given(run_and_data, tmp_path):
    run_dir, data = run_and_data
    other = tmp_path / "elsewhere"
    shutil.copytree(run_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["data"] = str(tmp_path / "gone.npz")
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(AutomammoError, match="gone.npz"):
        ensemble_and_export([other], tmp_path / "x", meta="mean", top=1)
    result = ensemble_and_export([other], tmp_path / "x", meta="mean", top=1, data=data)
    assert result.manifest["data"]["source"] == str(data)
