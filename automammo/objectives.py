"""What an objective is, and the one callback that scores every objective each epoch.

An objective scores class probabilities ``y_prob`` (N, C) against integer targets
``y_true`` (N,). The callback writes ``val_<name>`` into the Keras logs, so any objective
drives early stopping, checkpoints and every Keras Tuner oracle the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

THRESHOLDS = np.round(np.linspace(0.01, 0.99, 99), 2)


@dataclass(frozen=True)
class Objective:
    """A named score of predictions.

    Attributes:
        name: the CLI name; logged as ``val_<name>``.
        direction: ``"max"`` or ``"min"``.
        score: ``score(y_true, y_prob, positive, threshold)`` -> float. ``positive`` is the
            task's positive class for binary tasks, ``None`` for multi-class ones (then a
            macro average is expected). ``threshold`` applies to binary tasks.
        description: one line.
        thresholded: whether the score depends on a decision threshold (binary tasks):
            then ``val_<name>_best`` and ``val_<name>_threshold`` are logged as well.
        binary_only: refuse multi-class tasks.
        sweep_score: optional ``sweep_score(counts)`` -> array, the score at every threshold
            at once from a :class:`ThresholdCounts`; for thresholded objectives that depend
            only on the confusion matrix. Without it a sweep calls ``score`` once per
            threshold (99 calls), which a search does every epoch.
    """

    name: str
    direction: str
    score: Callable[..., float]
    description: str
    thresholded: bool = False
    binary_only: bool = False
    extra: dict = field(default_factory=dict, compare=False)
    sweep_score: Callable[["ThresholdCounts"], np.ndarray] | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.direction not in ("max", "min"):
            raise ValueError(f"objective {self.name}: direction must be 'max' or 'min'")

    def __call__(self, y_true, y_prob, positive=None, threshold=0.5) -> float:
        y_true = np.asarray(y_true, dtype=np.int64)
        y_prob = np.asarray(y_prob, dtype=np.float64)
        return float(self.score(y_true, y_prob, positive, threshold))

    def score_key(self, binary: bool) -> str:
        """What a search scores and early-stops on: ``<name>_best``, the value at the
        validation-optimal threshold, for a thresholded objective on a binary task (the
        ensemble stage moves the threshold anyway, and at a fixed 0.5 an untrained model
        that calls everything positive already scores F2 = 0.83 at 50% prevalence, so early
        stopping would end trials before they learn); otherwise the name itself."""
        return f"{self.name}_best" if self.thresholded and binary else self.name

    def better(self, a: float, b: float) -> bool:
        """True when score ``a`` is strictly better than ``b``."""
        if b is None or np.isnan(b):
            return not np.isnan(a)
        return a > b if self.direction == "max" else a < b

    def sweep(self, y_true, y_prob, positive, thresholds=THRESHOLDS) -> np.ndarray:
        """The score at each threshold (binary tasks)."""
        if self.sweep_score is not None:
            counts = ThresholdCounts.of(y_true, y_prob, positive, thresholds)
            return np.asarray(self.sweep_score(counts), dtype=np.float64)
        return np.array([self(y_true, y_prob, positive, t) for t in thresholds])

    def best_threshold(self, y_true, y_prob, positive, thresholds=THRESHOLDS) -> tuple[float, float]:
        """(threshold, score) at the optimum; ties go to the threshold nearest 0.5."""
        scores = self.sweep(y_true, y_prob, positive, thresholds)
        sign = 1.0 if self.direction == "max" else -1.0
        valid = np.where(np.isnan(scores), -np.inf, sign * scores)
        best = np.flatnonzero(valid == valid.max())
        i = best[np.argmin(np.abs(thresholds[best] - 0.5))]
        return float(thresholds[i]), float(scores[i])


@dataclass(frozen=True)
class ThresholdCounts:
    """The binary confusion matrix at every threshold, from one sort of the probabilities.

    A patch is called positive when ``p(positive) >= threshold``, as in
    :func:`binary_decision`. Arrays are float64, one entry per threshold.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray

    @classmethod
    def of(cls, y_true, y_prob, positive: int, thresholds=THRESHOLDS) -> "ThresholdCounts":
        thresholds = np.asarray(thresholds, dtype=np.float64)
        truth = np.asarray(y_true) == positive
        p = np.asarray(y_prob, dtype=np.float64)[:, positive]
        pos, neg = np.sort(p[truth]), np.sort(p[~truth])
        # Entries >= t: all but those sorted before the first one >= t.
        tp = (len(pos) - np.searchsorted(pos, thresholds, side="left")).astype(np.float64)
        fp = (len(neg) - np.searchsorted(neg, thresholds, side="left")).astype(np.float64)
        return cls(thresholds, tp, fp, len(pos) - tp, len(neg) - fp)

    def ratio(self, num: np.ndarray, den: np.ndarray) -> np.ndarray:
        """num / den, 0 where den is 0 (scikit-learn's ``zero_division=0``)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def binary_decision(y_prob: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """1 where the positive class's probability reaches ``threshold``."""
    return (y_prob[:, positive] >= threshold).astype(np.int64)


def predict_classes(y_prob: np.ndarray, positive: int | None, threshold: float = 0.5) -> np.ndarray:
    """Class index per sample: thresholded on the positive class for binary tasks."""
    if positive is not None and y_prob.shape[1] == 2:
        decided = binary_decision(y_prob, positive, threshold)
        return np.where(decided == 1, positive, 1 - positive)
    return np.argmax(y_prob, axis=1)


def applicable(objective: Objective, n_classes: int) -> bool:
    return not (objective.binary_only and n_classes != 2)


def evaluate_all(objectives, y_true, y_prob, positive, threshold=0.5, sweep=None) -> dict[str, float]:
    """Every applicable objective at ``threshold``, plus the optimum of thresholded ones.

    ``sweep`` limits the threshold sweep (99 scores each) to the named objectives; a search
    sweeps only the one it optimises, every epoch, which keeps the callback cheap.
    """
    out: dict[str, float] = {}
    n_classes = y_prob.shape[1]
    for obj in objectives:
        if not applicable(obj, n_classes):
            continue
        out[obj.name] = obj(y_true, y_prob, positive, threshold)
        if obj.thresholded and positive is not None and (sweep is None or obj.name in sweep):
            t, s = obj.best_threshold(y_true, y_prob, positive)
            out[f"{obj.name}_best"] = s
            out[f"{obj.name}_threshold"] = t
    return out


def make_callback(objectives, predict: Callable[[object], np.ndarray], y_true, positive, sweep=None):
    """A Keras callback that writes ``val_<name>`` for every objective after each epoch.

    ``predict(model)`` returns the validation probabilities. Keras is imported here so that
    objectives stay usable without TensorFlow.
    """
    import keras

    class ObjectivesCallback(keras.callbacks.Callback):
        # Builders skip Keras' own validation pass when this callback is present: it logs
        # val_loss with the rest, from the one prediction of the validation set.
        scores_validation = True

        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            y_prob = predict(self.model)
            if not np.all(np.isfinite(y_prob)):
                # A diverged model: score it worst so that no oracle prefers it.
                for obj in objectives:
                    logs[f"val_{obj.name}"] = -np.inf if obj.direction == "max" else np.inf
                return
            for name, value in evaluate_all(objectives, y_true, y_prob, positive, sweep=sweep).items():
                logs[f"val_{name}"] = value

    return ObjectivesCallback()
