"""How much a trial's score owes to luck: re-train it with other seeds and on other folds.

``validate(path)`` takes a trial of a run (by default the best) or every member of a bundle,
and trains the same builder with the same hyperparameters again:

- ``repeats=R``: R times with seeds ``seed, seed + 1, ...`` (weights, shuffling and
  augmentation) on the run's own fit/validation split, so only the seed changes;
- ``folds=K``: over K patient-grouped, class-stratified folds of the dataset's ``train``
  split, each fold held out once (with ``repeats=R`` as well: R times, each with its own
  partition, the repeated k-fold of the seed reports).

Every training follows the search's recipe (at most ``epochs`` epochs, early stopping on
the objective of the held-out part with the run's patience, best epoch restored) and is
scored on every objective of the task at threshold 0.5, plus the optimum of thresholded
ones, exactly as ``trials.jsonl`` records a trial. The held-out part picks the epoch, as in
the search, so the numbers are comparable with the leaderboard and share its slight
optimism; only ``automammo evaluate`` on the untouched test split is free of it. The
``test`` split is never read here.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from automammo import registry
from automammo.builders import BuildContext
from automammo.dataset import Dataset
from automammo.dataset import load as load_dataset
from automammo.errors import AutomammoError, DataError, RunError
from automammo.objectives import evaluate_all
from automammo.preprocess import Augmentation, Preprocessing, TrialData
from automammo.report import locate_run, plain
from automammo.runs import Run
from automammo.splits import fit_validation_split, grouped_folds
from automammo.tasks import Task, check_classes, get_task

DEFAULT_REPEATS = 5


@dataclass
class Recipe:
    """Everything needed to train one trial again.

    Attributes:
        label: how results name it ("trial 3" or "member 1: run/3").
        run: the run the trial belongs to.
        config: that run's config.json.
        record: the trial's line of ``trials.jsonl`` (or a bundle member's manifest entry).
        builder: the builder name.
        hyperparameters: the builder's own hyperparameters, without the ``builder/`` scope.
    """

    label: str
    run: Run
    config: dict
    record: dict
    builder: str
    hyperparameters: dict

    @property
    def trial_id(self) -> str:
        return str(self.record["trial_id"])

    @property
    def recorded(self) -> dict:
        """The trial's own validation metrics, as the search recorded them."""
        if "metrics" in self.record:
            return dict(self.record.get("metrics") or {})
        for r in self.run.trials():
            if str(r.get("trial_id")) == self.trial_id:
                return dict(r.get("metrics") or {})
        return {}


# -- what to train ---------------------------------------------------------------------------


def recipes(path, trial_id: str | None = None) -> tuple[str, list[Recipe]]:
    """(``"run"`` or ``"bundle"``, the trials to re-train) for a run directory or a bundle.

    Raises:
        RunError: an unknown or unfinished trial, a bundle member whose run is gone, or
            ``trial_id`` given for a bundle.
    """
    path = Path(path)
    if (path / "manifest.json").is_file():
        if trial_id is not None:
            raise RunError("--trial applies to runs; a bundle's members are all re-trained")
        from automammo.bundle import read_manifest

        out = []
        for i, spec in enumerate(read_manifest(path)["members"], 1):
            run = locate_run(spec["run"], path)
            if not run.exists():
                raise RunError(f"member {i} ({spec['builder']}, trial {spec['trial_id']}) comes from {run.path}, "
                               "which is gone; validate needs the run's config.json to train it again")
            out.append(Recipe(f"member {i}: {run.path.name}/{spec['trial_id']}", run, run.config(), spec,
                              spec["builder"], _own(spec.get("hyperparameters") or {})))
        return "bundle", out
    run = Run(path)
    config = run.config()
    records = run.trials()
    if trial_id is None:
        ranked = run.ranked(_direction(config))
        if not ranked:
            raise RunError(f"{run.path}: no completed trial to validate yet")
        record = ranked[0]
    else:
        found = [r for r in records if str(r.get("trial_id")) == str(trial_id)]
        if not found:
            known = ", ".join(str(r.get("trial_id")) for r in records) or "(none)"
            raise RunError(f"{run.path}: no trial {trial_id!r}; recorded: {known}")
        record = found[0]
        if record.get("status") != "COMPLETED":
            why = record.get("error") or record.get("status")
            raise RunError(f"trial {trial_id} did not complete in the search ({why}); "
                           "validate re-trains completed trials")
    return "run", [Recipe(f"trial {record['trial_id']}", run, config, record, record["builder"],
                          _own(record.get("hyperparameters") or {}))]


def _direction(config: dict) -> str:
    return registry.get("objective", config["search"]["objective"]).direction


def _own(hyperparameters: dict) -> dict:
    # Hyperband's bookkeeping (tuner/epochs, tuner/initial_epoch, ...) is no hyperparameter
    # of the model; the epoch budget of a re-training is --epochs.
    return {k: v for k, v in hyperparameters.items() if not k.startswith("tuner/")}


# -- the data --------------------------------------------------------------------------------


@dataclass
class TrainArrays:
    """The task's ``train`` samples preprocessed once, as the run preprocessed them."""

    x: np.ndarray
    baseline: np.ndarray | None
    y: np.ndarray
    patient: np.ndarray


def _dataset(config: dict, data) -> Dataset:
    path = data or config.get("data")
    if not path:
        raise RunError("the run records no dataset file; pass --data")
    ds = load_dataset(path)
    if config.get("data_fingerprint") and ds.fingerprint() != config["data_fingerprint"]:
        raise DataError(f"{path}: not the dataset the run was searched on (fingerprint differs); "
                        "pass --data with the original file")
    return ds


def train_arrays(ds: Dataset, task: Task, prep: Preprocessing, pair: bool) -> TrainArrays:
    """Every ``train`` sample of the task, preprocessed; baselines too for pair builders."""
    rows = task.indices(ds, "train")
    baseline = None
    if pair:
        if not task.lesions_only or np.any(ds.pair[rows] < 0):
            raise DataError("this builder compares each lesion with its baseline, and some samples have none")
        baseline = prep.apply(ds.x[ds.pair[rows]])
    return TrainArrays(prep.apply(ds.x[rows]), baseline, task.targets(ds.label[rows]), ds.patient[rows])


def partitions(arrays: TrainArrays, task: Task, search: dict, folds: int | None, repeat_seed: int):
    """(fold number or None, fit positions, held-out positions) of one repeat.

    Without ``folds``: the run's own scheme, the same for every repeat, exactly as
    ``automammo.search.prepare_data`` made it: its fit/validation split (the search's seed
    and fraction), or, for a search with ``--folds K``, its K folds. With ``folds``: a
    fresh patient-grouped partition per repeat, seeded by ``repeat_seed``.
    """
    if folds is None:
        seed = int(search.get("seed", 0))
        searched = int(search.get("folds") or 1)
        if searched > 1:
            return [(k + 1, fit, val) for k, (fit, val) in
                    enumerate(grouped_folds(arrays.y, arrays.patient, searched, seed))]
        fit, val = fit_validation_split(arrays.y, arrays.patient, float(search.get("val_fraction", 0.2)), seed)
        return [(None, fit, val)]
    fresh = grouped_folds(arrays.y, arrays.patient, folds, repeat_seed)
    return [(k + 1, fit, val) for k, (fit, val) in enumerate(fresh)]


# -- one training ------------------------------------------------------------------------------


def train_once(recipe: Recipe, arrays: TrainArrays, fit: np.ndarray, held_out: np.ndarray, task: Task,
               seed: int, epochs: int, patience: int) -> dict:
    """Train the recipe's model on ``fit`` positions, early-stopped on ``held_out``.

    Returns:
        ``{"epochs", "best_epoch", "seconds", "scores": {objective: value}}``.
    """
    import keras
    import keras_tuner as kt
    import tensorflow as tf

    from automammo.objectives import make_callback
    from automammo.search import objectives_for

    config = recipe.config
    search = config["search"]
    primary, objectives = objectives_for(task, search["objective"])
    positive = task.positive if task.binary else None
    prep = Preprocessing.from_dict(config["preprocessing"])
    context = BuildContext(
        image_size=prep.image_size, n_classes=task.n_classes, task=task.name, seed=seed,
        weights=search.get("weights", "imagenet"), weights_dir=search.get("weights_dir"),
        cache_dir=recipe.run.cache_dir, objective=primary.name, direction=primary.direction, patience=patience,
    )
    builder = registry.get("builder", recipe.builder)(context)
    data = TrialData(
        arrays.x[fit], arrays.y[fit], arrays.x[held_out], arrays.y[held_out], task.n_classes,
        Augmentation(**search.get("augmentation", {})),
        None if arrays.baseline is None else arrays.baseline[fit],
        None if arrays.baseline is None else arrays.baseline[held_out], seed,
    )
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    # The builder reads its hyperparameters unscoped; values set beforehand win over the
    # defaults its hp.Int/hp.Choice calls would register.
    hp = kt.HyperParameters()
    hp.values.update(recipe.hyperparameters)
    started = time.time()
    model = builder.build(hp)
    pair = builder.inputs == "pair"
    held_inputs = data.inputs("val", pair)

    def predict(m):
        return m.predict(held_inputs, batch_size=128, verbose=0)

    monitor = f"val_{primary.name}"
    curve: list[float] = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            curve.append(float((logs or {}).get(monitor, np.nan)))

    builder.fit(hp, model, data, epochs=epochs, verbose=0, callbacks=[
        make_callback(objectives, predict, data.y_val, positive),
        Record(),
        keras.callbacks.EarlyStopping(monitor=monitor, mode=primary.direction, patience=patience,
                                      restore_best_weights=True),
    ])
    y_prob = predict(model)
    scores = evaluate_all(objectives, data.y_val, y_prob, positive)
    series = np.asarray(curve, dtype=float)
    best = None
    if series.size and not np.all(np.isnan(series)):
        best = int(np.nanargmax(series) if primary.direction == "max" else np.nanargmin(series)) + 1
    del model
    keras.backend.clear_session()
    gc.collect()
    return {"epochs": len(curve), "best_epoch": best, "seconds": round(time.time() - started, 2), "scores": scores}


# -- the whole validation -----------------------------------------------------------------------


def summarize(units: list[dict]) -> dict[str, dict]:
    """Per objective: mean, sample sd (n - 1; None for one value), min, max and n over units.

    Units whose score is missing or not finite are left out of that objective's n.
    """
    names: list[str] = []
    for u in units:
        names += [k for k in u["scores"] if k not in names]
    out = {}
    for name in names:
        values = np.array([u["scores"].get(name) for u in units if u["scores"].get(name) is not None], dtype=float)
        values = values[np.isfinite(values)]
        n = len(values)
        out[name] = {
            "mean": float(values.mean()) if n else None,
            "sd": float(values.std(ddof=1)) if n > 1 else None,
            "min": float(values.min()) if n else None,
            "max": float(values.max()) if n else None,
            "n": n,
        }
    return out


def validate(path, trial_id: str | None = None, repeats: int | None = None, folds: int | None = None,
             epochs: int | None = None, seed: int = 0, data=None,
             progress: Callable[[str], None] | None = None) -> dict:
    """Re-train a trial of a run (default: the best) or every member of a bundle.

    Args:
        path: a run directory or a bundle.
        trial_id: the run's trial to re-train.
        repeats: trainings with seeds ``seed .. seed + R - 1``; default 5, or 1 with ``folds``.
        folds: patient-grouped folds of the train split; None keeps the run's own split.
        epochs: maximum epochs per training; default the run's ``--epochs``.
        seed: the first seed.
        data: the dataset file, if it moved since the search.
        progress: called with one line after each training.

    Returns:
        A JSON-ready dict: ``kind``, ``path``, ``task``, ``objective``, ``design`` and
        ``models`` (one per trial re-trained: ``units``, each training's scores, and
        ``summary``, mean/sd/min/max/n of every objective).

    Raises:
        AutomammoError: unknown trial, missing run or data, too few patients for the folds.
    """
    if repeats is not None and repeats < 1:
        raise AutomammoError("--repeats must be at least 1")
    if folds is not None and folds < 2:
        raise AutomammoError("--folds must be at least 2")
    if epochs is not None and epochs < 1:
        raise AutomammoError("--epochs must be at least 1")
    repeats = repeats or (1 if folds else DEFAULT_REPEATS)
    progress = progress or (lambda text: None)
    kind, todo = recipes(path, trial_id)
    warnings = []
    if kind == "bundle":
        from automammo.bundle import read_manifest, verify_files
        from automammo.errors import BundleError

        # The members are trained again from their runs, so a damaged file does not stop
        # this; but the manifest says which trials those are, and it may be what changed.
        try:
            verify_files(Path(path), read_manifest(Path(path)))
        except BundleError as exc:
            warnings.append(f"integrity check failed: {exc}; the members are the trials its manifest names")
            progress(f"warning: {warnings[-1]}")
    first = todo[0].config
    task = get_task(first["task"]["name"])
    search = first["search"]
    datasets: dict[str, Dataset] = {}
    models = []
    for recipe in todo:
        config = recipe.config
        source = str(data or config.get("data"))
        if source not in datasets:
            datasets[source] = _dataset(config, data)
        ds = datasets[source]
        max_epochs = int(epochs or config["search"].get("epochs", 20))
        patience = int(config["search"].get("patience", 4))
        pair = registry.get("builder", recipe.builder).inputs == "pair"
        arrays = train_arrays(ds, task, Preprocessing.from_dict(config["preprocessing"]), pair)
        units = []
        for r in range(repeats):
            unit_seed = seed + r
            for fold, fit, held in partitions(arrays, task, config["search"], folds, unit_seed):
                where = "the run's validation split" if fold is None else f"fold {fold}"
                check_classes(task, arrays.y[fit], f"the fit part for {where}", source)
                check_classes(task, arrays.y[held], where, source)
                result = train_once(recipe, arrays, fit, held, task, unit_seed, max_epochs, patience)
                units.append({"repeat": r + 1, "fold": fold, "seed": unit_seed, "n_fit": int(len(fit)),
                              "n_validation": int(len(held)), **result})
                score = result["scores"].get(search["objective"])
                progress(f"{recipe.label}: repeat {r + 1}/{repeats}"
                         + (f", fold {fold}" if fold else "")
                         + f": {search['objective']} {'-' if score is None else f'{score:.4f}'} "
                           f"({result['best_epoch']}/{result['epochs']} epochs, {result['seconds']:.0f} s)")
        models.append({
            "label": recipe.label, "builder": recipe.builder, "trial_id": recipe.trial_id,
            "run": str(recipe.run.path), "hyperparameters": recipe.hyperparameters,
            "recorded": recipe.recorded, "max_epochs": max_epochs, "patience": patience,
            "units": units, "summary": summarize(units),
        })
    if folds:
        description = (f"{repeats} x {folds}-fold cross-validation over the patients of the train split"
                       if repeats > 1 else f"{folds}-fold cross-validation over the patients of the train split")
    else:
        searched = int(search.get("folds") or 1)
        seeds = f"seed {seed}" if repeats == 1 else f"seeds {seed}-{seed + repeats - 1}"
        if searched > 1:
            description = f"{repeats} x the run's own {searched} patient-grouped folds ({seeds})"
        else:
            description = (f"{repeats} training{'s' if repeats > 1 else ''} on the run's own fit/validation "
                           f"split ({seeds})")
    return plain({
        "kind": kind, "path": str(path),
        "task": {"name": task.name, "classes": list(task.classes)},
        "objective": {"name": search["objective"], "direction": _direction(first)},
        "design": {"repeats": repeats, "folds": folds, "epochs": epochs,
                   "seeds": [seed + r for r in range(repeats)], "description": description,
                   "note": "each training stops early on its held-out part's objective, as the search does; "
                           "the test split is not read"},
        "models": models, "warnings": warnings,
    })
