"""What a report says about a run or a bundle, collected once as plain data.

``open_source(path)`` reads a run directory or a ``NAME.ammo`` bundle and the held-out
predictions of the model it is about (a run's best trial, or a bundle's ensemble);
``collect(source)`` turns it into one JSON-ready dict. ``automammo report`` renders that
dict with rich (``automammo.render``) or prints it with ``--json``, so both views say the
same thing; ``automammo.plots`` draws its figures from the same ``Source``.

Which predictions a report shows, and why:

- **run**: the best trial's stored validation predictions (``preds/<trial>.npz``, the
  restored best epoch), decided at 0.5, the threshold of the metrics the search records. A
  thresholded objective on a binary task is scored by the search at each trial's best
  threshold instead (``f2_best``); that threshold is the optimum shown beside 0.5, marked
  as optimistic: it was chosen on the data it is scored on.
- **bundle**: the ensemble's out-of-fold probabilities on the stacking rows and its
  cross-validated decisions (``docs/ensembles.md``), stored in the bundle (``oof.npz``)
  beside the metrics and confusion matrix the manifest computed from them, so a bundle
  alone is enough. A bundle written before bundles kept them has them recomputed from the
  member runs exactly as the ensemble stage made them; either way they are checked against
  the stored confusion matrix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from automammo import registry
from automammo.dataset import Dataset
from automammo.dataset import load as load_dataset
from automammo.errors import AutomammoError, DataError, RunError
from automammo.evaluation import ThresholdRule, clinical_metrics, cross_validated_decisions
from automammo.objectives import THRESHOLDS, Objective, predict_classes
from automammo.runs import Run
from automammo.tasks import Task, get_task

DEFAULT_TOP = 10
# Keras Tuner's Hyperband bookkeeping values; only the epoch budget means something to a reader.
_TUNER_KEYS_SHOWN = ("tuner/epochs",)
_BOOTSTRAP_REPLICATES = 1000


@dataclass
class Predictions:
    """Held-out predictions of the model a report is about.

    Attributes:
        subject: what made them ("trial 3 (scratch_cnn)", "ensemble of 2 (svc)").
        description: which data they are on and how they were decided.
        rows: dataset rows (``index`` in ``preds/<trial>.npz``).
        y_true: (N,) class indices of the task.
        y_prob: (N, C) class probabilities.
        decisions: (N,) class index per row, as reported.
        threshold: the operating threshold on p(positive), binary tasks only.
        threshold_label: where that threshold comes from.
        optimum: the objective's optimum threshold on these very predictions (runs only;
            optimistic), or None.
        groups: (N,) patient ids when the dataset is available, for a patient bootstrap.
        reproduced: for a bundle, whether the recomputed decisions give the manifest's
            confusion matrix; None for a run.
    """

    subject: str
    description: str
    rows: np.ndarray
    y_true: np.ndarray
    y_prob: np.ndarray
    decisions: np.ndarray
    threshold: float | None
    threshold_label: str
    optimum: float | None = None
    groups: np.ndarray | None = None
    reproduced: bool | None = None


@dataclass
class Source:
    """Everything a report or a plot is drawn from, read once.

    Attributes:
        kind: ``"run"`` or ``"bundle"``.
        path: the run directory or bundle.
        task: the task.
        objective: the run's (or bundle's) objective.
        run: the run, for a run report.
        config: the run's config.json (empty for a bundle).
        manifest: the bundle's manifest, for a bundle report.
        records: trial records: every trial of the run, or the members' own records.
        preds: held-out predictions of the reported model, or None when there are none yet.
        dataset: the dataset the run or bundle was built on, when it is still where it was.
        warnings: what could not be shown and why.
    """

    kind: str
    path: Path
    task: Task
    objective: Objective
    run: Run | None = None
    config: dict = field(default_factory=dict)
    manifest: dict | None = None
    records: list[dict] = field(default_factory=list)
    preds: Predictions | None = None
    dataset: Dataset | None = None
    warnings: list[str] = field(default_factory=list)
    # Results computed once and shared by the report and the figures (the threshold sweep
    # calls the objective 99 times).
    computed: dict = field(default_factory=dict, repr=False)

    @property
    def positive(self) -> int | None:
        return self.task.positive if self.task.binary else None


# -- reading ----------------------------------------------------------------------------


def open_source(path, data=None) -> Source:
    """Read a run directory or a bundle for a report.

    Args:
        path: a run directory (holds ``config.json``) or a bundle (holds ``manifest.json``).
        data: the dataset file, when it moved since the run or bundle was made.

    Raises:
        AutomammoError: ``path`` is neither, or its files are unreadable.
    """
    path = Path(path)
    if (path / "manifest.json").is_file():
        return _open_bundle(path, data)
    if (path / "config.json").is_file():
        return _open_run(path, data)
    raise AutomammoError(f"{path}: neither a run directory (no config.json) nor a bundle (no manifest.json)")


def _load_data(path, fingerprint: str | None, warnings: list[str], given: bool = False) -> Dataset | None:
    """The dataset at ``path`` if it is the one recorded; else None and a warning why.

    Raises:
        DataError: a dataset the user named (``given``, i.e. ``--data``) is unreadable or is
            not the recorded one: a note would hide the mistake.
    """
    if not path:
        warnings.append("no dataset recorded: patches and patient grouping are not shown")
        return None
    try:
        ds = load_dataset(path)
    except AutomammoError as exc:
        if given:
            raise
        warnings.append(f"dataset unavailable ({exc}); pass --data to show patches and group by patient")
        return None
    if fingerprint and ds.fingerprint() != fingerprint:
        if given:
            raise DataError(f"{path}: not the dataset this was built on (fingerprint differs); "
                            "--data needs the original")
        warnings.append(f"{path} is not the dataset this was built on (fingerprint differs); "
                        "patches and patient grouping are not shown; pass --data with the original")
        return None
    return ds


def _open_run(path: Path, data) -> Source:
    run = Run(path)
    config = run.config()
    try:
        task = get_task(config["task"]["name"])
        objective = registry.get("objective", config["search"]["objective"])
    except KeyError as exc:
        raise RunError(f"{run.config_path}: lacks {exc}; not written by automammo search") from None
    source = Source("run", path, task, objective, run=run, config=config, records=run.trials())
    source.dataset = _load_data(data or config.get("data"), config.get("data_fingerprint"), source.warnings,
                                given=data is not None)
    ranked = run.ranked(objective.direction)
    best = next((t for t in ranked if run.preds_path(t["trial_id"]).exists()), None)
    if ranked and best is not ranked[0]:
        source.warnings.append(f"trial {ranked[0]['trial_id']} has no stored predictions; "
                               "curves show the best trial that has")
    if best is not None:
        source.preds = _trial_predictions(source, best)
    return source


def _trial_predictions(source: Source, record: dict) -> Predictions:
    stored = source.run.load_preds(record["trial_id"])
    rows = np.asarray(stored["index"], dtype=np.int64)
    y_true = np.asarray(stored["y_true"], dtype=np.int64)
    y_prob = np.asarray(stored["y_prob"], dtype=np.float64)
    positive = source.positive
    folds = int(record.get("folds") or 1)
    optimum = None
    if positive is not None and source.objective.thresholded:
        # Without folds the search logged this optimum for the restored best epoch, i.e.
        # for these very predictions; with folds it logged the mean over the folds.
        optimum = (record.get("metrics") or {}).get(f"{source.objective.name}_threshold") if folds == 1 else None
        if optimum is None:
            optimum = source.objective.best_threshold(y_true, y_prob, positive)[0]
    groups = source.dataset.patient[rows] if source.dataset is not None else None
    if folds > 1:
        description = (f"validation rows of fold 1 of {folds} (the fold whose model is kept) at the trial's "
                       f"best epoch; the leaderboard's scores are means over the {folds} folds")
    else:
        description = "validation rows of the run at the trial's best epoch (the rows the search scored it on)"
    return Predictions(
        subject=f"trial {record['trial_id']} ({record.get('builder', '?')})",
        description=description,
        rows=rows, y_true=y_true, y_prob=y_prob,
        decisions=predict_classes(y_prob, positive, 0.5),
        threshold=0.5 if positive is not None else None,
        threshold_label=_run_threshold_label(record, source.objective.name, optimum),
        optimum=optimum, groups=groups,
    )


def _run_threshold_label(record: dict, objective: str, optimum) -> str:
    """Why a run's best trial is shown decided at 0.5, and what its score used instead."""
    if str(record.get("score_key") or "").endswith("_best") and optimum is not None:
        return (f"0.5, the threshold of the metrics the search records; it scored {objective} "
                f"at the trial's best threshold, {optimum:.2f} (the optimum below)")
    return "0.5, the threshold of the metrics the search records"


def _open_bundle(path: Path, data) -> Source:
    from automammo.bundle import read_manifest, verify_files
    from automammo.errors import BundleError

    manifest = read_manifest(path)
    task = get_task(manifest["task"]["name"])
    objective = registry.get("objective", manifest["objective"]["name"])
    runs = [locate_run(r, path) for r in (manifest.get("data") or {}).get("runs", [])]
    source = Source("bundle", path, task, objective, manifest=manifest)
    verified = True
    try:
        verify_files(path, manifest)
    except BundleError as exc:
        source.warnings.append(f"integrity check failed: {exc}")
        verified = False
    by_run = {}
    for spec in manifest["members"]:
        run = locate_run(spec["run"], path)
        if run.exists():
            by_run.setdefault(run.path, {t.get("trial_id"): t for t in run.trials()})
            if spec["trial_id"] in by_run[run.path]:
                source.records.append(by_run[run.path][spec["trial_id"]])
    manifest_data = manifest.get("data") or {}
    source.dataset = _load_data(data or manifest_data.get("source"), manifest_data.get("fingerprint"),
                                source.warnings, given=data is not None)
    try:
        source.preds = _ensemble_predictions(source, runs, verified)
    except AutomammoError as exc:
        source.warnings.append(f"the ensemble's out-of-fold predictions are not in the bundle and cannot be recomputed ({exc}); "
                               "curves and the patch gallery are not shown")
    return source


def locate_run(recorded: str, bundle: Path) -> Run:
    """The run a bundle recorded, also when the path was relative to another directory.

    A manifest keeps run paths as given to ``automammo ensemble`` (often relative to where
    it ran); a run beside the bundle, by the default layout, is found from anywhere.
    """
    run = Run(recorded)
    if not run.exists():
        beside = Run(Path(bundle).parent / Path(recorded).name)
        if beside.exists():
            return beside
    return run


def _ensemble_predictions(source: Source, runs: list[Run], verified: bool = True) -> Predictions:
    """The ensemble's out-of-fold probabilities and cross-validated decisions.

    Read from the bundle (``oof.npz``) when it holds them and its files passed their
    integrity check; otherwise recomputed from the member runs (a bundle written before
    bundles kept them, or a damaged one), by the same steps as
    ``automammo.ensemble.ensemble_and_export``: the stacking rows are the validation rows
    every run held out; the same patient-grouped folds (recorded count and seed); the same
    meta-learner fitted on the other folds.
    """
    from automammo.bundle import read_oof
    from automammo.errors import BundleError

    stored = None
    if verified:
        try:
            stored = read_oof(source.path, source.manifest)
        except BundleError as exc:
            source.warnings.append(f"{exc}; recomputing them from the member runs")
    if stored is not None:
        return _ensemble_from(source, stored["rows"], stored["y_true"], stored["y_prob"], stored["decisions"],
                              stored["groups"])
    return _recompute_ensemble_predictions(source, runs)


def _threshold_rule(source: Source) -> ThresholdRule:
    """The rule the bundle's threshold was chosen by, as its manifest records it."""
    spec = source.manifest.get("threshold_rule") or {}
    return ThresholdRule(source.objective, spec.get("min_sensitivity"))


def _ensemble_from(source: Source, rows, y, oof, decisions, groups) -> Predictions:
    manifest, task = source.manifest, source.task
    if source.positive is not None:
        label = f"the bundle's threshold ({_threshold_rule(source).describe()}, chosen on out-of-fold probabilities)"
    else:
        label = "argmax (multi-class task)"
    stored_cm = manifest["validation"].get("confusion_matrix", {}).get("counts")
    c = task.n_classes
    cm = np.bincount(y * c + decisions, minlength=c * c).reshape(c, c).tolist()
    n_members = len(manifest["members"])
    return Predictions(
        subject=f"ensemble of {n_members} member{'s' if n_members != 1 else ''} ({manifest['meta_learner']['name']})",
        description=("out-of-fold ensemble probabilities on the stacking rows (validation rows no "
                     "member was fitted on); each fold decided at a threshold chosen on the others"),
        rows=rows, y_true=y, y_prob=oof, decisions=decisions,
        threshold=manifest["threshold"], threshold_label=label, groups=groups,
        reproduced=stored_cm == cm,
    )


def _recompute_ensemble_predictions(source: Source, runs: list[Run]) -> Predictions:
    from automammo.ensemble import make_folds, out_of_fold

    manifest, task, ds = source.manifest, source.task, source.dataset
    if ds is None:
        raise AutomammoError("the dataset is needed to find the stacking rows' classes and patients")
    missing = [str(r.path) for r in runs if not r.exists()]
    if not runs or missing:
        raise RunError(f"the member runs are gone ({', '.join(missing) or 'none recorded'})")
    rows = None
    for run in runs:
        stored = sorted(run.preds_dir.glob("*.npz"))
        if not stored:
            raise RunError(f"{run.path} has no stored validation predictions")
        index = run.load_preds(stored[0].stem)["index"]
        rows = index if rows is None else np.intersect1d(rows, index)
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    y = task.targets(ds.label[rows])
    groups = ds.patient[rows]
    positive = source.positive
    features = _member_features(source, rows)

    validation = manifest["validation"]
    folds = make_folds(y, groups, int(validation["folds"]), int(validation["seed"]))
    meta_name = manifest["meta_learner"]["name"]
    oof = out_of_fold(registry.get("meta-learner", meta_name), features, y, folds, task.n_classes,
                      int(validation["seed"]))
    if positive is not None:
        decisions, _ = cross_validated_decisions(y, oof[:, positive], folds, _threshold_rule(source), positive)
    else:
        decisions = np.argmax(oof, axis=1)
    return _ensemble_from(source, rows, y, oof, decisions, groups)


def _member_features(source: Source, rows: np.ndarray) -> np.ndarray:
    """What the meta-learner stacked: the members' stored probabilities, or (penultimate
    features, or a run that no longer keeps them) the members run again on the rows."""
    manifest = source.manifest
    if manifest["features"] == "probs":
        blocks = []
        for spec in manifest["members"]:
            run = locate_run(spec["run"], source.path)
            if not run.preds_path(spec["trial_id"]).exists():
                break
            stored = run.load_preds(spec["trial_id"])
            position = {int(r): i for i, r in enumerate(stored["index"])}
            blocks.append(np.asarray(stored["y_prob"], dtype=np.float64)[[position[int(r)] for r in rows]])
        else:
            return np.concatenate(blocks, axis=1)
    from automammo.bundle import Bundle

    bundle = Bundle.load(source.path)
    ds = source.dataset
    baselines = ds.x[ds.pair[rows]] if bundle.needs_baseline else None
    return bundle.member_features(ds.x[rows], baselines)


# -- collecting -----------------------------------------------------------------------------


def collect(source: Source, top: int = DEFAULT_TOP) -> dict:
    """The whole report as plain data (str, int, float, None, lists and dicts only).

    Args:
        source: from ``open_source``.
        top: completed trials shown in the leaderboard (failed ones are always listed).

    Returns:
        A dict with ``kind``, ``path``, ``task``, ``objective``, ``status`` and ``warnings``;
        for a run also ``search``, ``leaderboard``, ``best_per_builder``, ``progress`` and
        ``tensorboard``; for a bundle ``ensemble``; and, when there are held-out
        predictions, ``evaluated``, ``thresholds``, ``confusion_matrix`` and ``metrics``.
    """
    if top < 1:
        raise AutomammoError("--top must be at least 1")
    task, obj = source.task, source.objective
    warnings = list(source.warnings)
    out: dict = {
        "kind": source.kind,
        "path": str(source.path),
        "task": {"name": task.name, "classes": list(task.classes),
                 "positive": None if source.positive is None else task.classes[source.positive]},
        "objective": {"name": obj.name, "direction": obj.direction, "description": obj.description},
    }
    if source.kind == "run":
        out["status"] = run_status(source)
        out["search"] = _search_summary(source.config)
        out["leaderboard"] = leaderboard(source.records, top)
        out["best_per_builder"] = best_per_builder(source.records, obj.direction)
        out["progress"] = progress(source.records, obj.direction)
        out["tensorboard"] = tensorboard_summary(source)
    else:
        out["status"] = {"state": "bundle", "message": f"bundle made {source.manifest.get('created', '?')}"}
        out["ensemble"] = ensemble_summary(source)
    preds = source.preds
    if preds is not None:
        out["evaluated"] = {
            "subject": preds.subject, "data": preds.description, "n": int(len(preds.rows)),
            "n_per_class": {c: int(np.sum(preds.y_true == i)) for i, c in enumerate(task.classes)},
            "threshold": preds.threshold, "threshold_label": preds.threshold_label,
            "optimum": preds.optimum, "reproduced": preds.reproduced,
        }
        out["thresholds"] = threshold_sweep(source)
        if preds.reproduced is False:
            warnings.append("the recomputed out-of-fold decisions do not reproduce the manifest's confusion "
                            "matrix; curves may differ slightly from the stored metrics")
    if source.kind == "bundle":
        # The manifest's numbers are the validated ones, with or without recomputed curves.
        metrics = source.manifest["validation"]
    elif preds is not None:
        metrics = clinical_metrics(preds.y_true, preds.y_prob, preds.decisions, task.classes, source.positive,
                                   preds.groups, _BOOTSTRAP_REPLICATES, seed=0)
    else:
        metrics = None
    if metrics is not None:
        out["confusion_matrix"] = metrics["confusion_matrix"]
        out["metrics"] = {k: metrics[k] for k in ("n", "n_patients", "bootstrap", "metrics")}
    out["warnings"] = list(dict.fromkeys(warnings))
    return plain(out)


def run_status(source: Source) -> dict:
    """Finished, in progress, or stopped; with the counts that say so."""
    run, config = source.run, source.config
    search = config.get("search", {})
    records = source.records
    planned = search.get("trials") if search.get("tuner") != "hyperband" else None
    completed = sum(r.get("status") == "COMPLETED" for r in records)
    failed = len(records) - completed
    best_model = run.best_model_path.exists()
    under_way = _trials_under_way(run, {r.get("trial_id") for r in records})
    limit = int(search.get("max_consecutive_failures", 3) or 3)
    tail = records[-limit:]
    stopped = len(tail) == limit and all(r.get("status") != "COMPLETED" for r in tail)
    of = f" of {planned}" if planned else ""
    resume = f"continue with automammo search --run {run.path} --resume"
    try:  # how the search said it ended (ended.json), if it did
        ended = json.loads(run.ended_path.read_text())
    except (OSError, json.JSONDecodeError):
        ended = {}
    if under_way:
        state = "in progress"
        message = (f"{len(records)}{of} trials recorded; trial {', '.join(under_way)} under way "
                   f"(or interrupted: {resume})")
    elif ended.get("state") == "stopped":
        state = "stopped"
        message = f"{ended.get('message')}; {len(records)}{of} trials recorded"
    elif stopped and (planned is None or len(records) < planned):
        state = "stopped"
        message = f"stopped after {limit} consecutive failed trials; {len(records)}{of} trials recorded"
    elif ended.get("state") == "finished" and best_model:
        state = "finished"
        message = f"{len(records)}{of} trials, {completed} completed, {failed} failed" + (
            f"; {ended['note']}" if ended.get("note") else "")
    elif (planned is not None and len(records) < planned) or not best_model:
        state = "in progress"
        why = "no best.keras yet" if not best_model else f"{planned - len(records)} trials to go"
        message = (f"{len(records)}{of} trials recorded, {why}: the search is still running or was "
                   f"interrupted ({resume})")
    else:
        state = "finished"
        message = f"{len(records)}{of} trials, {completed} completed, {failed} failed"
    return {"state": state, "message": message, "recorded": len(records), "planned": planned,
            "completed": completed, "failed": failed, "best_model": best_model, "under_way": under_way}


def _trials_under_way(run: Run, recorded: set) -> list[str]:
    """Trials Keras Tuner started (``tuner/trial_*/trial.json`` RUNNING) but nobody recorded."""
    out = []
    for file in sorted(run.tuner_dir.glob("trial_*/trial.json")):
        try:
            trial = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if trial.get("status") == "RUNNING" and trial.get("trial_id") not in recorded:
            out.append(str(trial.get("trial_id")))
    return out


def _search_summary(config: dict) -> dict:
    search = config.get("search", {})
    keys = ("tuner", "trials", "epochs", "patience", "image_size", "seed", "val_fraction", "folds", "builders")
    return {"data": config.get("data"), "split": config.get("split"), **{k: search.get(k) for k in keys}}


def varying_hyperparameters(records: list[dict]) -> tuple[list[str], dict]:
    """(names whose value differs between records, {name: value} of those that do not)."""
    names: list[str] = []
    for r in records:
        for name in r.get("hyperparameters") or {}:
            if name.startswith("tuner/") and name not in _TUNER_KEYS_SHOWN:
                continue
            if name not in names:
                names.append(name)
    missing = object()
    varying, constant = [], {}
    for name in names:
        values = [(r.get("hyperparameters") or {}).get(name, missing) for r in records]
        if len({json.dumps(v, sort_keys=True, default=str) if v is not missing else "\0" for v in values}) > 1:
            varying.append(name)
        else:
            constant[name] = values[0]
    return varying, constant


def leaderboard(records: list[dict], top: int) -> dict:
    """Completed trials best first (at most ``top``), then every trial that did not complete."""
    direction = next((r.get("direction") for r in records if r.get("direction")), "max")
    scored = [r for r in records if r.get("status") == "COMPLETED" and r.get("score") is not None]
    scored.sort(key=lambda r: r["score"], reverse=direction == "max")
    unscored = [r for r in records if r not in scored]
    varying, constant = varying_hyperparameters(records)

    def row(r, rank):
        hps = r.get("hyperparameters") or {}
        per_fold = [v for v in (r.get("fold_scores") or []) if v is not None]
        return {
            "rank": rank, "trial_id": r.get("trial_id"), "builder": r.get("builder"),
            "hyperparameters": {k: hps[k] for k in varying if k in hps},
            "score": r.get("score"), "auc": (r.get("metrics") or {}).get("auc"),
            "folds": int(r.get("folds") or 1), "fold_scores": r.get("fold_scores"),
            "fold_sd": float(np.std(per_fold, ddof=1)) if len(per_fold) > 1 else None,
            "epochs": r.get("epochs"), "best_epoch": r.get("best_epoch"), "seconds": r.get("seconds"),
            "status": r.get("status"), "error": r.get("error"),
        }

    rows = [row(r, i + 1) for i, r in enumerate(scored[:top])] + [row(r, None) for r in unscored]
    score_key = next((r.get("score_key") for r in records if r.get("score_key")), None)
    return {"rows": rows, "varying": varying, "constant": constant, "completed": len(scored),
            "shown": min(top, len(scored)), "total": len(records), "score_key": score_key}


def best_per_builder(records: list[dict], direction: str) -> list[dict]:
    """Per builder: its trial counts and its best trial; builders ordered by that best."""
    table: dict[str, dict] = {}
    for r in records:
        entry = table.setdefault(r.get("builder") or "?", {"builder": r.get("builder") or "?", "trials": 0,
                                                           "completed": 0, "failed": 0, "best_trial": None,
                                                           "score": None, "auc": None})
        entry["trials"] += 1
        if r.get("status") != "COMPLETED" or r.get("score") is None:
            entry["failed"] += r.get("status") != "COMPLETED"
            continue
        entry["completed"] += 1
        best = entry["score"]
        if best is None or (r["score"] > best if direction == "max" else r["score"] < best):
            entry.update(best_trial=r.get("trial_id"), score=r["score"], auc=(r.get("metrics") or {}).get("auc"))
    sign = 1.0 if direction == "max" else -1.0
    return sorted(table.values(), key=lambda e: -math.inf if e["score"] is None else sign * e["score"], reverse=True)


def progress(records: list[dict], direction: str) -> list[dict]:
    """Each trial in the order it finished: its score and the best score up to it."""
    out, best = [], None
    for i, r in enumerate(records):
        score = r.get("score") if r.get("status") == "COMPLETED" else None
        if score is not None and (best is None or (score > best if direction == "max" else score < best)):
            best = score
        out.append({"n": i + 1, "trial_id": r.get("trial_id"), "builder": r.get("builder"),
                    "score": score, "best": best, "status": r.get("status")})
    return out


def tensorboard_summary(source: Source) -> dict:
    """Where the TensorBoard logs are and which trials wrote some."""
    logs = source.run.logs_dir
    trials = sorted((d.name for d in logs.iterdir() if d.is_dir() and any(d.rglob("events.out.tfevents*"))),
                    key=lambda s: (len(s), s)) if logs.is_dir() else []
    enabled = bool(source.config.get("search", {}).get("tensorboard", True))
    return {"enabled": enabled, "logdir": str(logs), "trials_with_logs": trials,
            "command": f"tensorboard --logdir {logs}" if trials else None}


def ensemble_summary(source: Source) -> dict:
    """Members, meta-learner candidates, threshold and its rule, from the manifest."""
    m = source.manifest
    members = m["members"]
    varying, constant = varying_hyperparameters(members)
    rule = m.get("threshold_rule") or {}
    if rule.get("rule") == "min_sensitivity":
        rule_text = f"highest specificity with sensitivity >= {rule['min_sensitivity']:g}"
    elif rule.get("rule") == "objective":
        verb = "maximises" if source.objective.direction == "max" else "minimises"
        rule_text = f"{verb} {rule.get('objective')} on out-of-fold probabilities"
    elif m["threshold"] is None:
        rule_text = "none (multi-class task: argmax)"
    else:
        rule_text = "0.5 (the objective does not depend on the threshold)"
    meta = m["meta_learner"]
    validation = m["validation"]
    return {
        "created": m.get("created"),
        "features": m["features"],
        "members": [{
            "member": f"{Path(s['run']).name}/{s['trial_id']}", "builder": s["builder"], "trial_id": s["trial_id"],
            "run": s["run"], "inputs": s["inputs"],
            "score": (s.get("validation") or {}).get("score"),
            "hyperparameters": {k: s["hyperparameters"][k] for k in varying if k in s.get("hyperparameters", {})},
        } for s in members],
        "member_hyperparameters_varying": varying,
        "member_hyperparameters_constant": constant,
        "meta_learner": {
            "name": meta["name"], "selection": meta.get("selection"),
            "candidates": [{"name": n, **{k: c.get(k) for k in ("score", "sensitivity", "specificity", "error")}}
                           for n, c in (meta.get("candidates") or {}).items()],
        },
        "threshold": m["threshold"],
        "threshold_rule": rule_text,
        "score": validation.get("score"),
        "best_member": validation.get("best_member"),
        "folds": validation.get("folds"),
        "validation_data": validation.get("data"),
    }


def binary_rates(y_true: np.ndarray, p_pos: np.ndarray, positive: int, thresholds) -> dict[str, np.ndarray]:
    """Sensitivity, specificity and PPV of ``p_pos >= t`` at each threshold (NaN if undefined)."""
    truth = np.asarray(y_true) == positive
    called = np.asarray(p_pos)[None, :] >= np.asarray(thresholds)[:, None]
    tp = (called & truth).sum(axis=1)
    fp = (called & ~truth).sum(axis=1)
    undefined = np.full(len(tp), np.nan)
    return {
        "sensitivity": tp / truth.sum() if truth.any() else undefined,
        "specificity": ((~called) & ~truth).sum(axis=1) / (~truth).sum() if (~truth).any() else undefined,
        "ppv": np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.nan),
    }


def threshold_sweep(source: Source) -> dict | None:
    """The objective, sensitivity, specificity and PPV across thresholds on p(positive).

    None for multi-class tasks, which decide by argmax.
    """
    preds, positive, obj = source.preds, source.positive, source.objective
    if preds is None or positive is None:
        return None
    if "sweep" not in source.computed:
        source.computed["sweep"] = _sweep(preds, positive, obj, source.task)
    return source.computed["sweep"]


def _sweep(preds: Predictions, positive: int, obj: Objective, task: Task) -> dict:
    grid = THRESHOLDS
    p_pos = preds.y_prob[:, positive]
    rates = binary_rates(preds.y_true, p_pos, positive, grid)
    probs = np.zeros((len(p_pos), 2))
    probs[:, positive], probs[:, 1 - positive] = p_pos, 1.0 - p_pos
    values = obj.sweep(preds.y_true, probs, positive, grid) if obj.thresholded else None
    at = {}
    for name, t in (("chosen", preds.threshold), ("optimum", preds.optimum)):
        if t is None:
            continue
        r = binary_rates(preds.y_true, p_pos, positive, [t])
        at[name] = {"threshold": t, "objective": obj(preds.y_true, probs, positive, t) if obj.thresholded else None,
                    **{k: v[0] for k, v in r.items()}}
    return {
        "positive": task.classes[positive],
        "objective": obj.name,
        "thresholded": obj.thresholded,
        "grid": grid,
        "objective_values": values,
        **rates,
        "at": at,
    }


def plain(obj):
    """``obj`` with numpy values as Python ones, tuples as lists and NaN/inf as None, so that
    ``json.loads(json.dumps(x)) == x``."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [plain(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def report(path, top: int = DEFAULT_TOP, data=None) -> dict:
    """``collect(open_source(path, data), top)``: the report of a run or bundle in one call."""
    return collect(open_source(path, data), top)
