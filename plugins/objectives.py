"""Built-in objectives: accuracy, AUC, F1, F2, loss, sensitivity at 90% specificity.

Binary tasks score the task's positive class; multi-class tasks use macro averages.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics

from automammo import hookimpl
from automammo.objectives import Objective, ThresholdCounts, predict_classes


def _accuracy(y, p, positive, threshold):
    return metrics.accuracy_score(y, predict_classes(p, positive, threshold))


def _auc(y, p, positive, threshold):
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if p.shape[1] == 2:
        return metrics.roc_auc_score(y == positive, p[:, positive])
    # Macro one-vs-rest over the classes present, on renormalised probabilities.
    q = p[:, present] / np.clip(p[:, present].sum(axis=1, keepdims=True), 1e-12, None)
    if len(present) == 2:
        return metrics.roc_auc_score(y == present[1], q[:, 1])
    return metrics.roc_auc_score(y, q, multi_class="ovr", average="macro", labels=present)


def _fbeta(beta):
    def score(y, p, positive, threshold):
        pred = predict_classes(p, positive, threshold)
        if p.shape[1] == 2:
            return metrics.fbeta_score(y, pred, beta=beta, pos_label=positive, zero_division=0)
        return metrics.fbeta_score(y, pred, beta=beta, average="macro",
                                   labels=np.arange(p.shape[1]), zero_division=0)

    return score


def _accuracy_sweep(c: ThresholdCounts):
    return c.ratio(c.tp + c.tn, c.tp + c.tn + c.fp + c.fn)


def _fbeta_sweep(beta):
    b2 = beta * beta

    def sweep(c: ThresholdCounts):
        return c.ratio((1 + b2) * c.tp, (1 + b2) * c.tp + b2 * c.fn + c.fp)

    return sweep


def _loss(y, p, positive, threshold):
    p = np.clip(p, 1e-7, 1.0)
    # float32 softmax rows sum to 1 only within rounding; renormalise in float64.
    return metrics.log_loss(y, p / p.sum(axis=1, keepdims=True), labels=np.arange(p.shape[1]))


def _sensitivity_at_specificity(target):
    def score(y, p, positive, threshold):
        truth = y == positive
        if truth.all() or not truth.any():
            return float("nan")
        fpr, tpr, _ = metrics.roc_curve(truth, p[:, positive])
        ok = (1.0 - fpr) >= target
        return float(tpr[ok].max()) if ok.any() else 0.0

    return score


OBJECTIVES = [
    Objective("accuracy", "max", _accuracy, "fraction correct (at the threshold for binary tasks)",
              thresholded=True, sweep_score=_accuracy_sweep),
    Objective("auc", "max", _auc, "ROC AUC (macro one-vs-rest for multi-class)"),
    Objective("f1", "max", _fbeta(1.0), "F1 of the positive class (macro for multi-class)",
              thresholded=True, sweep_score=_fbeta_sweep(1.0)),
    Objective("f2", "max", _fbeta(2.0),
              "F2: recall weighted 4x over precision, for when a missed cancer costs most "
              "(macro for multi-class)", thresholded=True, sweep_score=_fbeta_sweep(2.0)),
    Objective("loss", "min", _loss, "cross-entropy of the predicted probabilities"),
    Objective("sens_at_spec90", "max", _sensitivity_at_specificity(0.9),
              "sensitivity at 90% specificity (binary tasks)", binary_only=True),
]


@hookimpl
def automammo_register_objectives():
    return OBJECTIVES
