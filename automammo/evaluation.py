"""Decision thresholds and clinical metrics with bootstrap 95% intervals.

Shared by the ensemble (validation metrics of a bundle), ``automammo evaluate`` (the test
split) and reports. Every metric is returned with its sample size (the denominator it is a
fraction of) and a percentile bootstrap interval; when patients are known the bootstrap
resamples patients, not patches, because patches of one patient are not independent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from automammo.errors import AutomammoError
from automammo.objectives import Objective

# -- thresholds ---------------------------------------------------------------------------


def candidate_thresholds(scores: np.ndarray, limit: int = 1024) -> np.ndarray:
    """Every threshold that changes a decision: midpoints between adjacent distinct scores.

    A decision is ``score >= threshold``; a midpoint keeps any held-out score off the
    boundary. The two ends (everything positive, nothing positive) are included. With more
    than ``limit`` distinct scores an evenly spaced subset of the midpoints is used.
    """
    u = np.unique(np.asarray(scores, dtype=np.float64))
    mids = (u[:-1] + u[1:]) / 2.0
    if len(mids) > limit:
        mids = mids[np.linspace(0, len(mids) - 1, limit).round().astype(int)]
    low = u[0] / 2.0
    high = (u[-1] + 1.0) / 2.0 if u[-1] < 1.0 else float(np.nextafter(1.0, 2.0))
    return np.unique(np.concatenate([[low], mids, [high]]))


def _nearest_half(thresholds: np.ndarray, best: np.ndarray) -> float:
    # Among equally good thresholds take the one nearest 0.5, the calibrated default.
    return float(thresholds[best[np.argmin(np.abs(thresholds[best] - 0.5))]])


@dataclass(frozen=True)
class ThresholdRule:
    """How a binary decision threshold is chosen from held-out predictions.

    Attributes:
        objective: maximise (or minimise) this objective over every candidate threshold.
            An objective that does not depend on the threshold (AUC, loss) keeps 0.5.
        min_sensitivity: instead, the operating point with the highest specificity among
            those whose sensitivity is at least this value.
    """

    objective: Objective | None = None
    min_sensitivity: float | None = None

    def __post_init__(self):
        if self.min_sensitivity is not None and not 0.0 < self.min_sensitivity <= 1.0:
            raise AutomammoError(f"--min-sensitivity must be within (0, 1], got {self.min_sensitivity}")

    @property
    def tunes(self) -> bool:
        return self.min_sensitivity is not None or (self.objective is not None and self.objective.thresholded)

    def describe(self) -> str:
        if self.min_sensitivity is not None:
            return f"highest specificity with sensitivity >= {self.min_sensitivity:g}"
        if self.tunes:
            return f"{'maximises' if self.objective.direction == 'max' else 'minimises'} {self.objective.name}"
        return "0.5 (the objective does not depend on the threshold)"

    def to_dict(self) -> dict:
        if self.min_sensitivity is not None:
            return {"rule": "min_sensitivity", "min_sensitivity": self.min_sensitivity}
        return {"rule": "objective" if self.tunes else "fixed",
                "objective": self.objective.name if self.objective else None}

    def choose(self, y_true: np.ndarray, p_pos: np.ndarray, positive: int) -> float:
        """The threshold on the positive class's probability ``p_pos`` for targets ``y_true``."""
        if not self.tunes:
            return 0.5
        y_true = np.asarray(y_true)
        p_pos = np.asarray(p_pos, dtype=np.float64)
        thresholds = candidate_thresholds(p_pos)
        if self.min_sensitivity is not None:
            return min_sensitivity_threshold(y_true == positive, p_pos, self.min_sensitivity, thresholds)
        probs = np.zeros((len(p_pos), 2))
        probs[:, positive], probs[:, 1 - positive] = p_pos, 1.0 - p_pos
        scores = self.objective.sweep(y_true, probs, positive, thresholds)
        sign = 1.0 if self.objective.direction == "max" else -1.0
        valid = np.where(np.isnan(scores), -np.inf, sign * scores)
        return _nearest_half(thresholds, np.flatnonzero(valid == valid.max()))


def min_sensitivity_threshold(truth: np.ndarray, p_pos: np.ndarray, target: float,
                              thresholds: np.ndarray | None = None) -> float:
    """Highest specificity among thresholds with sensitivity >= ``target``.

    Ties in specificity go to the higher sensitivity, then to the threshold nearest 0.5.
    """
    truth = np.asarray(truth, dtype=bool)
    if not truth.any() or truth.all():
        raise AutomammoError("an operating point by sensitivity needs both positive and negative samples")
    thresholds = candidate_thresholds(p_pos) if thresholds is None else thresholds
    called = p_pos[None, :] >= thresholds[:, None]
    sens = called[:, truth].mean(axis=1)
    spec = (~called[:, ~truth]).mean(axis=1)
    ok = sens >= target - 1e-12
    spec = np.where(ok, spec, -np.inf)
    best = np.flatnonzero(spec == spec.max())
    best = best[sens[best] == sens[best].max()]
    return _nearest_half(thresholds, best)


def cross_validated_decisions(y_true, p_pos, folds, rule: ThresholdRule, positive: int):
    """Decide each held-out fold with a threshold chosen on the other folds only.

    Args:
        y_true: (N,) class indices.
        p_pos: (N,) held-out probability of the positive class.
        folds: list of (other positions, fold positions).
        rule: how thresholds are chosen.
        positive: the positive class index.

    Returns:
        (decisions (N,) class indices, thresholds (N,) the threshold applied to each sample).
    """
    y_true, p_pos = np.asarray(y_true), np.asarray(p_pos, dtype=np.float64)
    used = np.full(len(y_true), np.nan)
    for others, fold in folds:
        used[fold] = rule.choose(y_true[others], p_pos[others], positive)
    decided = np.where(p_pos >= used, positive, 1 - positive)
    return decided.astype(np.int64), used


# -- metrics ----------------------------------------------------------------------------------


def _weighted_auc(scores: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC under each row of sample ``weights`` (B, N): the Mann-Whitney statistic.

    Tied scores count one half, exactly as ``sklearn.metrics.roc_auc_score``.
    """
    order = np.argsort(scores, kind="mergesort")
    s, t, w = scores[order], truth[order], weights[:, order]
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
    pos = np.add.reduceat(w * t, starts, axis=1)
    neg = np.add.reduceat(w * ~t, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    total_pos, total_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (total_pos * total_neg)


def _fbeta(tp, fp, fn, beta):
    b2 = beta * beta
    num = (1 + b2) * tp
    den = num + b2 * fn + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _called_pairs(classes) -> tuple[str, list[int], list[int]] | None:
    """Which (true, predicted) classes count as a missed cancer, and its label."""
    names = [c.lower() for c in classes]
    malignant = [i for i, c in enumerate(names) if "malignant" in c]
    benign = [i for i, c in enumerate(names) if "benign" in c]
    if malignant and benign:
        return "malignant called benign", malignant, benign
    return None


def clinical_metrics(y_true, y_prob, y_pred, classes, positive: int | None, groups=None,
                     replicates: int = 1000, seed: int = 0) -> dict:
    """Accuracy, AUC, F1, F2 (+ sensitivity, specificity, PPV, NPV for binary tasks),
    the confusion matrix and the missed-cancer count, each with n and a bootstrap 95% CI.

    Args:
        y_true: (N,) class indices.
        y_prob: (N, C) probabilities (AUC).
        y_pred: (N,) decided class indices (every other metric).
        classes: class names.
        positive: the positive class of a binary task, None for multi-class tasks (then
            F1/F2 are macro averages over the classes and recall is given per class).
        groups: (N,) patient ids: the bootstrap resamples patients; None resamples samples.
        replicates: bootstrap replicates.
        seed: bootstrap seed.

    Returns:
        ``{"n", "n_patients", "bootstrap", "metrics": {name: {value, low, high, n}},
        "confusion_matrix": {"classes", "counts"}}``; intervals are None where a metric is
        undefined in too many replicates (e.g. no positive sample).
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    n, c = y_prob.shape
    if n == 0:
        raise AutomammoError("no samples to evaluate")
    unit = "patient" if groups is not None else "sample"
    group_ids = np.unique(np.asarray(groups).astype(str), return_inverse=True)[1] if groups is not None else np.arange(n)
    n_groups = int(group_ids.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=replicates).astype(np.float64)
    weights = np.vstack([np.ones((1, n_groups)), draws])  # row 0: the data as observed
    sample_w = weights[:, group_ids]  # (1 + B, N)

    cell = y_true * c + y_pred
    cm = np.stack([np.bincount(cell, weights=w, minlength=c * c) for w in sample_w]).reshape(-1, c, c)
    total = cm.sum(axis=(1, 2))
    tp_all = np.diagonal(cm, axis1=1, axis2=2)
    values: dict[str, tuple[np.ndarray, int]] = {"accuracy": (_ratio(tp_all.sum(axis=1), total), n)}
    if c == 2 and positive is not None:
        neg = 1 - positive
        tp, fn = cm[:, positive, positive], cm[:, positive, neg]
        fp, tn = cm[:, neg, positive], cm[:, neg, neg]
        pos_n, neg_n = int(np.sum(y_true == positive)), int(np.sum(y_true != positive))
        values["auc"] = (_weighted_auc(y_prob[:, positive], y_true == positive, sample_w), n)
        values["f1"] = (_fbeta(tp, fp, fn, 1.0), n)
        values["f2"] = (_fbeta(tp, fp, fn, 2.0), n)
        values["sensitivity"] = (_ratio(tp, tp + fn), pos_n)
        values["specificity"] = (_ratio(tn, tn + fp), neg_n)
        values["ppv"] = (_ratio(tp, tp + fp), int(np.sum(y_pred == positive)))
        values["npv"] = (_ratio(tn, tn + fn), int(np.sum(y_pred != positive)))
    else:
        per_class = [_weighted_auc(y_prob[:, k], y_true == k, sample_w) for k in range(c) if np.any(y_true == k)]
        with np.errstate(invalid="ignore"):
            values["auc"] = (np.nanmean(np.stack(per_class), axis=0) if per_class else np.full(len(cm), np.nan), n)
        fp_k, fn_k = cm.sum(axis=1) - tp_all, cm.sum(axis=2) - tp_all
        values["f1"] = (_fbeta(tp_all, fp_k, fn_k, 1.0).mean(axis=1), n)
        values["f2"] = (_fbeta(tp_all, fp_k, fn_k, 2.0).mean(axis=1), n)
        for k, name in enumerate(classes):
            values[f"recall {name}"] = (_ratio(tp_all[:, k], cm[:, k, :].sum(axis=1)), int(np.sum(y_true == k)))
    missed = _called_pairs(classes)
    if missed is None and c == 2 and positive is not None:
        missed = (f"{classes[positive]} called {classes[1 - positive]}", [positive], [1 - positive])
    if missed is not None:
        label, truths, calls = missed
        values[label] = (cm[:, truths][:, :, calls].sum(axis=(1, 2)), int(np.isin(y_true, truths).sum()))

    metrics = {}
    for name, (series, size) in values.items():
        point, boot = series[0], series[1:]
        boot = boot[np.isfinite(boot)]
        # An interval from a minority of replicates would mislead: report none.
        ok = len(boot) >= max(20, replicates // 2)
        low, high = (np.percentile(boot, [2.5, 97.5]) if ok else (np.nan, np.nan))
        metrics[name] = {"value": _num(point), "low": _num(low), "high": _num(high), "n": size}
    return {
        "n": int(n),
        "n_patients": int(n_groups) if groups is not None else None,
        "bootstrap": {"replicates": int(replicates), "unit": unit, "interval": "percentile 95%", "seed": seed},
        "metrics": metrics,
        "confusion_matrix": {"classes": list(classes), "rows": "true", "columns": "predicted",
                             "counts": cm[0].astype(np.int64).tolist()},
    }


def _num(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def format_metric(m: dict, integer: bool = False) -> tuple[str, str]:
    """(value, "low-high") strings for a metric dict, dashes where undefined."""
    fmt = (lambda v: f"{v:.0f}") if integer else (lambda v: f"{v:.3f}")
    value = "-" if m.get("value") is None else fmt(m["value"])
    ci = "-" if m.get("low") is None else f"{fmt(m['low'])}-{fmt(m['high'])}"
    return value, ci


def evaluate_bundle(bundle, data, replicates: int = 2000, seed: int = 0, batch_size: int = 64) -> dict:
    """Metrics of a bundle on the ``test`` split of a dataset, with n and 95% intervals.

    Args:
        bundle: a loaded ``automammo.bundle.Bundle``.
        data: a dataset.npz path.
        replicates: bootstrap replicates (resampling patients).
        seed: bootstrap seed.

    Returns:
        ``clinical_metrics`` output plus ``bundle``, ``data``, ``split``, ``task``,
        ``threshold`` and ``same_data`` (whether this is the dataset the bundle was built on).

    Raises:
        DataError: unreadable data, or no test sample of the bundle's task.
    """
    from automammo.dataset import load as load_dataset
    from automammo.errors import DataError
    from automammo.tasks import get_task

    task = get_task(bundle.task_name)
    ds = load_dataset(data)
    rows = task.indices(ds, "test")
    if rows.size == 0:
        raise DataError(f"{data}: no test samples of task {task.name}; evaluate reads the test split only")
    raw_b = None
    if bundle.needs_baseline:
        missing = int(np.sum(ds.pair[rows] < 0))
        if missing:
            raise DataError(f"{data}: {missing} test lesions have no baseline partner, which this bundle needs")
        raw_b = ds.x[ds.pair[rows]]
    probs = bundle.predict_proba(ds.x[rows], raw_b, batch_size)
    report = clinical_metrics(task.targets(ds.label[rows]), probs, bundle.decide(probs), bundle.classes,
                              bundle.positive, ds.patient[rows], replicates, seed)
    fingerprint = (bundle.manifest.get("data") or {}).get("fingerprint")
    return {"bundle": str(bundle.path), "data": str(data), "split": "test", "task": task.name,
            "threshold": bundle.threshold, "same_data": fingerprint == ds.fingerprint(), "dtype": str(ds.x.dtype),
            **report}
