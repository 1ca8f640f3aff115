"""How hard is each task on the digital phantom? A small fixed CNN, trained per task.

The phantom is useful only if its tasks are neither trivial nor hopeless. This script
generates it, trains one small, fixed Keras 3 CNN per task (three conv blocks of 16-32-64
filters, global average pooling, a dense layer, softmax) with early stopping on a
patient-grouped validation part of ``train``, and scores it once on ``test``: accuracy and
macro one-vs-rest AUC, each with a patient-level bootstrap 95% interval.

Usage::

    python benchmarks/phantom_difficulty.py                 # 600 lesions, 64 px, difficulty 0.5
    python benchmarks/phantom_difficulty.py --difficulty 0.8 --epochs 20

It prints a table and writes ``benchmarks/results/phantom_difficulty.json`` (see
``docs/phantom.md`` for the numbers measured on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score  # noqa: E402

from automammo.atomic import write_json  # noqa: E402
from automammo.phantom import GENERATOR_VERSION, synthesize  # noqa: E402
from automammo.splits import fit_validation_split  # noqa: E402
from automammo.tasks import TASKS, Task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "phantom_difficulty.json"


def build_cnn(size: int, n_classes: int, seed: int):
    """The fixed reference network: small enough to train in seconds on a CPU."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 1))
    # Mammographic patches have no preferred orientation; flips are free extra data.
    h = layers.RandomFlip("horizontal_and_vertical", seed=seed)(inputs)
    for filters in (16, 32, 64):
        for _ in range(2):
            h = layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
            # A short memory for the batch statistics: with a few hundred patches an epoch
            # is a dozen steps, and the default 0.99 leaves validation with stale statistics.
            h = layers.BatchNormalization(momentum=0.9)(h)
            h = layers.Activation("relu")(h)
        h = layers.MaxPooling2D()(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dropout(0.3, seed=seed)(h)
    h = layers.Dense(64, activation="relu")(h)
    outputs = layers.Dense(n_classes, activation="softmax")(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def macro_auc(y: np.ndarray, prob: np.ndarray) -> float:
    """Binary AUC on the positive column, or the macro one-vs-rest AUC for more classes."""
    if prob.shape[1] == 2:
        return float(roc_auc_score(y, prob[:, 1]))
    return float(roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=np.arange(prob.shape[1])))


def bootstrap_interval(y, prob, groups, metric, rounds: int, seed: int) -> tuple[float, float]:
    """95% interval of ``metric`` over resamples of whole patients (their patches are not
    independent: a patient's lesions share one breast)."""
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    values = []
    for _ in range(rounds):
        take = np.concatenate([members[g] for g in rng.integers(0, len(unique), len(unique))])
        if len(np.unique(y[take])) < prob.shape[1]:
            continue  # AUC is undefined when a class is missing from the resample
        values.append(metric(y[take], prob[take]))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def run_task(task: Task, ds, images: np.ndarray, args) -> dict:
    """Train on ``train`` (fit / validation by patient), score once on ``test``."""
    import keras

    train = task.indices(ds, "train")
    test = task.indices(ds, "test")
    y_all = task.targets(ds.label)
    fit_pos, val_pos = fit_validation_split(y_all[train], ds.patient[train], 0.2, args.seed)
    fit, val = train[fit_pos], train[val_pos]

    model = build_cnn(images.shape[1], task.n_classes, args.seed)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=args.patience,
                                         restore_best_weights=True)
    started = time.perf_counter()
    history = model.fit(images[fit], y_all[fit], validation_data=(images[val], y_all[val]),
                        epochs=args.epochs, batch_size=args.batch_size, callbacks=[stop], verbose=0)
    seconds = time.perf_counter() - started

    prob = model.predict(images[test], batch_size=256, verbose=0)
    y = y_all[test]
    pred = prob.argmax(1)
    majority = np.bincount(y_all[train], minlength=task.n_classes).argmax()
    accuracy_ci = bootstrap_interval(y, prob, ds.patient[test],
                                     lambda t, p: accuracy_score(t, p.argmax(1)), args.bootstrap, args.seed)
    auc_ci = bootstrap_interval(y, prob, ds.patient[test], macro_auc, args.bootstrap, args.seed)
    return {
        "task": task.name,
        "classes": list(task.classes),
        "n_fit": int(len(fit)),
        "n_validation": int(len(val)),
        "n_test": int(len(test)),
        "test_patients": int(len(np.unique(ds.patient[test]))),
        "chance_accuracy": float(np.mean(y == majority)),
        "accuracy": float(accuracy_score(y, pred)),
        "accuracy_ci95": accuracy_ci,
        "macro_auc": macro_auc(y, prob),
        "macro_auc_ci95": auc_ci,
        "confusion": confusion_matrix(y, pred, labels=np.arange(task.n_classes)).tolist(),
        "epochs_run": len(history.history["loss"]),
        "best_epoch": int(np.argmin(history.history["val_loss"])) + 1,
        "train_seconds": round(seconds, 1),
    }


def print_table(rows: list[dict]) -> None:
    head = (f"{'task':<20} {'n test':>6} {'chance':>6}  {'accuracy [95% CI]':<22} "
            f"{'macro AUC [95% CI]':<22} {'epochs':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        acc = f"{r['accuracy']:.3f} [{r['accuracy_ci95'][0]:.2f}, {r['accuracy_ci95'][1]:.2f}]"
        auc = f"{r['macro_auc']:.3f} [{r['macro_auc_ci95'][0]:.2f}, {r['macro_auc_ci95'][1]:.2f}]"
        print(f"{r['task']:<20} {r['n_test']:>6} {r['chance_accuracy']:>6.2f}  {acc:<22} {auc:<22} "
              f"{r['best_epoch']:>2}/{r['epochs_run']:<3}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lesions", type=int, default=600)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--difficulty", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="seeds the phantom and the training")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--task", action="append", choices=sorted(TASKS), help="repeatable; default all")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    ds = synthesize(n_lesions=args.lesions, size=args.size, difficulty=args.difficulty, seed=args.seed)
    generate_seconds = time.perf_counter() - started
    images = (ds.x.astype(np.float32) / 4095.0)[..., None]  # the phantom's 12-bit range -> [0, 1]
    print(f"phantom: {args.lesions} lesions, {args.size} px, difficulty {args.difficulty}, "
          f"seed {args.seed}: {len(ds)} patches in {generate_seconds:.1f} s", flush=True)

    rows = []
    for name in args.task or list(TASKS):
        rows.append(run_task(TASKS[name], ds, images, args))
        print(f"  {name}: accuracy {rows[-1]['accuracy']:.3f}, macro AUC {rows[-1]['macro_auc']:.3f} "
              f"({rows[-1]['train_seconds']} s)", flush=True)
    print()
    print_table(rows)

    import keras
    import tensorflow as tf

    write_json(args.out, {
        "command": " ".join(["python benchmarks/phantom_difficulty.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "phantom": {"n_lesions": args.lesions, "size": args.size, "difficulty": args.difficulty,
                    "seed": args.seed, "generator_version": GENERATOR_VERSION,
                    "fingerprint": ds.fingerprint()},
        "training": {"epochs": args.epochs, "patience": args.patience, "batch_size": args.batch_size,
                     "validation_fraction": 0.2, "model": "conv 16-32-64 (x2 each, BN), GAP, dropout 0.3, dense 64"},
        "results": rows,
        "seconds_total": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "tensorflow": tf.__version__,
                    "keras": keras.__version__},
    })
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
