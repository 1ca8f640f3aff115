"""Meta-learners: the contract, pickle-free storage, and agreement with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from automammo import registry
from automammo.errors import BundleError
from automammo.meta import MetaLearner, MetaLearnerError

LEARNERS = sorted(registry.meta_learners())


def stacking_data(n_classes: int, n: int = 150, members: int = 3, seed: int = 0):
    """Member probabilities that carry the class, noisily, as stacking inputs do."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(0, 1.0, (n, members, n_classes)) + 1.5 * np.eye(n_classes)[y][:, None, :]
    p = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    return p.reshape(n, members * n_classes), y


def save_load(learner: MetaLearner, tmp_path) -> MetaLearner:
    path = tmp_path / f"{learner.name}.npz"
    np.savez(path, **learner.to_arrays())
    with np.load(path, allow_pickle=False) as npz:
        return type(learner).from_arrays({k: npz[k] for k in npz.files})


def test_the_five_builtins_are_registered():
    assert set(LEARNERS) >= {"mean", "logistic", "linear_svc", "svc", "dense"}
    for name in LEARNERS:
        cls = registry.get("meta-learner", name)
        assert issubclass(cls, MetaLearner) and cls.description and cls.accepts


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", LEARNERS)
def test_fits_predicts_probabilities_and_round_trips_without_pickle(name, n_classes, tmp_path):
    X, y = stacking_data(n_classes)
    learner = registry.get("meta-learner", name)(n_classes, seed=0).fit(X, y)
    p = learner.predict_proba(X)
    assert p.shape == (len(X), n_classes)
    assert np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    # Better than chance on data where the members carry the class.
    assert (p.argmax(axis=1) == y).mean() > 1.5 / n_classes
    arrays = learner.to_arrays()
    assert all(a.dtype.kind in "biufU" for a in arrays.values())
    again = save_load(learner, tmp_path)
    np.testing.assert_array_equal(again.predict_proba(X), p)


def _sklearn_equivalent(name: str, n_features: int):
    if name == "logistic":
        return LogisticRegression(C=1.0, max_iter=5000, random_state=0)
    if name == "linear_svc":
        return CalibratedClassifierCV(LinearSVC(C=1.0, max_iter=20000, random_state=0), method="sigmoid",
                                      cv=3, ensemble=False)
    if name == "svc":
        # gamma="scale" of the standardised data (variance 1), fixed for every calibration
        # fold as the learner fixes it (scikit-learn's "scale" would recompute it per fold).
        return CalibratedClassifierCV(SVC(kernel="rbf", C=1.0, gamma=1.0 / n_features, random_state=0),
                                      method="sigmoid", cv=3, ensemble=False)
    return None


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("name", ["logistic", "linear_svc", "svc"])
def test_predictions_rebuilt_from_arrays_match_scikit_learn(name, n_classes, tmp_path):
    X, y = stacking_data(n_classes, n=160, seed=n_classes)
    learner = registry.get("meta-learner", name)(n_classes, seed=0).fit(X, y)
    reference = make_pipeline(StandardScaler(), _sklearn_equivalent(name, X.shape[1])).fit(X, y)
    fresh = np.random.default_rng(1).dirichlet(np.ones(n_classes), size=(40, 3)).reshape(40, -1)
    for data in (X, fresh):
        expected = reference.predict_proba(data)
        np.testing.assert_allclose(learner.predict_proba(data), expected, atol=1e-10)
        np.testing.assert_allclose(save_load(learner, tmp_path).predict_proba(data), expected, atol=1e-10)


def test_a_class_absent_from_the_fit_gets_probability_zero():
    X, y = stacking_data(3, n=90)
    keep = y != 2
    learner = registry.get("meta-learner", "logistic")(3).fit(X[keep], y[keep])
    p = learner.predict_proba(X)
    assert p.shape == (90, 3) and np.all(p[:, 2] == 0)


def test_mean_is_the_mean_of_member_probabilities():
    X, y = stacking_data(2)
    learner = registry.get("meta-learner", "mean")(2).fit(X, y)
    np.testing.assert_allclose(learner.predict_proba(X), X.reshape(len(X), 3, 2).mean(axis=1))
    assert registry.get("meta-learner", "mean").accepts == ("probs",)


def test_dense_layer_learns_what_a_linear_stacker_cannot():
    # XOR of two members' votes: no linear boundary, one hidden layer suffices.
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1, 400), rng.uniform(0, 1, 400)
    X = np.stack([a, 1 - a, b, 1 - b], axis=1)
    y = ((a > 0.5) ^ (b > 0.5)).astype(int)
    dense = registry.get("meta-learner", "dense")(2, seed=0).fit(X, y)
    logistic = registry.get("meta-learner", "logistic")(2).fit(X, y)
    assert (dense.predict_proba(X).argmax(1) == y).mean() > 0.9
    assert (logistic.predict_proba(X).argmax(1) == y).mean() < 0.7


def test_one_class_or_bad_shapes_are_refused():
    X, y = stacking_data(2)
    with pytest.raises(MetaLearnerError, match="two classes"):
        registry.get("meta-learner", "logistic")(2).fit(X, np.zeros(len(X), dtype=int))
    learner = registry.get("meta-learner", "logistic")(2).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        learner.predict_proba(X[:, :4])
    with pytest.raises(ValueError, match="NaN"):
        learner.predict_proba(np.full_like(X, np.nan))


@pytest.mark.parametrize("name", LEARNERS)
def test_stored_parameters_missing_or_malformed_are_a_bundle_error(name):
    X, y = stacking_data(2)
    cls = registry.get("meta-learner", name)
    arrays = cls(2).fit(X, y).to_arrays()
    with pytest.raises(BundleError, match="lack"):
        cls.from_arrays({k: v for k, v in arrays.items() if k != "n_features"})
    wrong = dict(arrays, n_features=np.asarray(arrays["n_features"] + 1))
    if name == "mean":
        wrong = dict(arrays, n_features=np.asarray(5))
    with pytest.raises(BundleError):
        cls.from_arrays(wrong)
