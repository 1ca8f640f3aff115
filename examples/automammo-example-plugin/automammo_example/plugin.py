"""Registers one builder, one objective and one meta-learner with automammo."""

from __future__ import annotations

import keras
import numpy as np
from scipy.optimize import nnls

from automammo import hookimpl
from automammo.builders import Builder
from automammo.meta import MetaLearner, MetaLearnerError
from automammo.objectives import Objective


class TinyResNet(Builder):
    """Pre-activation residual stages with projection shortcuts; searched depth and width."""

    name = "tiny_resnet"
    inputs = "single"
    description = "small residual network (example plugin): 2-3 stages, searched width"
    min_image_size = 16

    def build_model(self, hp):
        inputs, x = self.input_layers()
        width = hp.Choice("width", [16, 32, 48], default=32)
        x = keras.layers.Conv2D(width, 3, padding="same")(x)
        for stage in range(hp.Int("stages", 2, 3, default=2)):
            filters = width * 2**stage
            shortcut = keras.layers.Conv2D(filters, 1, strides=2)(x)
            y = keras.layers.BatchNormalization(momentum=0.9)(x)
            y = keras.layers.Activation("relu")(y)
            y = keras.layers.Conv2D(filters, 3, strides=2, padding="same")(y)
            y = keras.layers.BatchNormalization(momentum=0.9)(y)
            y = keras.layers.Activation("relu")(y)
            y = keras.layers.Conv2D(filters, 3, padding="same")(y)
            x = keras.layers.Add()([shortcut, y])
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Activation("relu")(x))
        x = keras.layers.Dropout(hp.Float("dropout", 0.0, 0.5, step=0.25, default=0.25))(x)
        return keras.Model(inputs, self.classifier(x), name=self.name)


def youden_j(y_true, y_prob, positive, threshold):
    """Sensitivity + specificity - 1 of the positive class at ``threshold``."""
    called = y_prob[:, positive] >= threshold
    truth = y_true == positive
    if truth.all() or not truth.any():
        return float("nan")
    return float(called[truth].mean() + (~called[~truth]).mean() - 1.0)


def youden_j_sweep(counts):
    """Youden's J at every threshold at once (a search sweeps the threshold every epoch)."""
    positives, negatives = counts.tp + counts.fn, counts.tn + counts.fp
    if positives[0] == 0 or negatives[0] == 0:
        return np.full(len(counts.thresholds), np.nan)
    return counts.tp / positives + counts.tn / negatives - 1.0


class NNLSMean(MetaLearner):
    """Weighted mean of member probabilities; weights >= 0 fitted by least squares."""

    name = "nnls_mean"
    description = "weighted mean of member probabilities, non-negative least-squares weights (example plugin)"
    accepts = ("probs",)

    def _fit(self, X, y):
        k = self.n_classes
        if X.shape[1] % k:
            raise MetaLearnerError(f"nnls_mean: {X.shape[1]} columns are not whole members of {k} probabilities")
        members = X.reshape(len(X), -1, k)
        onehot = np.eye(k)[y]
        # Each member's probabilities of every class are one regressor for the one-hot target.
        design = members.transpose(0, 2, 1).reshape(-1, members.shape[1])
        weights, _ = nnls(design, onehot.reshape(-1))
        self.weights = weights / weights.sum() if weights.sum() > 0 else np.full(members.shape[1], 1 / members.shape[1])

    def _predict_proba(self, X):
        members = X.reshape(len(X), -1, self.n_classes)
        return np.einsum("nmk,m->nk", members, self.weights)

    def _params(self):
        return {"weights": self.weights}

    def _load(self, arrays):
        self.weights = np.asarray(arrays["weights"], dtype=np.float64)
        if self.n_features % self.n_classes or self.weights.shape != (self.n_features // self.n_classes,):
            raise ValueError(f"weights of shape {self.weights.shape} for {self.n_features} features")


@hookimpl
def automammo_register_builders():
    return [TinyResNet]


@hookimpl
def automammo_register_objectives():
    return [Objective("youden_j", "max", youden_j, "Youden's J: sensitivity + specificity - 1 (example plugin)",
                      thresholded=True, binary_only=True, sweep_score=youden_j_sweep)]


@hookimpl
def automammo_register_meta_learners():
    return [NNLSMean]
