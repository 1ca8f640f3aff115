"""PNG figures of a run or a bundle, for a radiologist as much as for an engineer.

``write_plots(source, out_dir)`` draws from a ``automammo.report.Source``:

- ``learning_curves.png``  loss and the objective per epoch of the best trials (or members);
- ``roc.png``              ROC curve with the operating threshold marked;
- ``precision_recall.png`` precision (PPV) against recall (sensitivity), threshold marked;
- ``objective_vs_threshold.png``  the objective, sensitivity and specificity per threshold;
- ``confusion_matrix.png`` counts and row percentages, class names on both axes;
- ``misclassified.png``    the most confident mistakes, each lesion beside its baseline;
- ``objective_by_trial.png``  every trial's score in the order it ran, and the best so far.

A figure that cannot be drawn (no predictions yet, a multi-class task for thresholds, the
dataset moved for the gallery) is skipped with its reason instead of drawn empty. Figures
are built on matplotlib's Agg canvas directly, never through pyplot, so nothing depends on
a display or on global figure state, and each file is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from automammo.atomic import atomic_path
from automammo.report import Source, binary_rates, threshold_sweep

DPI = 110
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_GALLERY_MAX = 12


class Skip(Exception):
    """A figure that cannot be drawn for this source; the message says why."""


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
        # The temporary file is private (0600); a figure is meant to be shared like any
        # file the user writes, so it gets the permissions the umask gives new files.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)


def _subject(source: Source) -> str:
    preds = source.preds
    n = len(preds.rows)
    what = "validation patches" if source.kind == "run" else "stacking-row patches (out-of-fold)"
    return f"{preds.subject}, {n} {what}"


def _pretty(name: str) -> str:
    return {"f1": "F1", "f2": "F2", "auc": "AUC", "loss": "loss (cross-entropy)", "accuracy": "accuracy",
            "sens_at_spec90": "sensitivity at 90% specificity"}.get(name, name.replace("_", " "))


# -- figures ----------------------------------------------------------------------------------


def learning_curves(source: Source, top: int):
    """Training and validation loss, and the validation objective, per epoch."""
    records = [r for r in source.records if r.get("status") == "COMPLETED" and r.get("history")]
    if source.kind == "run":
        sign = 1 if source.objective.direction == "max" else -1
        records = sorted((r for r in records if r.get("score") is not None), key=lambda r: -sign * r["score"])[:top]
        who = "the best trial" if len(records) == 1 else f"the {len(records)} best trials"
    else:
        who = ("the member" if len(records) == 1 else f"the {len(records)} members") + ", as trained in their search"
    if not records:
        raise Skip("no completed trial with a recorded history")
    obj = source.objective.name
    fig = _figure(11, 4.6)
    loss_ax, obj_ax = fig.subplots(1, 2)
    for i, r in enumerate(records):
        colour = _COLOURS[i % len(_COLOURS)]
        h = r["history"]
        label = f"trial {r['trial_id']} ({r.get('builder')})"
        for key, style, part in (("loss", "-", "training"), ("val_loss", "--", "validation")):
            values = [np.nan if v is None else v for v in h.get(key, [])]
            if values:
                loss_ax.plot(range(1, len(values) + 1), values, style, color=colour, marker="o", markersize=3,
                             label=f"{label}, {part}")
        values = [np.nan if v is None else v for v in h.get(f"val_{obj}", [])]
        if values:
            obj_ax.plot(range(1, len(values) + 1), values, "-", color=colour, marker="o", markersize=3, label=label)
            best = r.get("best_epoch")
            if best and best <= len(values):
                obj_ax.plot([best], [values[best - 1]], "*", color=colour, markersize=14, markeredgecolor="black")
    loss_ax.set(title="Loss (cross-entropy): solid training, dashed validation", xlabel="epoch",
                ylabel="cross-entropy loss")
    obj_ax.set(title=f"Validation {_pretty(obj)} (star: best epoch, kept)", xlabel="epoch",
               ylabel=f"validation {_pretty(obj)}")
    for ax in (loss_ax, obj_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    obj_ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Learning curves of {who}")
    return fig, f"learning curves of {who}"


def roc(source: Source):
    """ROC curve(s); for binary tasks with the operating point(s) marked."""
    from sklearn.metrics import roc_auc_score, roc_curve

    preds, task = _preds(source), source.task
    fig = _figure(6.4, 6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    positive = source.positive
    classes = [positive] if positive is not None else list(range(task.n_classes))
    drawn = 0
    for i, k in enumerate(classes):
        truth = preds.y_true == k
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, preds.y_prob[:, k])
        auc = roc_auc_score(truth, preds.y_prob[:, k])
        name = task.classes[k] if positive is None else f"{task.classes[k]} vs {task.classes[1 - k]}"
        ax.plot(fpr, tpr, "-", color=_COLOURS[i % len(_COLOURS)], lw=2, label=f"{name} (AUC {auc:.3f})")
        drawn += 1
    if not drawn:
        raise Skip("the held-out patches hold a single class: no ROC curve")
    if positive is not None:
        for t, marker, text in _operating_points(preds):
            r = binary_rates(preds.y_true, preds.y_prob[:, positive], positive, [t])
            x, y = 1 - r["specificity"][0], r["sensitivity"][0]
            ax.plot([x], [y], marker, color="black", markersize=11, markerfacecolor="gold", zorder=5,
                    label=f"{text} {t:.2f}: sensitivity {y:.2f}, specificity {1 - x:.2f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity (false-positive rate)",
           ylabel="sensitivity (true-positive rate)", aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    target = (f"{task.classes[positive]} vs {task.classes[1 - positive]}" if positive is not None
              else "one class vs the rest")
    ax.set_title(f"ROC curve: {target}\n{_subject(source)}", fontsize=10)
    return fig, f"ROC curve of {preds.subject}"


def _preds(source: Source):
    if source.preds is None:
        raise Skip("no held-out predictions (no completed trial yet, or the ensemble's could not be recomputed)")
    return source.preds


def _operating_points(preds) -> list[tuple[float, str, str]]:
    out = []
    if preds.threshold is not None:
        out.append((preds.threshold, "o", "threshold"))
    if preds.optimum is not None:
        out.append((preds.optimum, "D", "validation optimum (optimistic)"))
    return out


def precision_recall(source: Source):
    """Precision (PPV) against recall (sensitivity) of the positive class."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    preds, task, positive = _preds(source), source.task, source.positive
    if positive is None:
        raise Skip("precision-recall of a positive class applies to binary tasks")
    truth = preds.y_true == positive
    if truth.all() or not truth.any():
        raise Skip("the held-out patches hold a single class: no precision-recall curve")
    p_pos = preds.y_prob[:, positive]
    precision, recall, _ = precision_recall_curve(truth, p_pos)
    ap = average_precision_score(truth, p_pos)
    fig = _figure(6.4, 6)
    ax = fig.subplots()
    ax.step(recall, precision, where="post", color=_COLOURS[0], lw=2,
            label=f"{task.classes[positive]} (average precision {ap:.3f})")
    ax.axhline(truth.mean(), ls=":", color="grey", label=f"prevalence {truth.mean():.2f} (a random guess)")
    for t, marker, text in _operating_points(preds):
        r = binary_rates(preds.y_true, p_pos, positive, [t])
        if np.isfinite(r["ppv"][0]):
            ax.plot([r["sensitivity"][0]], [r["ppv"][0]], marker, color="black", markersize=11, markerfacecolor="gold",
                    zorder=5, label=f"{text} {t:.2f}: recall {r['sensitivity'][0]:.2f}, precision {r['ppv'][0]:.2f}")
        else:
            # No positive call at this threshold: precision is undefined, the point has no place.
            ax.plot([], [], marker, color="black", markerfacecolor="white",
                    label=f"{text} {t:.2f}: no {task.classes[positive]} call, precision undefined")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.05),
           xlabel=f"recall = sensitivity (share of {task.classes[positive]} found)",
           ylabel=f"precision = PPV (share of {task.classes[positive]} calls that are right)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(f"Precision-recall: {task.classes[positive]}\n{_subject(source)}", fontsize=10)
    return fig, f"precision-recall curve of {preds.subject}"


def objective_vs_threshold(source: Source):
    """The objective, sensitivity and specificity as the threshold moves."""
    preds = _preds(source)
    sweep = threshold_sweep(source)
    if sweep is None:
        raise Skip("multi-class tasks decide by the largest probability, not a threshold")
    grid = np.asarray(sweep["grid"])
    fig = _figure(8, 5)
    ax = fig.subplots()
    obj = source.objective.name
    if sweep["objective_values"] is not None:
        ax.plot(grid, sweep["objective_values"], "-", lw=2.5, color="black", label=_pretty(obj), drawstyle="steps-mid")
    # Decisions change only between grid points: steps, not slopes that suggest values between.
    ax.plot(grid, sweep["sensitivity"], "-", color=_COLOURS[1], label=f"sensitivity ({sweep['positive']} found)",
            drawstyle="steps-mid")
    ax.plot(grid, sweep["specificity"], "-", color=_COLOURS[0], label="specificity", drawstyle="steps-mid")
    ax.plot(grid, sweep["ppv"], "--", color=_COLOURS[2], alpha=0.7, label="PPV (precision)", drawstyle="steps-mid")
    for t, _, text in _operating_points(preds):
        ax.axvline(t, ls="-" if text == "threshold" else ":", color="grey", lw=1.5, label=f"{text} {t:.2f}")
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel=f"threshold on p({sweep['positive']})", ylabel="value")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    note = "" if sweep["thresholded"] else f" ({_pretty(obj)} does not depend on the threshold)"
    ax.set_title(f"Decisions across thresholds{note}\n{_subject(source)}", fontsize=10)
    return fig, f"{obj}, sensitivity and specificity against the threshold"


def confusion_matrix(source: Source):
    """Counts with row percentages; colour = share of the true class."""
    classes = list(source.task.classes)
    if source.kind == "bundle":
        counts = np.asarray(source.manifest["validation"]["confusion_matrix"]["counts"])
        subject = (f"ensemble ({source.manifest['meta_learner']['name']}), out-of-fold decisions on "
                   f"{int(counts.sum())} stacking-row patches")
    else:
        preds = _preds(source)
        c = len(classes)
        counts = np.bincount(preds.y_true * c + preds.decisions, minlength=c * c).reshape(c, c)
        subject = _subject(source)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.2 + 1.3 * len(classes)
    fig = _figure(size + 1.4, size)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{counts[i, j]}\n({share[i, j]:.0%})", ha="center", va="center", fontsize=11,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=20 if len(classes) > 2 else 0)
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="decision of the model", ylabel="true class")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if source.kind == "bundle":
        # The manifest's matrix holds cross-validated decisions: each fold at its own threshold.
        at = ", each fold at the threshold chosen on the others" if source.positive is not None else ""
    else:
        threshold = source.preds.threshold
        at = f" at threshold {threshold:.2f}" if threshold is not None else ""
    ax.set_title(f"Confusion matrix{at}\n{subject}", fontsize=10)
    return fig, "confusion matrix with class names"


def misclassified(source: Source):
    """The most confident mistakes: each lesion beside its baseline, with its probabilities."""
    preds, ds, task = _preds(source), source.dataset, source.task
    if ds is None:
        raise Skip("the dataset is not available (moved or changed); pass --data")
    wrong = np.flatnonzero(preds.decisions != preds.y_true)
    if wrong.size == 0:
        raise Skip("no misclassified held-out patch")
    confidence = preds.y_prob[wrong, preds.decisions[wrong]]
    order = wrong[np.argsort(-confidence, kind="stable")][:_GALLERY_MAX]
    cols = min(4, len(order))
    rows = int(np.ceil(len(order) / cols))
    fig = _figure(3.1 * cols, 2.0 * rows + 0.7)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    positive = source.positive
    for ax, i in zip(axes, order):
        row = int(preds.rows[i])
        partner = int(ds.pair[row])
        # Lesion left, baseline right, whichever of the two was classified.
        lesion, baseline = (row, partner) if ds.label[row] != 0 or partner < 0 else (partner, row)
        images = [ds.x[lesion]] + ([ds.x[baseline]] if baseline >= 0 else [])
        ax.imshow(_side_by_side(images), cmap="gray", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        truth, called = task.classes[preds.y_true[i]], task.classes[preds.decisions[i]]
        if positive is not None:
            p = f"p({task.classes[positive]}) {preds.y_prob[i, positive]:.2f}"
        else:
            p = f"p({called}) {preds.y_prob[i, preds.decisions[i]]:.2f}"
        ax.set_title(f"true {truth}, called {called}\n{p} · {ds.patient[row]}", fontsize=8)
        ax.set_xlabel("lesion | baseline" if baseline >= 0 else "lesion (no baseline)", fontsize=7)
    for ax in axes[len(order):]:
        ax.axis("off")
    shown = f"the {len(order)} most confident of {wrong.size}" if len(order) < wrong.size else f"all {wrong.size}"
    if positive is None:
        how = "decided by the largest probability"
    elif source.kind == "bundle":
        how = "each fold decided at the threshold chosen on the other folds"
    else:
        how = f"decided at {preds.threshold:.2f}"
    fig.suptitle(f"Misclassified patches ({shown}, most confident first)\n"
                 f"{_subject(source)}; {how}; each pair shares one grey window", fontsize=10)
    return fig, f"{len(order)} misclassified patches, lesion beside baseline, with their probabilities"


def _side_by_side(images: list[np.ndarray]) -> np.ndarray:
    """Patches side by side on one grey window (2nd-98th percentile of both), so that a
    lesion and its baseline are compared at the same contrast; a white gap between them."""
    h = max(img.shape[0] for img in images)
    values = np.concatenate([img.ravel().astype(np.float64) for img in images])
    lo, hi = np.percentile(values, [2, 98])
    hi = hi if hi > lo else lo + 1.0
    parts = []
    for k, img in enumerate(images):
        scaled = np.clip((img.astype(np.float64) - lo) / (hi - lo), 0, 1)
        canvas = np.ones((h, img.shape[1]))
        canvas[: img.shape[0]] = scaled
        if k:
            parts.append(np.ones((h, max(2, h // 16))))
        parts.append(canvas)
    return np.concatenate(parts, axis=1)


def objective_by_trial(source: Source):
    """Each trial's validation score in the order it ran, and the best so far."""
    if source.kind != "run":
        raise Skip("a bundle has no search of its own; report its run")
    records = source.records
    if not records:
        raise Skip("no trial has finished yet")
    obj = source.objective
    fig = _figure(9, 4.8)
    ax = fig.subplots()
    builders = list(dict.fromkeys(r.get("builder") or "?" for r in records))
    scores = [r.get("score") if r.get("status") == "COMPLETED" else None for r in records]
    known = [s for s in scores if s is not None]
    floor = (min(known) if known else 0.0) - 0.05
    for k, b in enumerate(builders):
        xs = [i + 1 for i, r in enumerate(records) if (r.get("builder") or "?") == b and scores[i] is not None]
        ys = [scores[i - 1] for i in xs]
        ax.plot(xs, ys, "o", color=_COLOURS[k % len(_COLOURS)], markersize=8, label=b)
    failed = [i + 1 for i, s in enumerate(scores) if s is None]
    if failed:
        ax.plot(failed, [floor] * len(failed), "x", color="red", markersize=10, mew=2,
                label=f"failed ({len(failed)})")
    best, running = None, []
    for s in scores:
        if s is not None and (best is None or (s > best if obj.direction == "max" else s < best)):
            best = s
        running.append(np.nan if best is None else best)
    ax.step(range(1, len(records) + 1), running, where="post", color="black", lw=1.5, label="best so far")
    ax.set(xlabel="trial (in the order it finished)", ylabel=f"validation {_pretty(obj.name)} (best epoch)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"Search progress: {_pretty(obj.name)} of {len(records)} trials "
                 f"({'higher' if obj.direction == 'max' else 'lower'} is better)", fontsize=10)
    return fig, f"{obj.name} by trial and the best so far"


PLOTS = {
    "learning_curves": learning_curves,
    "roc": roc,
    "precision_recall": precision_recall,
    "objective_vs_threshold": objective_vs_threshold,
    "confusion_matrix": confusion_matrix,
    "misclassified": misclassified,
    "objective_by_trial": objective_by_trial,
}


def write_plots(source: Source, out_dir, top: int = 4) -> dict:
    """Write every figure that applies to ``source`` as ``out_dir/<name>.png``.

    Args:
        source: from ``automammo.report.open_source``.
        out_dir: created if needed; files of the same names are replaced.
        top: trials in the learning curves.

    Returns:
        ``{"written": [{"plot", "file", "title"}], "skipped": [{"plot", "reason"}]}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for name, draw in PLOTS.items():
        try:
            fig, title = draw(source, top) if name == "learning_curves" else draw(source)
        except Skip as exc:
            skipped.append({"plot": name, "reason": str(exc)})
            continue
        path = out_dir / f"{name}.png"
        _save(fig, path)
        written.append({"plot": name, "file": str(path), "title": title})
    return {"written": written, "skipped": skipped}
