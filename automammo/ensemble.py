"""Stacked ensembles from finished runs: members, meta-learner, threshold, bundle.

Which data each stage sees (``docs/ensembles.md`` says the same at more length):

1. Members are trials of one or more runs on the same dataset and task. Each member was
   fitted on its run's *fit* rows; its early stopping and its trial score used the run's
   *validation* rows.
2. The stacking rows are the validation rows that every member's run held out, i.e. rows
   no member was fitted on. Member outputs on them are the runs' stored validation
   predictions (``--features probs``) or the members' penultimate activations recomputed
   on them (``--features penultimate``).
3. The stacking rows are cut into K folds grouped by patient. Every candidate
   meta-learner is fitted on K-1 folds and predicts the K-th: out-of-fold probabilities.
4. For binary tasks each fold is decided with a threshold chosen on the other folds'
   out-of-fold probabilities only. The objective of those decisions is the
   cross-validated score that picks the meta-learner and is reported; the bundle's
   threshold is then chosen on all out-of-fold probabilities, which stand for the
   predictions of a meta-learner on data it has not seen.
5. The winning meta-learner is refitted on all stacking rows and exported.

The ``test`` split is never read here: only ``automammo evaluate`` touches it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from automammo import registry
from automammo.bundle import Bundle, bundle_path, load_member_model, penultimate_model, versions, write_bundle
from automammo.dataset import Dataset
from automammo.dataset import load as load_dataset
from automammo.errors import AutomammoError, BundleError, DataError, RunError
from automammo.evaluation import ThresholdRule, clinical_metrics, cross_validated_decisions
from automammo.meta import FEATURE_KINDS, MetaLearner, MetaLearnerError
from automammo.objectives import Objective, applicable
from automammo.preprocess import Preprocessing
from automammo.runs import Run
from automammo.splits import grouped_folds
from automammo.tasks import Task, get_task


@dataclass
class Candidate:
    """A finished trial that can be a member: its run, record and validation predictions."""

    run: Run
    config: dict
    record: dict
    index: np.ndarray
    y_prob: np.ndarray

    @property
    def trial_id(self) -> str:
        return str(self.record["trial_id"])

    @property
    def builder(self) -> str:
        return str(self.record.get("builder", ""))

    @property
    def key(self) -> str:
        return f"{self.run.path.name}/{self.trial_id}"

    def probs_at(self, rows: np.ndarray) -> np.ndarray:
        pos = {int(r): i for i, r in enumerate(self.index)}
        return self.y_prob[[pos[int(r)] for r in rows]].astype(np.float64)


@dataclass
class Assessment:
    """One meta-learner (or member) judged on the stacking rows by cross-validation."""

    name: str
    score: float | None = None
    oof: np.ndarray | None = None
    decisions: np.ndarray | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"score": self.score, "error": self.error, **self.extra}


@dataclass
class EnsembleResult:
    """What ``ensemble_and_export`` made.

    Attributes:
        bundle: the bundle directory written.
        manifest: its manifest.
        meta: the chosen meta-learner's name.
        threshold: the bundle's threshold (binary tasks) or None.
        score: the cross-validated validation score of the ensemble (see the module doc).
        assessments: every candidate meta-learner's cross-validated result, by name.
        best_member: the best single member judged the same way, for comparison.
    """

    bundle: Path
    manifest: dict
    meta: str
    threshold: float | None
    score: float | None
    assessments: dict[str, dict]
    best_member: dict


class _Silent:
    def message(self, text: str) -> None: ...


# -- members ---------------------------------------------------------------------------------


def load_candidates(run_dirs) -> tuple[list[Candidate], dict]:
    """Every completed trial with a saved model and validation predictions.

    Raises:
        RunError: no run given, a run is not finished, or runs disagree on task or data.
    """
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise RunError("give at least one run directory")
    candidates, first, seen = [], None, set()
    for d in run_dirs:
        run = Run(d)
        if run.path.resolve() in seen:
            continue
        seen.add(run.path.resolve())
        config = run.config()
        if first is None:
            first = config
        elif config.get("task", {}).get("name") != first.get("task", {}).get("name"):
            raise RunError(f"{run.path}: task {config.get('task', {}).get('name')} differs from "
                           f"{first['task']['name']} of {Path(run_dirs[0])}")
        elif config.get("data_fingerprint") != first.get("data_fingerprint"):
            raise RunError(f"{run.path}: searched on other data than {Path(run_dirs[0])}; "
                           "members must share a dataset so their held-out rows line up")
        for record in run.trials():
            if record.get("status") != "COMPLETED" or record.get("score") is None:
                continue
            if not run.model_path(record["trial_id"]).exists() or not run.preds_path(record["trial_id"]).exists():
                continue
            preds = run.load_preds(record["trial_id"])
            candidates.append(Candidate(run, config, record, np.asarray(preds["index"], dtype=np.int64),
                                        np.asarray(preds["y_prob"], dtype=np.float64)))
    if not candidates:
        raise RunError(f"no completed trial with a saved model in {', '.join(str(d) for d in run_dirs)}")
    return candidates, first


def stacking_rows(candidates: list[Candidate]) -> np.ndarray:
    """Rows held out by every candidate's run: no member was fitted on them."""
    rows = candidates[0].index
    for c in candidates[1:]:
        rows = np.intersect1d(rows, c.index)
    if rows.size == 0:
        raise RunError("the runs share no validation rows (different seeds or validation fractions); "
                       "a member would be scored on rows another member was fitted on")
    return np.sort(rows)


def rank_candidates(candidates, rows, y, objective: Objective, positive) -> list[tuple[Candidate, float]]:
    """Candidates best first by the objective on the stacking rows (at threshold 0.5, as
    the search scores trials)."""
    scored = []
    for c in candidates:
        s = objective(y, c.probs_at(rows), positive)
        scored.append((c, s if np.isfinite(s) else None))
    worst = -np.inf if objective.direction == "max" else np.inf

    def key(item):
        return item[1] if item[1] is not None else worst

    return sorted(scored, key=key, reverse=objective.direction == "max")


def select_members(ranked, top: int, diverse: bool) -> list[tuple[Candidate, float]]:
    """The top ``top``; with ``diverse``, the best of each builder before any second best."""
    if top < 1:
        raise AutomammoError("--top must be at least 1")
    if not diverse:
        return ranked[:top]
    seen: dict[str, int] = {}
    depth = []
    for c, _ in ranked:
        depth.append(seen.get(c.builder, 0))
        seen[c.builder] = depth[-1] + 1
    order = sorted(range(len(ranked)), key=lambda i: (depth[i], i))
    return [ranked[i] for i in order[:top]]


# -- member features ---------------------------------------------------------------------------


def _load_data(config: dict, data) -> Dataset:
    path = data or config.get("data")
    if not path:
        raise RunError("the run records no dataset; pass --data")
    ds = load_dataset(path)
    if ds.fingerprint() != config.get("data_fingerprint"):
        raise DataError(f"{path}: not the dataset the runs were searched on (fingerprint differs); "
                        "pass --data with the original file")
    return ds


def _member_inputs(ds: Dataset, rows: np.ndarray, prep: Preprocessing, pair: bool):
    x = prep.apply(ds.x[rows])
    if not pair:
        return x
    partners = ds.pair[rows]
    if np.any(partners < 0):
        raise DataError(f"{ds.source}: a pair member needs a baseline for every lesion; "
                        f"{int(np.sum(partners < 0))} lack one")
    return {"lesion": x, "baseline": prep.apply(ds.x[partners])}


def _raw_inputs(ds: Dataset, rows: np.ndarray, pair: bool):
    return ds.x[rows], (ds.x[ds.pair[rows]] if pair else None)


# -- cross-validation ----------------------------------------------------------------------------


def make_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int):
    """(other positions, fold positions) pairs, grouped by patient, stratified by class."""
    classes = np.unique(y)
    # Patients, not samples, bound the folds: a fold holds whole patients, and every
    # learner needs both classes in the part it is fitted on.
    per_class = min(len(np.unique(groups[y == c])) for c in classes)
    k = int(min(k, len(np.unique(groups)), per_class))
    while k >= 2:
        folds = grouped_folds(y, groups, k, seed)
        if all(len(np.unique(y[others])) == len(classes) for others, _ in folds):
            return folds
        k -= 1
    raise DataError(f"the stacking rows hold {len(y)} samples of {len(np.unique(groups))} patients, and as few "
                    f"as {per_class} patients have a class: too few to cross-validate a meta-learner")


def out_of_fold(cls, X, y, folds, n_classes: int, seed: int) -> np.ndarray:
    """Probabilities of each fold from a learner fitted on the other folds."""
    oof = np.zeros((len(y), n_classes))
    for others, fold in folds:
        oof[fold] = cls(n_classes, seed).fit(X[others], y[others]).predict_proba(X[fold])
    return oof


def assess(name, oof, y, folds, task: Task, objective: Objective, rule: ThresholdRule) -> Assessment:
    """Score out-of-fold probabilities honestly: thresholds never see the fold they decide."""
    positive = task.positive if task.binary else None
    if positive is None:
        decisions = np.argmax(oof, axis=1)
        return Assessment(name, _finite(objective(y, oof, None)), oof, decisions)
    decisions, used = cross_validated_decisions(y, oof[:, positive], folds, rule, positive)
    truth = y == positive
    called = decisions == positive
    sens = float(np.mean(called[truth])) if truth.any() else None
    spec = float(np.mean(~called[~truth])) if (~truth).any() else None
    if rule.min_sensitivity is not None:
        score = spec
    elif objective.thresholded:
        # A thresholded objective depends on the decisions only: score them as one-hot.
        score = objective(y, np.eye(2)[decisions], positive, 0.5)
    else:
        score = objective(y, oof, positive)
    extra = {"sensitivity": sens, "specificity": spec,
             "fold_thresholds": sorted({round(float(t), 4) for t in used})}
    return Assessment(name, _finite(score), oof, decisions, extra=extra)


def _finite(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def _better(a: Assessment, b: Assessment | None, direction: str) -> bool:
    if a.score is None:
        return False
    if b is None or b.score is None:
        return True
    return a.score > b.score if direction == "max" else a.score < b.score


# -- the whole stage -------------------------------------------------------------------------------


def ensemble_and_export(run_dirs, out, meta: str | None = None, top: int = 5, diverse: bool = False,
                        features: str = "probs", min_sensitivity: float | None = None,
                        objective: str | None = None, data=None, folds: int = 5, seed: int = 0,
                        replicates: int = 1000, reporter=None) -> EnsembleResult:
    """Stack the best trials of finished runs and export the ensemble as a bundle.

    Args:
        run_dirs: one or more run directories on the same dataset and task.
        out: the bundle to write (``.ammo`` is appended when missing); replaced atomically.
        meta: meta-learner name; None tries every registered one that takes ``features`` and
            keeps the best by cross-validated objective.
        top: number of members.
        diverse: take the best trial of each builder before any builder's second best.
        features: ``"probs"`` (member class probabilities) or ``"penultimate"`` (member
            penultimate-layer activations).
        min_sensitivity: for binary tasks, choose the operating point with the highest
            specificity whose sensitivity is at least this, instead of the objective's optimum.
        objective: objective name; defaults to the first run's.
        data: the dataset file, when the path recorded in the run has moved.
        folds: cross-validation folds over the stacking rows (fewer when data are scarce).
        seed: fold and meta-learner seed.
        replicates: bootstrap replicates of the validation intervals.
        reporter: anything with ``message(text)``, for progress.

    Returns:
        An ``EnsembleResult``.

    Raises:
        AutomammoError: unusable runs, names or data (nothing is written then).
    """
    reporter = reporter or _Silent()
    if features not in FEATURE_KINDS:
        raise AutomammoError(f"unknown --features {features!r}; known: {', '.join(FEATURE_KINDS)}")
    candidates, config = load_candidates(run_dirs)
    task = get_task(config["task"]["name"])
    objective_name = objective or config.get("search", {}).get("objective", "auc")
    obj = registry.get("objective", objective_name)
    if not applicable(obj, task.n_classes):
        raise AutomammoError(f"objective {obj.name} applies to binary tasks only; "
                             f"task {task.name} has {task.n_classes} classes")
    if min_sensitivity is not None and not task.binary:
        raise AutomammoError(f"--min-sensitivity applies to binary tasks; task {task.name} has {task.n_classes} classes")
    rule = ThresholdRule(obj, min_sensitivity)
    learners = _learners(meta, features)

    ds = _load_data(config, data)
    rows = stacking_rows(candidates)
    y = task.targets(ds.label[rows])
    if np.any(y < 0):
        raise RunError("validation rows of the runs are not samples of the task; were the runs made on this dataset?")
    groups = ds.patient[rows]
    positive = task.positive if task.binary else None
    ranked = rank_candidates(candidates, rows, y, obj, positive)
    chosen = select_members(ranked, top, diverse)
    reporter.message(f"{len(chosen)} members of the {len(candidates)} finished trials with a kept model; "
                     f"{len(rows)} stacking rows of {len(np.unique(groups))} patients (validation, never fitted on)")

    models = [load_member_model(c.run.model_path(c.trial_id), c.key) for c, _ in chosen]
    X, sizes, pairs, preps = [], [], [], []
    for (c, _), model in zip(chosen, models):
        prep = Preprocessing.from_dict(c.config["preprocessing"])
        pair = len(model.inputs) == 2
        if features == "probs":
            block = c.probs_at(rows)
        else:
            block = np.asarray(penultimate_model(model).predict(_member_inputs(ds, rows, prep, pair),
                                                                batch_size=64, verbose=0), dtype=np.float64)
            block = block.reshape(len(rows), -1)
        X.append(block)
        sizes.append(block.shape[1])
        pairs.append(pair)
        preps.append(prep)
    X = np.concatenate(X, axis=1)

    fold_list = make_folds(y, groups, folds, seed)
    assessments: dict[str, Assessment] = {}
    best = None
    for name, cls in learners.items():
        try:
            oof = out_of_fold(cls, X, y, fold_list, task.n_classes, seed)
            result = assess(name, oof, y, fold_list, task, obj, rule)
        except (MetaLearnerError, AutomammoError) as exc:
            if meta is not None:
                raise
            result = Assessment(name, error=str(exc))
        assessments[name] = result
        shown = "failed: " + result.error if result.error else f"{_score_label(rule, obj)} {_fmt(result.score)}"
        reporter.message(f"meta-learner {name}: {shown}")
        if _better(result, best, "max" if rule.min_sensitivity is not None else obj.direction):
            best = result
    if best is None:
        raise AutomammoError("no meta-learner could be fitted: " +
                             "; ".join(f"{n}: {a.error}" for n, a in assessments.items()))
    # The best single member judged exactly like the meta-learners: does stacking help?
    member_view = []
    for c, _ in chosen:
        try:
            member_view.append(assess(c.key, c.probs_at(rows), y, fold_list, task, obj, rule))
        except AutomammoError as exc:
            member_view.append(Assessment(c.key, error=str(exc)))
    best_member = max(member_view, key=lambda a: -np.inf if a.score is None else
                      (a.score if rule.min_sensitivity is not None or obj.direction == "max" else -a.score))

    learner = learners[best.name](task.n_classes, seed).fit(X, y)
    threshold = rule.choose(y, best.oof[:, positive], positive) if positive is not None else None
    validation = clinical_metrics(y, best.oof, best.decisions, task.classes, positive, groups, replicates, seed)
    reporter.message(f"chosen: {best.name}, cross-validated {_score_label(rule, obj)} {_fmt(best.score)} "
                     f"(best single member {best_member.name}: {_fmt(best_member.score)})"
                     + (f"; threshold {threshold:.4f} ({rule.describe()})" if threshold is not None else ""))

    out = bundle_path(out)
    member_specs, copies = [], []
    for i, ((c, score), pair, prep, size) in enumerate(zip(chosen, pairs, preps, sizes)):
        dest = f"members/m{i}-{_slug(c.builder)}-{_slug(c.trial_id)}.keras"
        copies.append((c.run.model_path(c.trial_id), dest))
        member_specs.append({
            "file": dest, "builder": c.builder, "trial_id": c.trial_id, "run": str(c.run.path),
            "inputs": "pair" if pair else "single", "feature_size": int(size),
            "hyperparameters": c.record.get("hyperparameters", {}), "preprocessing": prep.to_dict(),
            "validation": {"objective": obj.name, "score": score, "threshold": 0.5, "n": int(len(rows))},
        })
    shared = {json_key(p) for p in preps}
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": {"name": task.name, "classes": list(task.classes), "positive": positive},
        "threshold": threshold,
        "threshold_rule": rule.to_dict(),
        "objective": {"name": obj.name, "direction": obj.direction},
        "features": features,
        "preprocessing": preps[0].to_dict() if len(shared) == 1 else None,
        "image_size": preps[0].image_size if len(shared) == 1 else None,
        "members": member_specs,
        "meta_learner": {
            "selection": "given (--meta)" if meta else "best cross-validated score of every registered meta-learner",
            "candidates": {n: a.summary() for n, a in assessments.items()},
        },
        "validation": {
            "data": "validation rows held out by every member's run, cross-validated in patient-grouped folds",
            "folds": len(fold_list), "seed": seed,
            "score": {"name": _score_label(rule, obj), "value": best.score},
            "best_member": {"member": best_member.name, "score": best_member.score},
            **validation,
        },
        "data": {"source": str(data or config.get("data")), "fingerprint": config.get("data_fingerprint"),
                 "runs": [str(Path(d)) for d in run_dirs]},
        "oof": {"file": "oof.npz",
                "description": "the chosen meta-learner's out-of-fold probabilities and cross-validated "
                               "decisions on the stacking rows (dataset row indices), with their classes "
                               "and patients: what the validation metrics were computed from"},
        "versions": versions(),
    }
    oof_arrays = {"rows": np.asarray(rows, dtype=np.int64), "y_true": np.asarray(y, dtype=np.int64),
                  "y_prob": np.asarray(best.oof, dtype=np.float64),
                  "decisions": np.asarray(best.decisions, dtype=np.int64),
                  "groups": np.asarray(groups).astype(str)}
    raw_x, raw_b = _raw_inputs(ds, rows, any(pairs))

    def check(bundle: Bundle) -> None:
        # The exported members must reproduce the outputs the meta-learner was fitted on,
        # or the preprocessing recorded would not be the one the members saw.
        again = bundle.member_features(raw_x, raw_b)
        if again.shape != X.shape or not np.allclose(again, X, rtol=1e-3, atol=1e-4):
            diff = float(np.max(np.abs(again - X))) if again.shape == X.shape else float("nan")
            raise BundleError(f"the exported members do not reproduce their validation outputs (max difference {diff:.3g})")

    reporter.message(f"writing {out}")
    write_bundle(out, manifest, copies, learner, check=check, arrays={"oof.npz": oof_arrays})
    return EnsembleResult(out, _read(out), best.name, threshold, best.score,
                          {n: a.summary() for n, a in assessments.items()},
                          {"member": best_member.name, "score": best_member.score})


def _learners(meta: str | None, features: str) -> dict[str, type[MetaLearner]]:
    if meta is not None:
        cls = registry.get("meta-learner", meta)
        if features not in cls.accepts:
            raise AutomammoError(f"meta-learner {meta} stacks {', '.join(cls.accepts)}, not --features {features}")
        return {meta: cls}
    # Built-ins first, from simplest to most flexible, then third parties'; a later learner
    # must score strictly better to win, so a tie keeps the simpler, better-known one.
    registered = sorted(registry.registered("meta-learner").items(), key=lambda kv: kv[1].package != "automammo")
    table = {n: r.obj for n, r in registered if features in r.obj.accepts}
    if not table:
        raise AutomammoError(f"no registered meta-learner stacks --features {features}")
    return table


def _score_label(rule: ThresholdRule, obj: Objective) -> str:
    return "specificity" if rule.min_sensitivity is not None else obj.name


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


def json_key(prep: Preprocessing) -> tuple:
    return tuple(sorted(prep.to_dict().items()))


def _read(out: Path) -> dict:
    import json

    return json.loads((out / "manifest.json").read_text())
