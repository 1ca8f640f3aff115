"""Objectives against scikit-learn, thresholds, and the per-epoch callback."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics

from automammo import registry
from automammo.objectives import evaluate_all


@pytest.fixture(scope="module")
def binary():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.35 * y + rng.uniform(0, 0.65, 200), 0, 1)
    return y, np.stack([1 - p1, p1], axis=1)


@pytest.fixture(scope="module")
def multiclass():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_binary_against_sklearn(binary):
    y, p = binary
    obj = registry.objectives()
    pred = (p[:, 1] >= 0.3).astype(int)
    assert obj["accuracy"](y, p, 1, 0.3) == pytest.approx(metrics.accuracy_score(y, pred))
    assert obj["f1"](y, p, 1, 0.3) == pytest.approx(metrics.f1_score(y, pred))
    assert obj["f2"](y, p, 1, 0.3) == pytest.approx(metrics.fbeta_score(y, pred, beta=2))
    assert obj["auc"](y, p, 1) == pytest.approx(metrics.roc_auc_score(y, p[:, 1]))
    assert obj["loss"](y, p, 1) == pytest.approx(metrics.log_loss(y, p))
    fpr, tpr, _ = metrics.roc_curve(y, p[:, 1])
    assert obj["sens_at_spec90"](y, p, 1) == pytest.approx(tpr[fpr <= 0.1].max())


def test_positive_class_zero(binary):
    y, p = binary
    f2 = registry.objectives()["f2"]
    flipped = f2(1 - y, p[:, ::-1], 0, 0.5)
    assert flipped == pytest.approx(f2(y, p, 1, 0.5))


def test_multiclass_macro_against_sklearn(multiclass):
    y, p = multiclass
    obj = registry.objectives()
    pred = p.argmax(1)
    assert obj["f1"](y, p, None) == pytest.approx(metrics.f1_score(y, pred, average="macro"))
    assert obj["f2"](y, p, None) == pytest.approx(metrics.fbeta_score(y, pred, beta=2, average="macro"))
    assert obj["auc"](y, p, None) == pytest.approx(metrics.roc_auc_score(y, p, multi_class="ovr"))
    assert obj["accuracy"](y, p, None) == pytest.approx(metrics.accuracy_score(y, pred))
    assert "sens_at_spec90" not in evaluate_all(registry.objectives().values(), y, p, None)


def test_best_threshold_is_the_sweep_optimum(binary):
    y, p = binary
    f2 = registry.objectives()["f2"]
    t, s = f2.best_threshold(y, p, 1)
    grid = np.round(np.linspace(0.01, 0.99, 99), 2)
    brute = [metrics.fbeta_score(y, (p[:, 1] >= g).astype(int), beta=2) for g in grid]
    assert s == pytest.approx(max(brute))
    assert s >= f2(y, p, 1, 0.5)
    assert f2(y, p, 1, t) == pytest.approx(s)


def test_evaluate_all_reports_f2_at_half_and_at_optimum(binary):
    y, p = binary
    out = evaluate_all(registry.objectives().values(), y, p, 1)
    assert {"f2", "f2_best", "f2_threshold", "auc", "loss"} <= set(out)
    assert out["f2_best"] >= out["f2"]


def test_callback_writes_every_objective_into_the_logs(binary):
    import keras

    from automammo.objectives import make_callback

    y, p = binary
    cb = make_callback(list(registry.objectives().values()), lambda model: p, y, 1)
    cb.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    logs = {"loss": 0.1}
    cb.on_epoch_end(0, logs)
    assert logs["val_f2"] == pytest.approx(registry.objectives()["f2"](y, p, 1))
    assert {"val_auc", "val_accuracy", "val_loss", "val_f2_best", "val_f2_threshold"} <= set(logs)


def test_diverged_model_scores_worst(binary):
    import keras

    from automammo.objectives import make_callback

    y, p = binary
    bad = p.copy()
    bad[0, 0] = np.nan
    cb = make_callback(list(registry.objectives().values()), lambda model: bad, y, 1)
    cb.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    logs = {}
    cb.on_epoch_end(0, logs)
    assert logs["val_auc"] == -np.inf and logs["val_loss"] == np.inf


def _sweep_cases():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 300)
    # Ties, and probabilities exactly on the grid (0.5, 0.25, ...), where >= matters.
    p1 = np.round(np.clip(0.3 * y + rng.uniform(0, 0.7, 300), 0, 1), 2)
    p1[:20] = 0.5
    yield "ties on the grid", y, p1, 1
    yield "positive class 0", y, p1, 0
    yield "one class only", np.ones(50, dtype=int), rng.uniform(0, 1, 50), 1
    yield "hard 0/1 probabilities", y, (p1 > 0.5).astype(float), 1
    yield "float32 softmax", y, rng.uniform(0, 1, 300).astype(np.float32), 1


@pytest.mark.parametrize("name", ["accuracy", "f1", "f2"])
def test_vectorised_sweep_equals_one_call_per_threshold(name):
    """The one-sort sweep gives exactly what 99 scikit-learn calls give."""
    obj = registry.objectives()[name]
    assert obj.sweep_score is not None
    for case, y, p1, positive in _sweep_cases():
        p = np.stack([1 - p1, p1], axis=1)
        fast = obj.sweep(y, p, positive)
        slow = np.array([obj(y, p, positive, t) for t in np.round(np.linspace(0.01, 0.99, 99), 2)])
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12, err_msg=f"{name}: {case}")
        threshold, best = obj.best_threshold(y, p, positive)
        assert best == slow.max() and obj(y, p, positive, threshold) == pytest.approx(best)
