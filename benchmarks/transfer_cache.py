"""What the feature cache buys: seconds per frozen-phase trial, cached head vs base every epoch.

A transfer trial's first phase trains a new head on a frozen ImageNet base. Done naively,
every epoch pushes every fit patch (randomly rotated/flipped) and every validation patch
through the base again. ``automammo.feature_cache`` computes the base's output once per
backbone, weights, image size and data (8 symmetric copies of each fit patch, so that the
augmentation stays exact) and every later trial trains the head on the stored features.

This script times the two on the same data, epochs and head, through the builder's own
code paths (``fit_head_through_base`` and ``fit_head_on_cache``), each on a freshly built
model as in a search:

- ``recompute``: base in the loop, every epoch;
- ``cache, cold``: the first trial, which also fills the cache (8 + 1 base passes);
- ``cache, warm``: every later trial with that backbone and image size (median of repeats).

Weights are random (``--weights none``): the arithmetic, hence the time, is the same as with
ImageNet weights, and no download is needed. Early stopping is disabled (patience = epochs)
so that both run every epoch. Model building is timed apart.

Usage::

    python benchmarks/transfer_cache.py                           # vgg16, 200 patches, 150 px, 5 epochs
    python benchmarks/transfer_cache.py --backbone resnet50 --n 400 --epochs 10

It prints a table and writes ``benchmarks/results/transfer_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

from automammo.atomic import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "transfer_cache.json"


def make_data(n: int, size: int, seed: int):
    """``n`` smooth random patches in [0, 1], 80% fit and 20% validation, two classes.

    Content does not change the arithmetic of a forward pass; the patches are smooth only so
    that the head has something to fit.
    """
    from automammo.preprocess import Augmentation, TrialData, resize

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (n, size // 8, size // 8)).astype(np.float32)
    x = resize(coarse, size)[..., None]
    y = (x.mean(axis=(1, 2, 3)) > np.median(x.mean(axis=(1, 2, 3)))).astype(np.int64)
    n_fit = int(0.8 * n)
    return TrialData(x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:], 2, Augmentation(), seed=seed)


def one_trial(builder, data, epochs: int, mode: str) -> dict:
    """Build a fresh model and run one frozen phase; returns timings and the epochs run."""
    import keras
    import keras_tuner as kt

    from automammo.builders import make_optimizer

    keras.backend.clear_session()
    hp = kt.HyperParameters()
    t0 = time.perf_counter()
    model = builder.build(hp)
    built = time.perf_counter() - t0
    space = builder.training_space(hp)
    optimizer = make_optimizer(space["optimizer"], space["learning_rate"])
    run = builder.fit_head_through_base if mode == "recompute" else builder.fit_head_on_cache
    t0 = time.perf_counter()
    history = run(space, optimizer, model, data, epochs)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "build_seconds": built, "epochs": len(history.history["loss"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vgg16", help="a transfer builder name (default vgg16)")
    parser.add_argument("--n", type=int, default=200, help="patches, 80%% fit / 20%% validation")
    parser.add_argument("--size", type=int, default=150, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--warm-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import keras

    from automammo import registry
    from automammo.builders import BuildContext

    keras.utils.set_random_seed(args.seed)
    load_before = os.getloadavg()
    data = make_data(args.n, args.size, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        context = BuildContext(image_size=args.size, n_classes=2, task="", seed=args.seed, weights="none",
                               cache_dir=Path(tmp), objective="auc", direction="max", patience=args.epochs)
        builder = registry.get("builder", args.backbone)(context)
        print(f"{args.backbone}, {len(data.y_fit)} fit + {len(data.y_val)} validation patches, "
              f"{args.size} px, {args.epochs} epochs, random weights, {os.cpu_count()} CPUs", flush=True)
        recompute = one_trial(builder, data, args.epochs, "recompute")
        print(f"  recompute: {recompute['seconds']:.1f} s", flush=True)
        cold = one_trial(builder, data, args.epochs, "cache")
        print(f"  cache, cold: {cold['seconds']:.1f} s", flush=True)
        warm_runs = [one_trial(builder, data, args.epochs, "cache") for _ in range(args.warm_repeats)]
        entries = sorted((Path(tmp) / "features").glob("*/meta.json"))
        cache_bytes = sum(f.stat().st_size for f in (Path(tmp) / "features").rglob("*.npy"))
        fill = max(json.loads(e.read_text())["seconds"] for e in entries)
    warm = statistics.median(r["seconds"] for r in warm_runs)
    speedup = recompute["seconds"] / warm
    # Trials of one backbone after which the cache has paid for filling itself.
    saved = recompute["seconds"] - warm
    break_even = 1 + max(0.0, cold["seconds"] - recompute["seconds"]) / saved if saved > 0 else float("inf")

    rows = [
        ("recompute (base every epoch)", recompute["seconds"], 1.0),
        ("cache, cold (fills the cache)", cold["seconds"], recompute["seconds"] / cold["seconds"]),
        ("cache, warm (every later trial)", warm, speedup),
    ]
    print()
    print(f"{'frozen-phase trial':<34}{'seconds':>10}{'speed-up':>10}")
    for label, seconds, factor in rows:
        print(f"{label:<34}{seconds:>10.2f}{factor:>9.1f}x")
    print(f"\nfilling the cache (8 + 1 base passes) took {fill:.1f} s and {cache_bytes / 1e6:.1f} MB; "
          f"it has paid for itself after {break_even:.2f} trials of this backbone.")
    print(f"model build, not included above: {statistics.median(r['build_seconds'] for r in warm_runs):.1f} s")

    result = {
        "backbone": args.backbone, "n_fit": int(len(data.y_fit)), "n_val": int(len(data.y_val)),
        "image_size": args.size, "epochs": args.epochs, "weights": "none", "seed": args.seed,
        "recompute_seconds": round(recompute["seconds"], 3),
        "cache_cold_seconds": round(cold["seconds"], 3),
        "cache_warm_seconds": round(warm, 3),
        "cache_warm_runs": [round(r["seconds"], 3) for r in warm_runs],
        "speedup_warm": round(speedup, 1),
        "cache_fill_seconds": round(fill, 3), "cache_megabytes": round(cache_bytes / 1e6, 2),
        "break_even_trials": round(break_even, 2),
        "epochs_run": {"recompute": recompute["epochs"], "cold": cold["epochs"],
                       "warm": [r["epochs"] for r in warm_runs]},
        # Other processes on the machine slow both modes alike; the load says how much.
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "keras": keras.__version__,
                    "load_average_1min": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)}},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
