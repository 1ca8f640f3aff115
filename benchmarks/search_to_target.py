"""Wall time for a search to reach a target validation AUC: automammo's defaults vs plain Keras Tuner.

Both searches walk the same space (the scratch CNN's hyperparameters, the same Keras Tuner
random oracle and seed, so trial k has the same hyperparameters in both) on the same data,
patient-grouped fit/validation split and preprocessing, and score the same objective
(validation AUC, scikit-learn's, computed after every epoch):

- ``automammo``: ``run_search`` with its defaults: up to 20 epochs, early stopping with
  patience 4 on the objective, best epoch restored, the 8 symmetries as augmentation;
- ``plain``: ``kt.RandomSearch`` whose trials call ``model.fit`` on the arrays for a fixed
  20 epochs, without early stopping or augmentation, as the seed notebooks did.

Each search runs ``--trials`` trials, the same hyperparameters in the same order, and notes
when each trial ended and its score. The time to a target is from the search's start (data
prepared and tuner built on both sides: automammo's ``search_begin``, the plain tuner's
``search`` call; each side's set-up time is printed apart) to the end of the first trial
scoring at least the target (a trial's model is usable only then);
for the plain search the table also shows when the first epoch at or above the target
ended, the best case for someone watching its logs. Times are reported for ``--target``,
for a ladder of targets around it, and for the highest score both searches reach (the
lower of their two bests: the hardest target with a time on both sides); a search that
never reaches a target within its trials is reported as such. The whole searches' wall
times are compared too.

Usage::

    python benchmarks/search_to_target.py                        # 6 trials each, 32 px phantom
    python benchmarks/search_to_target.py --size 64 --trials 20 --target 0.8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, __import__("os").path.dirname(__file__))
import _bench  # noqa: E402


class TimeReporter:
    """automammo's side: when each trial ended, and its score. The clock starts when the
    search starts (``search_begin``: data read and prepared, tuner built), as the plain
    search's does; the set-up before it is noted on its own."""

    def __init__(self):
        self.start = time.time()
        self.setup_s = None
        self.trials: list[dict] = []

    def search_begin(self, *args):
        now = time.time()
        self.setup_s, self.start = now - self.start, now

    def trial_end(self, record, best):
        elapsed = time.time() - self.start
        self.trials.append({"trial_id": record["trial_id"], "score": record["score"], "epochs": record["epochs"],
                            "finished_s": elapsed})
        print(f"  automammo trial {record['trial_id']}: AUC {record['score'] or float('nan'):.3f} "
              f"after {record['epochs']} epochs, {elapsed:.0f} s", flush=True)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def run_automammo(data: Path, args, root: Path) -> dict:
    from automammo.search import SearchConfig, run_search

    reporter = TimeReporter()
    config = SearchConfig(data=str(data), task=args.task, objective="auc", builders=["scratch_cnn"],
                          trials=args.trials, image_size=args.size, seed=args.seed, tuner=args.tuner)
    run_search(config, root / "automammo", reporter=reporter)
    name = "automammo (defaults)" if args.tuner == "random" else f"automammo (--tuner {args.tuner})"
    return {"search": name, "trials": reporter.trials, "setup_s": reporter.setup_s}


def run_plain(data: Path, args, root: Path) -> dict:
    import keras
    import keras_tuner as kt
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from automammo.builders import BuildContext, BuilderChoice
    from automammo.dataset import load
    from automammo.search import SearchConfig, prepare_data
    from automammo.tasks import get_task
    from automammo_plugins.scratch_cnn import ScratchCNN

    config = SearchConfig(data=str(data), task=args.task, objective="auc", image_size=args.size, seed=args.seed)
    task = get_task(config.task)
    prepared = prepare_data(load(data), task, config, str(data), need_pairs=False)
    d = prepared.trial_data
    context = BuildContext(image_size=args.size, n_classes=task.n_classes, task=task.name, seed=config.seed)
    hypermodel = BuilderChoice({"scratch_cnn": ScratchCNN(context)})
    setup_start, clock_start, trials = time.time(), [0.0], []

    class ValAuc(keras.callbacks.Callback):
        """The same objective as automammo's: scikit-learn's AUC on validation, per epoch."""

        def __init__(self):
            super().__init__()
            self.ends: list[float] = []

        def on_epoch_end(self, epoch, logs=None):
            p = self.model.predict(d.x_val, batch_size=128, verbose=0)[:, task.positive]
            logs["val_auc"] = float(roc_auc_score(d.y_val == task.positive, p))
            self.ends.append(time.time() - clock_start[0])

    class Plain(kt.RandomSearch):
        def run_trial(self, trial, *fit_args, **fit_kwargs):
            hp = trial.hyperparameters
            model = self.hypermodel.build(hp)
            clock = ValAuc()
            history = model.fit(d.x_fit, d.y_fit, batch_size=hp.get("scratch_cnn/batch_size"),
                                epochs=args.epochs, validation_data=(d.x_val, d.y_val), verbose=0,
                                class_weight=d.class_weight(hp.get("scratch_cnn/class_weight")),
                                callbacks=[clock])
            auc = history.history["val_auc"]
            best = int(np.argmax(auc))
            trials.append({"trial_id": trial.trial_id, "score": float(auc[best]), "epochs": args.epochs,
                           "finished_s": time.time() - clock_start[0],
                           "epoch_auc": [float(a) for a in auc], "epoch_end_s": clock.ends})
            print(f"  plain trial {trial.trial_id}: AUC {auc[best]:.3f} (best epoch {best + 1} of {args.epochs}), "
                  f"{trials[-1]['finished_s']:.0f} s", flush=True)
            return history

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            keras.backend.clear_session()

    # The same oracle and seed as automammo's random tuner (it passes seed + 1: Keras Tuner
    # treats 0 as "no seed").
    tuner = Plain(hypermodel=hypermodel, objective=kt.Objective("val_auc", "max"), max_trials=args.trials,
                  seed=config.seed + 1, directory=str(root), project_name="plain", overwrite=True)
    keras.utils.set_random_seed(config.seed)
    clock_start[0] = time.time()
    setup_s = clock_start[0] - setup_start
    tuner.search(verbose=0)
    return {"search": "plain Keras Tuner", "trials": trials, "setup_s": setup_s}


def time_to(trials: list[dict], target: float) -> float | None:
    """Seconds from the search's start to the end of the first trial scoring >= target."""
    return next((t["finished_s"] for t in trials if t["score"] is not None and t["score"] >= target), None)


def epoch_to(trials: list[dict], target: float) -> float | None:
    """Seconds to the end of the first epoch at or above target (plain search only)."""
    for t in trials:
        for auc, end in zip(t["epoch_auc"], t["epoch_end_s"]):
            if auc >= target:
                return end
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.7, help="validation AUC to reach")
    parser.add_argument("--task", default="benign-malignant")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--lesions", type=int, default=400)
    parser.add_argument("--difficulty", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=20, help="the plain search's fixed epochs (automammo's maximum)")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tuner", default="random", choices=["random", "bayesian", "hyperband"],
                        help="automammo's tuner (random is its default; hyperband decides its own trial count "
                             "from --epochs)")
    args = parser.parse_args(argv)

    from automammo.phantom import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "phantom.npz"
        synthesize(n_lesions=args.lesions, size=args.size, difficulty=args.difficulty, seed=args.seed).save(data)
        auto, plain = run_automammo(data, args, Path(tmp)), run_plain(data, args, Path(tmp))
    for r in (auto, plain):
        r["wall_seconds"] = max(t["finished_s"] for t in r["trials"])
        r["epochs_trained"] = sum(t["epochs"] for t in r["trials"])
        r["best_auc"] = max((t["score"] for t in r["trials"] if t["score"] is not None), default=None)
    common = min(auto["best_auc"], plain["best_auc"])
    targets = sorted({round(args.target + d, 2) for d in (-0.1, -0.05, 0.0, 0.05, 0.1)})
    rows = []
    for target, label in [(t, f"{t:.2f}") for t in targets] + [(common, f"{common:.3f} (both reach)")]:
        a, p = time_to(auto["trials"], target), time_to(plain["trials"], target)
        rows.append({"target": target, "label": label, "automammo_s": a, "plain_s": p,
                     "plain_first_epoch_s": epoch_to(plain["trials"], target),
                     "speedup": p / a if a and p else None})
    print(f"\n{args.trials} trials each, task {args.task}, phantom of {args.lesions} lesions at {args.size} px "
          f"(difficulty {args.difficulty}); plain: {args.epochs} fixed epochs\n")
    print(_bench.table(["search", "set-up s (not timed)", "wall s", "epochs trained", "s per epoch", "best AUC"],
                       [[r["search"], r["setup_s"], r["wall_seconds"], r["epochs_trained"],
                         r["wall_seconds"] / r["epochs_trained"], r["best_auc"]] for r in (auto, plain)]))
    print()
    print(_bench.table(["target AUC", "automammo s", "plain s (trial)", "plain s (epoch)", "speed-up"],
                       [[r["label"], r["automammo_s"], r["plain_s"], r["plain_first_epoch_s"], r["speedup"]]
                        for r in rows]))
    whole = plain["wall_seconds"] / auto["wall_seconds"]
    print(f"\nwhole search: automammo {whole:.1f}x sooner, best AUC {auto['best_auc']:.3f} against "
          f"{plain['best_auc']:.3f}")
    main_row = next(r for r in rows if r["target"] == round(args.target, 2))
    speedup = main_row["speedup"]
    if speedup is not None:
        print(f"at AUC {args.target}: automammo {speedup:.1f}x sooner (target >= 3x: {'met' if speedup >= 3 else 'MISSED'})")
    else:
        missing = [name for name, key in (("automammo", "automammo_s"), ("plain", "plain_s")) if main_row[key] is None]
        print(f"at AUC {args.target}: not reached by {', '.join(missing)} within {args.trials} trials")
    searches = [auto, plain]
    path = _bench.save("search_to_target", {"settings": vars(args), "searches": searches, "rows": rows,
                                            "whole_search_speedup": whole, "common_target": rows[-1],
                                            "target": {"auc": args.target, "required_speedup": 3.0, "speedup": speedup,
                                                       "met": speedup is not None and speedup >= 3.0}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
