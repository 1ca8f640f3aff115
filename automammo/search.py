"""The search: Keras Tuner over every chosen builder, scored by the chosen objective.

``run_search(config, run_dir)`` prepares the data once (task view, patient-grouped
stratified fit/validation split of ``train``, preprocessing), then lets a Keras Tuner
oracle (random, Bayesian or Hyperband) pick builders and hyperparameters. Every trial
trains with early stopping on the objective's validation value and restores its best
epoch; its model, validation predictions and one line of ``trials.jsonl`` are written as
soon as it ends, so a killed search loses at most the trial under way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from automammo import __version__, accel, distributed, registry
from automammo.atomic import append_line, atomic_path, write_json
from automammo.builders import BuildContext, Builder, BuilderChoice, builder_hyperparameters, predict_probabilities
from automammo.dataset import Dataset
from automammo.dataset import load as load_dataset
from automammo.errors import AutomammoError, DataError, RunError
from automammo.objectives import applicable
from automammo.preprocess import Augmentation, Preprocessing, TrialData, bit_depth_scale
from automammo.runs import Run
from automammo.splits import fit_validation_split, grouped_folds
from automammo.tasks import Task, check_classes, get_task

TUNERS = ("random", "bayesian", "hyperband")


@dataclass
class SearchConfig:
    """Every option of a search; written to ``config.json`` and read back on resume."""

    task: str = "benign-malignant"
    objective: str = "auc"
    data: str | None = None
    builders: list[str] = field(default_factory=list)
    tuner: str = "random"
    trials: int = 10
    epochs: int = 20
    patience: int = 4
    image_size: int | None = None
    seed: int = 0
    val_fraction: float = 0.2
    folds: int = 1
    contrast_stretch: bool = False
    augmentation: dict = field(default_factory=lambda: Augmentation().to_dict())
    weights: str = "imagenet"
    weights_dir: str | None = None
    keep_models: int = 10
    max_consecutive_failures: int = 3
    tensorboard: bool = True
    ensemble: bool = True  # the CLI's stage after the search; a resumed run keeps the choice
    workers: int = 0
    listen: str | None = None
    strategy: str = "default"
    precision: str = "float32"
    phantom: dict = field(default_factory=lambda: {"n_lesions": 600, "size": 64, "difficulty": 0.5, "seed": 0})

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Reporter:
    """Receives progress; the CLI's rich display implements it. Every method is optional."""

    def search_begin(self, run_dir: Path, total_trials: int | None, config: SearchConfig, done: int) -> None: ...
    def message(self, text: str) -> None: ...
    def trial_begin(self, trial_id: str, builder: str, hyperparameters: dict) -> None: ...
    def epoch_end(self, epoch: int, epochs: int, logs: dict) -> None: ...
    def trial_end(self, record: dict, best: dict | None) -> None: ...
    def search_end(self, result: "SearchResult") -> None: ...


@dataclass
class SearchResult:
    run_dir: Path
    best: dict | None
    trials: list[dict]
    stopped: str = ""


# -- data --------------------------------------------------------------------------


def phantom_path(params: dict) -> Path:
    """Where the default phantom is cached (``AUTOMAMMO_CACHE`` or ~/.cache/automammo)."""
    root = Path(os.environ.get("AUTOMAMMO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "automammo")
    from automammo.phantom import GENERATOR_VERSION

    # The generator's version is part of the key: a changed generator never reuses old data.
    key = hashlib.sha256(json.dumps([params, GENERATOR_VERSION], sort_keys=True).encode()).hexdigest()[:12]
    return root / f"phantom-{key}.npz"


def resolve_data(config: SearchConfig, reporter: Reporter) -> tuple[Dataset, str]:
    """The dataset of a search: the user's file, or the phantom generated once and cached."""
    if config.data:
        return load_dataset(config.data), str(config.data)
    path = phantom_path(config.phantom)
    if not path.exists():
        from automammo.phantom import synthesize

        reporter.message(f"generating the digital phantom once: {path}")
        synthesize(**config.phantom).save(path)
    return load_dataset(path), str(path)


@dataclass
class Fold:
    """One fit/validation split of ``train``: dataset rows and the trial pipelines."""

    trial_data: TrialData
    fit_rows: np.ndarray
    val_rows: np.ndarray


@dataclass
class PreparedData:
    """The search's data. ``folds[0]`` is the canonical split: its models and validation
    predictions are the ones kept; further folds only add to each trial's score."""

    task: Task
    folds: list[Fold]
    preprocessing: Preprocessing
    source: str
    fingerprint: str

    @property
    def trial_data(self) -> TrialData:
        return self.folds[0].trial_data

    @property
    def fit_rows(self) -> np.ndarray:
        return self.folds[0].fit_rows

    @property
    def val_rows(self) -> np.ndarray:
        return self.folds[0].val_rows


def prepare_data(ds: Dataset, task: Task, config: SearchConfig, source: str, need_pairs: bool) -> PreparedData:
    rows = task.indices(ds, "train")
    if rows.size == 0:
        raise DataError(f"{source}: no training samples for task {task.name}")
    y = task.targets(ds.label[rows])
    check_classes(task, y, "train", source)
    if config.folds > 1:
        splits = grouped_folds(y, ds.patient[rows], config.folds, config.seed)
    else:
        splits = [fit_validation_split(y, ds.patient[rows], config.val_fraction, config.seed)]
    size = int(config.image_size or max(ds.image_shape))
    prep = Preprocessing(size, bit_depth_scale(ds.x), config.contrast_stretch)
    pairs = task.lesions_only and bool(np.all(ds.pair[rows] >= 0))
    if need_pairs and not task.lesions_only:
        raise DataError(f"task {task.name} classifies baselines themselves; pair builders do not apply")
    if need_pairs and not pairs:
        missing = int(np.sum(ds.pair[rows] < 0))
        raise DataError(
            f"{source}: {missing} of {len(rows)} training lesions of task {task.name} have no "
            "baseline partner (pair == -1); pair builders need one for every lesion"
        )
    # Preprocess every training row once; folds index into the result.
    x_all = prep.apply(ds.x[rows])
    b_all = prep.apply(ds.x[ds.pair[rows]]) if pairs else None
    folds = []
    for k, (fit_pos, val_pos) in enumerate(splits):
        where = f" of fold {k + 1}" if len(splits) > 1 else ""
        check_classes(task, y[fit_pos], f"the fit part{where} of train", source)
        check_classes(task, y[val_pos], f"the validation part{where} of train", source)
        data = TrialData(
            x_all[fit_pos], y[fit_pos], x_all[val_pos], y[val_pos], task.n_classes,
            Augmentation(**config.augmentation),
            b_all[fit_pos] if pairs else None, b_all[val_pos] if pairs else None, config.seed,
        )
        folds.append(Fold(data, rows[fit_pos], rows[val_pos]))
    return PreparedData(task, folds, prep, source, ds.fingerprint())


# -- builders and objectives ----------------------------------------------------------


def choose_builders(config: SearchConfig, context: BuildContext, task: Task, has_pairs: bool,
                    reporter: Reporter) -> dict[str, Builder]:
    """Instantiate the requested builders, or by default every one that fits the task."""
    table = registry.builders()
    explicit = bool(config.builders)
    names = list(config.builders) if explicit else sorted(table)
    chosen: dict[str, Builder] = {}
    skipped: dict[str, str] = {}
    for name in names:
        cls = registry.get("builder", name)
        reason = None
        if cls.inputs == "pair" and not task.lesions_only:
            reason = f"takes a lesion+baseline pair, but task {task.name} classifies baselines"
        elif cls.inputs == "pair" and not has_pairs:
            reason = "takes a lesion+baseline pair, but the data has lesions without a baseline"
        elif context.image_size < cls.min_image_size:
            reason = f"needs images of at least {cls.min_image_size} px (--image-size {context.image_size})"
        else:
            check = getattr(cls, "unavailable", None)
            reason = check(context) if callable(check) else None
        if reason:
            if explicit:
                raise AutomammoError(f"builder {name} cannot run: {reason}")
            skipped[name] = reason
            continue
        chosen[name] = cls(context)
    if skipped:
        # One short line per builder; the full reason (where to put weight files, ...) once.
        for name, reason in skipped.items():
            reporter.message(f"skipping builder {name}: {reason.split(' (')[0].split(': ')[0]}")
        first = next(iter(skipped))
        reporter.message(f"(for {first}: {skipped[first]})")
    if not chosen:
        raise AutomammoError(f"no builder fits task {task.name}; known: {', '.join(sorted(table))}")
    return chosen


def objectives_for(task: Task, primary: str):
    primary_obj = registry.get("objective", primary)
    if not applicable(primary_obj, task.n_classes):
        raise AutomammoError(f"objective {primary} applies to binary tasks only; task {task.name} has {task.n_classes} classes")
    others = [o for n, o in sorted(registry.objectives().items()) if n != primary and applicable(o, task.n_classes)]
    return primary_obj, [primary_obj, *others]


# -- the tuner --------------------------------------------------------------------------


class _Unshared:
    """Keras Tuner deep-copies callbacks for each execution; these hold shared state."""

    def __deepcopy__(self, memo):
        return self


def _make_tuner_class(base):
    import keras

    from automammo.objectives import make_callback

    class AutomammoTuner(base):
        def __init__(self, *args, run: Run, prepared: PreparedData, builders: dict, primary,
                     objectives, search_config: SearchConfig, reporter: Reporter, **kwargs):
            self.run, self.prepared, self.builders_by_name = run, prepared, builders
            self.objective_obj, self.objectives = primary, objectives
            self.score_key = primary.score_key(prepared.task.binary)
            self.config, self.reporter = search_config, reporter
            self._extra: dict[str, dict] = {}
            self._gradients_before: set[str] | None = None
            super().__init__(*args, **kwargs)

        def _populate_initial_space(self):
            try:
                super()._populate_initial_space()
            except Exception:  # noqa: BLE001
                # A builder that cannot even be built fails its own trials, with its reason,
                # instead of stopping the search before it starts; the space of the others
                # is still learnt as their trials declare it.
                hp = self.oracle.get_space()
                hp.Choice("builder", list(self.builders_by_name))
                self.oracle.update_space(hp)

        def run_trial(self, trial, *args, **kwargs):
            name, own = builder_hyperparameters(trial.hyperparameters.values)
            pair = self.builders_by_name[name].inputs == "pair"
            seed = self.config.seed * 1000 + int(hashlib.md5(trial.trial_id.encode()).hexdigest(), 16) % 1000
            values = trial.hyperparameters.values
            if "tuner/epochs" in values:
                # Hyperband's budget for this trial, which its own run_trial (replaced by this
                # one) would set: train to tuner/epochs, continuing from tuner/initial_epoch.
                kwargs["epochs"], kwargs["initial_epoch"] = values["tuner/epochs"], values["tuner/initial_epoch"]
            epochs = kwargs.get("epochs", self.config.epochs)
            extra = self._extra.setdefault(trial.trial_id, {"start": time.time(), "folds": [], "epoch_indices": [],
                                                            "warmup": self._warmup(epochs)})
            self.reporter.trial_begin(trial.trial_id, name, own)
            results = []
            # With --folds K the trial trains once per fold and Keras Tuner scores it by the
            # mean over the K results; fold 0 is the canonical split whose model is kept.
            for k, fold in enumerate(self.prepared.folds):
                keras.utils.set_random_seed(seed + k)
                history: dict = {}
                # The absolute index of each epoch in history: what early stopping's warm-up
                # counts (a Hyperband round or a transfer fine-tuning phase starts late).
                indices: list[int] = []
                extra["folds"].append(history)
                extra["epoch_indices"].append(indices)
                fold_kwargs = dict(kwargs, data=fold.trial_data,
                                   callbacks=self._callbacks(trial.trial_id, fold, k, pair, history, indices, epochs))
                results.append(self._fit_fold(trial, history, indices, extra["warmup"], *args, **fold_kwargs))
            return results

        def _fit_fold(self, trial, history, indices, warmup, *args, callbacks, **kwargs):
            """Keras Tuner's ``run_trial`` for one execution, with its checkpoint written once.

            Returns the validation metrics of the epoch early stopping restored, the model
            ``_TrialEnd`` saves, so that the oracle scores the very model that is kept.
            Keras Tuner's checkpoint (what Hyperband resumes a trial from, and
            ``get_best_models`` loads) holds the same weights, written once at the end of
            training instead of at every epoch that improves.
            """
            from keras_tuner.src.engine import tuner_utils

            callbacks = self._deepcopy_callbacks(callbacks)
            self._configure_tensorboard_dir(callbacks, trial, 0)
            callbacks.append(tuner_utils.TunerCallback(self, trial))
            callbacks.append(_SaveWeightsAtEnd(self._get_checkpoint_fname(trial.trial_id)))
            self._build_and_fit_model(trial, *args, callbacks=callbacks, **kwargs)
            _, metrics = self._best_epoch_metrics(history, warmup, indices)
            out = {f"val_{k}": v for k, v in metrics.items() if v is not None}
            worst = -np.inf if self.objective_obj.direction == "max" else np.inf
            out.setdefault(f"val_{self.score_key}", worst)
            return out

        def _warmup(self, epochs: int) -> int:
            """Epochs that early stopping and the trial's score ignore.

            Only for thresholded objectives scored at their best threshold: an untrained
            model that calls every patch positive already scores F2 = 0.83 at 50%
            prevalence, so it needs a few epochs to leave that plateau. AUC and loss start
            at chance and count from the first epoch.
            """
            return min(self.config.patience, epochs // 4) if self.score_key != self.objective_obj.name else 0

        def _callbacks(self, trial_id, fold, k, pair, history, indices, epochs):
            data = fold.trial_data
            val_inputs = data.inputs("val", pair)

            def predict(model):
                return predict_probabilities(model, val_inputs)

            callbacks = [
                make_callback(self.objectives, predict, data.y_val, self.prepared.task.positive,
                              sweep={self.objective_obj.name}),
                keras.callbacks.EarlyStopping(monitor=f"val_{self.score_key}",
                                              mode=self.objective_obj.direction,
                                              patience=self.config.patience, restore_best_weights=True,
                                              start_from_epoch=self._warmup(epochs)),
            ]
            if k == 0:
                callbacks.append(_TrialEnd(self, trial_id, predict, fold))
                if self.config.tensorboard:
                    callbacks.append(keras.callbacks.TensorBoard(str(self.run.logs_dir), profile_batch=0))
            return callbacks + [_Progress(self.reporter, epochs, history, indices)]

        def on_trial_begin(self, trial):
            self._gradients_before = _custom_gradient_names()
            super().on_trial_begin(trial)

        def on_trial_end(self, trial):
            try:
                # Scores the trial; raises once too many trials failed in a row.
                super().on_trial_end(trial)
            finally:
                self._record_trial(trial)

        def _record_trial(self, trial):
            extra = self._extra.pop(trial.trial_id, {"start": time.time(), "folds": []})
            record = self._record(trial, extra)
            if record["trial_id"] not in {t.get("trial_id") for t in self.run.trials()}:
                append_line(self.run.trials_path, record)
            self._prune_models()
            keras.backend.clear_session()
            _drop_custom_gradients(self._gradients_before)
            gc.collect()
            self.reporter.trial_end(record, self._best())

        def _record(self, trial, extra) -> dict:
            name, own = builder_hyperparameters(trial.hyperparameters.values)
            folds = extra.get("folds") or [{}]
            warmup = extra.get("warmup", 0)
            indices = extra.get("epoch_indices") or [[]] * len(folds)
            per_fold = [self._best_epoch_metrics(h, warmup, i) for h, i in zip(folds, indices)]
            history = folds[0]
            best_epoch, _ = per_fold[0]
            series = history.get(f"val_{self.score_key}", [])
            names = set().union(*(m for _, m in per_fold))
            metrics = {}
            for key in sorted(names):
                values = [m[key] for _, m in per_fold if m.get(key) is not None]
                metrics[key] = float(np.mean(values)) if values else None
            message = getattr(trial, "message", None)
            status = str(trial.status)
            return {
                "trial_id": trial.trial_id,
                "status": status,
                "builder": name,
                "hyperparameters": own,
                "objective": self.objective_obj.name,
                "score_key": self.score_key,
                "direction": self.objective_obj.direction,
                "score": _finite(trial.score) if status == "COMPLETED" else None,
                "metrics": metrics,
                "epochs": len(series),
                "best_epoch": None if best_epoch is None else best_epoch + 1,
                "folds": len(folds),
                "fold_scores": [m.get(self.score_key) for _, m in per_fold] if len(folds) > 1 else None,
                "history": {k: [_finite(x) for x in v] for k, v in history.items()},
                "seconds": round(time.time() - extra["start"], 2),
                "model": str(self.run.model_path(trial.trial_id).relative_to(self.run.path))
                if self.run.model_path(trial.trial_id).exists() else None,
                "error": _last_line(message) if status != "COMPLETED" else None,
                "traceback": message if status != "COMPLETED" else None,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }

        def _best_epoch_metrics(self, history: dict, warmup: int, indices: list[int]) -> tuple[int | None, dict]:
            """(best epoch index, validation metrics at that epoch) of one training run."""
            best = restored_epoch(history.get(f"val_{self.score_key}", []), self.objective_obj.direction,
                                  warmup, indices)
            if best is None:
                return None, {}
            return best, {k[4:]: _finite(v[best]) for k, v in history.items()
                          if k.startswith("val_") and best < len(v)}

        def _best(self) -> dict | None:
            ranked = self.run.ranked(self.objective_obj.direction)
            return ranked[0] if ranked else None

        def _prune_models(self):
            keep = {t["trial_id"] for t in self.run.ranked(self.objective_obj.direction)[: self.config.keep_models]}
            # Only finished trials' models may go: another worker's trial may be saving its own.
            finished = {t["trial_id"] for t in self.run.trials()}
            for path in self.run.models_dir.glob("*.keras"):
                if path.stem not in keep and path.stem in finished:
                    path.unlink(missing_ok=True)

    return AutomammoTuner


def restored_epoch(series, direction: str, warmup: int, indices) -> int | None:
    """Position in ``series`` of the epoch Keras' EarlyStopping restores, or None.

    ``series`` holds the monitored value of each epoch trained (None or NaN when missing),
    ``indices`` each one's absolute epoch index. EarlyStopping ignores epochs before
    ``warmup`` (``start_from_epoch``) and restores the first best of the others; when every
    epoch is in the warm-up it restores nothing and the last epoch's weights stay.
    """
    arr = np.asarray([np.nan if v is None else v for v in series], dtype=float)
    if not len(arr):
        return None
    indices = list(indices)
    absolute = np.asarray(indices[-len(arr):] if len(indices) >= len(arr) else range(len(arr)))
    warming = absolute < warmup
    if warming.all():
        warming[-1] = False
    arr[warming] = np.nan
    if np.all(np.isnan(arr)):
        return None
    return int(np.nanargmax(arr) if direction == "max" else np.nanargmin(arr))


def _gradient_registry() -> dict | None:
    """TensorFlow's global table of gradient functions (private; None if it moved)."""
    from tensorflow.python.framework import ops

    table = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    return table if isinstance(table, dict) else None


def _custom_gradient_names() -> set[str]:
    table = _gradient_registry()
    return {k for k in table if k.startswith("CustomGradient-")} if table is not None else set()


def _drop_custom_gradients(before: set[str] | None) -> None:
    """Forget the ``tf.custom_gradient`` entries registered since ``before``.

    Every trace of a Keras train step registers one (the optimizer's gradient all-reduce
    is a custom gradient, even with no distribution strategy), and its closure holds the
    step's output tensors, hence the whole traced FuncGraph, its cond branches and their
    functions in the eager context, forever (tensorflow/tensorflow#97697): ~18 MiB a
    trial. The trial's graphs are dead by now, so nothing will look these up again.
    """
    table = _gradient_registry()
    if table is None or before is None:
        return
    for name in _custom_gradient_names() - before:
        table.pop(name, None)


def _finite(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _last_line(message) -> str | None:
    if not message:
        return None
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None


def _trial_end_callback_base():
    import keras

    return keras.callbacks.Callback


class _TrialEnd(_trial_end_callback_base(), _Unshared):
    """After early stopping restored the best epoch: save the model and its predictions."""

    def __init__(self, tuner, trial_id: str, predict, fold: "Fold"):
        super().__init__()
        self.tuner, self.trial_id, self.predict, self.fold = tuner, trial_id, predict, fold

    def on_train_end(self, logs=None):
        run, fold = self.tuner.run, self.fold
        run.preds_dir.mkdir(parents=True, exist_ok=True)
        run.models_dir.mkdir(parents=True, exist_ok=True)
        y_prob = self.predict(self.model)
        with atomic_path(run.preds_path(self.trial_id)) as tmp:
            np.savez(tmp, index=fold.val_rows, y_true=fold.trial_data.y_val, y_prob=y_prob.astype(np.float32))
        with atomic_path(run.model_path(self.trial_id), suffix=".keras") as tmp:
            self.model.save(tmp)


class _SaveWeightsAtEnd(_trial_end_callback_base()):
    """Keras Tuner's trial checkpoint: the weights early stopping restored, once."""

    def __init__(self, filepath: str):
        super().__init__()
        self.filepath = filepath

    def on_train_end(self, logs=None):
        self.model.save_weights(self.filepath)


class _Progress(_trial_end_callback_base(), _Unshared):
    def __init__(self, reporter: Reporter, epochs: int, history: dict, indices: list[int]):
        super().__init__()
        self.reporter, self.epochs, self.history, self.indices = reporter, epochs, history, indices

    def on_epoch_end(self, epoch, logs=None):
        self.indices.append(epoch)
        logs = dict(logs or {})
        for key, value in logs.items():
            self.history.setdefault(key, []).append(_finite(value))
        self.reporter.epoch_end(epoch + 1, self.epochs, logs)


def _tuner_for(config: SearchConfig, objective, task: Task, hypermodel, run_dir: Path, **kwargs):
    import keras_tuner as kt

    kt_objective = kt.Objective(f"val_{objective.score_key(task.binary)}", direction=objective.direction)
    common = dict(
        # Keras Tuner treats seed 0 as "no seed" and draws a random one.
        hypermodel=hypermodel, objective=kt_objective, seed=config.seed + 1,
        max_consecutive_failed_trials=config.max_consecutive_failures,
        directory=str(run_dir), project_name="tuner", overwrite=False,
    )
    if config.tuner == "random":
        cls = _make_tuner_class(kt.RandomSearch)
        return cls(max_trials=config.trials, **common, **kwargs)
    if config.tuner == "bayesian":
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        # The oracle's Gaussian process fitting its kernel to a handful of trials: nothing a
        # user can act on.
        warnings.filterwarnings("ignore", category=ConvergenceWarning, module=r"sklearn\.gaussian_process")
        cls = _make_tuner_class(kt.BayesianOptimization)
        return cls(max_trials=config.trials, num_initial_points=max(2, min(5, config.trials // 3)), **common, **kwargs)
    if config.tuner == "hyperband":
        cls = _make_tuner_class(kt.Hyperband)
        return cls(max_epochs=config.epochs, factor=3, hyperband_iterations=1, **common, **kwargs)
    raise AutomammoError(f"unknown tuner {config.tuner!r}; known: {', '.join(TUNERS)}")


# -- the search ---------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"automammo": __version__, "python": platform.python_version()}
    for pkg in ("tensorflow", "keras", "keras-tuner", "numpy", "scikit-learn", "scikit-image",
                "opencv-python-headless"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def open_run(run_dir, config: SearchConfig | None, resume: bool,
             overwrite: bool) -> tuple[Run, SearchConfig, bool]:
    """Check that a run directory can be created, replaced or reopened; change nothing.

    Returns the run, its configuration and whether an existing run is to be replaced,
    which ``run_search`` does only once the new search's data and options have passed
    their checks: a mistyped ``--data`` never costs a finished run.
    """
    run = Run(run_dir)
    for parent in run.path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunError(f"{run.path}: {parent} is a file, not a directory")
            break
    if resume:
        if not run.exists():
            raise RunError(f"{run.path}: nothing to resume (no config.json)")
        stored = SearchConfig.from_dict(run.config()["search"])
        if config is not None and config.trials > stored.trials:
            stored.trials = config.trials  # a resumed search may be extended
        if config is not None:
            stored.workers, stored.listen = config.workers, config.listen
            if config.data:
                stored.data = config.data  # moved data: the fingerprint check below still applies
        return run, stored, False
    replace = run.path.is_dir() and any(run.path.iterdir())
    if replace:
        if not run.exists() and not run.trials_path.exists():
            # --overwrite replaces runs, never a folder of someone's files.
            raise RunError(f"{run.path} is not empty and holds no run (no config.json or trials.jsonl); "
                           "choose another --run")
        if not overwrite:
            raise RunError(f"{run.path} already holds a run; use --resume to continue it or --overwrite to replace it")
    if config is None:
        raise RunError("a new run needs a configuration")
    return run, config, replace


@dataclass
class Setup:
    """Everything a process needs to run trials of a search; writes nothing."""

    config: SearchConfig
    task: Task
    objective: object
    objectives: list
    prepared: PreparedData
    builders: dict[str, Builder]
    source: str


def prepare_search(config: SearchConfig, run: Run, reporter: Reporter) -> Setup:
    """Data, split, preprocessing and builders of a search: the same in a chief and its workers."""
    task = get_task(config.task)
    objective, objectives = objectives_for(task, config.objective)
    ds, source = resolve_data(config, reporter)
    if config.image_size is None:
        config = dataclasses.replace(config, image_size=int(max(ds.image_shape)))
    requested_pairs = any(registry.get("builder", n).inputs == "pair" for n in config.builders)
    prepared = prepare_data(ds, task, config, source, need_pairs=requested_pairs)
    context = BuildContext(
        image_size=prepared.preprocessing.image_size, n_classes=task.n_classes, task=task.name,
        seed=config.seed, weights=config.weights, weights_dir=config.weights_dir, cache_dir=run.cache_dir,
        objective=objective.name, direction=objective.direction, patience=config.patience,
    )
    builders = choose_builders(config, context, task, prepared.trial_data.has_pairs, reporter)
    return Setup(config, task, objective, objectives, prepared, builders, source)


def make_tuner(setup: Setup, run: Run, reporter: Reporter, strategy=None):
    """The Keras Tuner tuner of a prepared search (state in ``run/tuner``)."""
    import io

    hypermodel = accel.with_precision(BuilderChoice(setup.builders), setup.config.precision)
    # Keras Tuner prints "Reloading Tuner from ..." when it continues saved state; said here
    # in the search's own words instead.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        tuner = _tuner_for(setup.config, setup.objective, setup.task, hypermodel, run.path, run=run,
                           prepared=setup.prepared, builders=setup.builders, primary=setup.objective,
                           objectives=setup.objectives, search_config=setup.config, reporter=reporter,
                           distribution_strategy=strategy)
    for line in printed.getvalue().splitlines():
        reporter.message(f"continuing the tuner's saved state in {run.tuner_dir}"
                         if line.startswith("Reloading Tuner from") else line)
    return tuner


def run_search(config: SearchConfig | None, run_dir, resume: bool = False, overwrite: bool = False,
               reporter: Reporter | None = None) -> SearchResult:
    """Run (or resume) a search; returns the best trial's record and every trial's.

    Raises:
        AutomammoError: bad data, names or options (before anything is written), or a
            search stopped by too many consecutive failed trials.
    """
    reporter = reporter or Reporter()
    run, config, replace = open_run(run_dir, config, resume, overwrite)
    if config.tuner not in TUNERS:
        raise AutomammoError(f"unknown tuner {config.tuner!r}; known: {', '.join(TUNERS)}")
    if config.trials < 1 or config.epochs < 1 or config.patience < 0:
        raise AutomammoError("--trials and --epochs must be at least 1, --patience at least 0")
    # Names and options are checked before any data is generated or read.
    objectives_for(get_task(config.task), config.objective)
    for name in config.builders:
        registry.get("builder", name)
    accel.check(config.strategy, config.precision)
    if config.workers < 0:
        raise AutomammoError("--workers must be 0 or more")
    if config.listen:
        distributed.parse_address(config.listen)
    chief = bool(config.workers or config.listen)
    if chief:
        accel.hide_accelerators()  # the chief trains nothing; its workers need the GPUs
        strategy = None
    else:
        strategy = accel.configure(config.strategy, config.precision, reporter)
    setup = prepare_search(config, run, reporter)
    config, prepared, builders, source = setup.config, setup.prepared, setup.builders, setup.source
    task, objective, objectives = setup.task, setup.objective, setup.objectives

    if resume:
        stored = run.config()
        if stored.get("data_fingerprint") != prepared.fingerprint:
            raise RunError(f"{run.path}: the data changed since this run started ({source}); start a new run")
    if replace:
        shutil.rmtree(run.path)
    try:
        run.path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"{run.path}: cannot create the run directory ({exc.strerror or exc})") from None
    write_json(run.config_path, {
        "search": dataclasses.asdict(config),
        "data": source,
        "data_fingerprint": prepared.fingerprint,
        "task": {"name": task.name, "classes": list(task.classes), "positive": task.positive},
        "preprocessing": prepared.preprocessing.to_dict(),
        "builders": sorted(builders),
        "objectives": [o.name for o in objectives],
        "split": {"fit": int(len(prepared.fit_rows)), "validation": int(len(prepared.val_rows)),
                  "folds": len(prepared.folds)},
        "versions": versions(),
    })
    tuner = make_tuner(setup, run, reporter, strategy)
    if resume:
        tuner.oracle.max_trials = config.trials if config.tuner != "hyperband" else tuner.oracle.max_trials
    _deterministic(config.seed)
    total = config.trials if config.tuner != "hyperband" else None
    run.ended_path.unlink(missing_ok=True)  # written again when this search ends
    reporter.search_begin(run.path, total, config, len(run.trials()))
    stopped = ""
    try:
        if chief:
            distributed.serve(tuner, run, reporter, config.workers, config.listen)
        else:
            with frozen_heap():
                tuner.search(epochs=config.epochs, verbose=0)
    except RuntimeError as exc:
        if "consecutive failures" not in str(exc):
            raise
        failed = [t for t in run.trials() if t.get("status") != "COMPLETED"][-config.max_consecutive_failures:]
        stopped = (f"stopped after {config.max_consecutive_failures} consecutive failed trials "
                   f"({_failure_reasons(failed)})")
    result = finish(run, objective)
    ended = _how_it_ended(result, config, objective, stopped)
    if ended["note"]:
        reporter.message(ended["note"])
    write_json(run.ended_path, ended)
    result.stopped = stopped or (ended["message"] if result.best is None else "")
    reporter.search_end(result)
    if result.best is None:
        raise AutomammoError(result.stopped)
    return result


def _how_it_ended(result: "SearchResult", config: SearchConfig, objective, stopped: str) -> dict:
    """What ``ended.json`` records, and ``report`` shows: finished, or stopped and why.

    Besides too many consecutive failures, a search ends without a usable trial when every
    trial failed before the tuner ran out of new configurations (a small space), or when the
    objective gave no finite score; and it ends early, with fewer trials than asked, when its
    search space holds no untried configuration.
    """
    records = result.trials
    completed = [t for t in records if t.get("status") == "COMPLETED"]
    note = ""
    if not stopped and config.tuner != "hyperband" and len(records) < config.trials:
        note = (f"the tuner ended after {len(records)} of {config.trials} trials: "
                "no untried configuration is left in the search space")
    if stopped:
        message = stopped
    elif not completed:
        message = f"no trial completed ({_failure_reasons(records) or 'no trial ran'})"
    elif result.best is None:
        message = (f"no trial has a score: objective {objective.name} gave no finite value on the validation "
                   f"data in {len(completed)} completed trials")
    else:
        message = ""
    return {"state": "stopped" if message else "finished", "message": message, "note": note,
            "trials": len(records), "completed": len(completed),
            "ended": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _failure_reasons(records: list[dict]) -> str:
    """Each distinct ``builder: error`` of failed trials, once, in a stable order."""
    return "; ".join(sorted({f"{t.get('builder')}: {t.get('error')}" for t in records}))


@contextlib.contextmanager
def frozen_heap():
    """Exempt what exists before the trials (TensorFlow, Keras, the data: some 400,000
    objects) from the cyclic garbage collector while they run.

    Keras and Keras Tuner collect garbage three or four times a trial; each pass would
    walk every one of those objects again (~0.2 s a pass on a 2-core machine). Frozen
    objects are still freed as soon as nothing refers to them.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _deterministic(seed: int) -> None:
    """Same seed, same trials, same metrics on the CPU: seeded and deterministic ops."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def finish(run: Run, objective) -> SearchResult:
    """Copy the best trial's model to ``best.keras`` and collect the records."""
    ranked = run.ranked(objective.direction)
    best = ranked[0] if ranked else None
    if best is not None and run.model_path(best["trial_id"]).exists():
        with atomic_path(run.best_model_path, suffix=".keras") as tmp:
            shutil.copyfile(run.model_path(best["trial_id"]), tmp)
    return SearchResult(run.path, best, run.trials())
