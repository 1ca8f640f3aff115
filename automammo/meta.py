"""What a meta-learner is: the stacker that turns member outputs into class probabilities.

A meta-learner is fitted on the members' outputs for samples the members did not train on
(see ``automammo.ensemble``) and shipped inside a bundle as plain arrays, never as a pickle:
``to_arrays()`` returns every fitted parameter as a numpy array, ``from_arrays()`` rebuilds an
equivalent learner, and ``predict_proba`` always computes from those arrays, so what was
validated is exactly what a bundle later runs.

Plugins register subclasses through ``automammo_register_meta_learners``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from automammo.errors import AutomammoError, BundleError

FEATURE_KINDS = ("probs", "penultimate")


class MetaLearnerError(AutomammoError):
    """A meta-learner cannot be fitted on these data (too few samples of a class, ...)."""


class MetaLearner:
    """Base class of every stacker.

    Subclasses set ``name``, ``description`` and ``accepts`` and implement ``_fit``,
    ``_predict_proba``, ``_params`` and ``_load``. The base class checks shapes, keeps the
    class bookkeeping and turns the parameters into arrays.

    Attributes:
        name: the CLI name (``--meta NAME``).
        description: one line for ``automammo plugins``.
        accepts: the member feature kinds it can stack: ``"probs"`` (the members' class
            probabilities, ``n_members * n_classes`` columns) and/or ``"penultimate"`` (the
            members' penultimate-layer activations).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    accepts: ClassVar[tuple[str, ...]] = FEATURE_KINDS

    def __init__(self, n_classes: int, seed: int = 0):
        if n_classes < 2:
            raise ValueError(f"a meta-learner needs at least 2 classes, got {n_classes}")
        self.n_classes = int(n_classes)
        self.seed = int(seed)
        self.n_features: int | None = None

    # -- public API ------------------------------------------------------------------
    def fit(self, X, y) -> "MetaLearner":
        """Fit on member features ``X`` (N, F) and integer class targets ``y`` (N,).

        Raises:
            MetaLearnerError: fewer than two classes, or too few samples for this learner.
        """
        X, y = self._check_X(X, fitting=True), np.asarray(y, dtype=np.int64)
        if len(y) != len(X):
            raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
        if np.any((y < 0) | (y >= self.n_classes)):
            raise ValueError(f"targets must be class indices 0-{self.n_classes - 1}")
        if len(np.unique(y)) < 2:
            raise MetaLearnerError(f"meta-learner {self.name} needs samples of at least two classes")
        self.n_features = X.shape[1]
        self._fit(X, y)
        return self

    def predict_proba(self, X) -> np.ndarray:
        """(N, n_classes) probabilities, rows summing to 1."""
        if self.n_features is None:
            raise RuntimeError(f"meta-learner {self.name} is not fitted")
        X = self._check_X(X)
        p = np.asarray(self._predict_proba(X), dtype=np.float64)
        p = np.clip(p, 0.0, 1.0)
        return p / np.clip(p.sum(axis=1, keepdims=True), 1e-300, None)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every fitted parameter as a numpy array (numbers or strings, never objects)."""
        if self.n_features is None:
            raise RuntimeError(f"meta-learner {self.name} is not fitted")
        arrays = {"n_classes": np.asarray(self.n_classes), "n_features": np.asarray(self.n_features),
                  "seed": np.asarray(self.seed)}
        for key, value in self._params().items():
            arrays[key] = np.asarray(value)
        for key, value in arrays.items():
            if value.dtype.kind not in "biufU":
                raise TypeError(f"meta-learner {self.name}: parameter {key} has dtype {value.dtype}")
        return arrays

    @classmethod
    def from_arrays(cls, arrays) -> "MetaLearner":
        """Rebuild a fitted learner from ``to_arrays()`` output.

        Raises:
            BundleError: an array is missing or of the wrong shape.
        """
        try:
            learner = cls(int(arrays["n_classes"]), int(arrays["seed"]))
            learner.n_features = int(arrays["n_features"])
            learner._load(arrays)
        except KeyError as exc:
            raise BundleError(f"meta-learner {cls.name}: stored parameters lack {exc}") from None
        except (TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"meta-learner {cls.name}: stored parameters are malformed ({exc})") from None
        learner._check_loaded()
        # Whatever a plugin's own checks miss, parameters that cannot predict one row of the
        # stored width are refused here, at load time, not on a user's first patch. The row
        # is a valid input of either feature kind: every member saying 1 / n_classes to each
        # class (for penultimate features, just finite values).
        try:
            probe = learner.predict_proba(np.full((1, learner.n_features), 1.0 / learner.n_classes))
        except Exception as exc:  # noqa: BLE001 - any failure means unusable parameters
            raise BundleError(f"meta-learner {cls.name}: stored parameters do not predict "
                              f"({type(exc).__name__}: {exc})") from None
        if probe.shape != (1, learner.n_classes) or not np.all(np.isfinite(probe)):
            raise BundleError(f"meta-learner {cls.name}: stored parameters give unusable probabilities")
        return learner

    # -- what subclasses implement -----------------------------------------------------
    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _params(self) -> dict:
        raise NotImplementedError

    def _load(self, arrays) -> None:
        raise NotImplementedError

    def _check_loaded(self) -> None:
        """Refuse parameters whose shapes disagree; subclasses add their own checks."""
        if self.n_features is None or self.n_features < 1:
            raise BundleError(f"meta-learner {self.name}: stored parameters give no feature count")

    # -- helpers ---------------------------------------------------------------------------
    def _check_X(self, X, fitting: bool = False) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"meta-learner {self.name}: expected (N, F) features, got shape {X.shape}")
        if not np.all(np.isfinite(X)):
            raise ValueError(f"meta-learner {self.name}: features contain NaN or Inf")
        if not fitting and X.shape[1] != self.n_features:
            raise ValueError(f"meta-learner {self.name}: fitted on {self.n_features} features, got {X.shape[1]}")
        return X


class Standardizer:
    """Column means and scales, stored as arrays; a constant column keeps scale 1."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray):
        self.mean, self.scale = np.asarray(mean, dtype=np.float64), np.asarray(scale, dtype=np.float64)

    @classmethod
    def fit(cls, X: np.ndarray) -> "Standardizer":
        scale = X.std(axis=0)
        # A member that outputs a constant would otherwise divide by zero.
        scale[scale < 1e-12] = 1.0
        return cls(X.mean(axis=0), scale)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.scale


def expit(z: np.ndarray) -> np.ndarray:
    """The logistic function, without overflow warnings for large |z|."""
    out = np.empty_like(z, dtype=np.float64)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expand_classes(p_present: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Columns of the classes an estimator saw -> all ``n_classes`` columns (0 elsewhere)."""
    out = np.zeros((len(p_present), n_classes))
    out[:, np.asarray(classes, dtype=np.int64)] = p_present
    return out
