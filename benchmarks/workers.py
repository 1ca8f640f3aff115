"""Trials per hour of one search with 1 versus 2 local worker processes (and in-process).

The same search (same seed, so the same trials with the same hyperparameters) runs three
ways on this machine's cores:

- ``in-process``: ``run_search`` trains every trial itself, TensorFlow using every core;
- ``1 worker``: a chief serving Keras Tuner's oracle and one worker with every core;
- ``2 workers``: the chief and two workers, the cores split between them.

Trials per hour counts finished trials over the wall time of the whole search, worker
start-up (importing TensorFlow, preparing the data) included, as a user would time it; the
table also shows the time from the first trial's start to the last trial's end.

Usage::

    python benchmarks/workers.py                      # 24 trials x 2 epochs, 48 px phantom
    python benchmarks/workers.py --trials 20 --epochs 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, __import__("os").path.dirname(__file__))
import _bench  # noqa: E402


def serving(workers: int):
    """Make ``run_search`` a chief with ``workers`` local workers (0: train in-process).

    The same few lines that ``run_search`` runs for ``SearchConfig.workers``: the tuner it
    built serves its oracle (``distributed.serve``) instead of training.
    """
    from automammo import distributed, search

    make = search._tuner_for

    def tuner_for(config, *args, **kwargs):
        tuner = make(config, *args, **kwargs)
        if workers:
            tuner.search = lambda **fit: distributed.serve(tuner, tuner.run, tuner.reporter, workers)
        return tuner

    search._tuner_for = tuner_for
    return lambda: setattr(search, "_tuner_for", make)


def one(mode: str, workers: int, data: Path, args, root: Path) -> dict:
    from automammo.search import SearchConfig, run_search

    restore = serving(workers)
    config = SearchConfig(data=str(data), builders=["scratch_cnn"], trials=args.trials, epochs=args.epochs,
                          patience=args.epochs, tensorboard=False, seed=1)
    start = time.time()
    try:
        result = run_search(config, root / mode.replace(" ", "-"))
    finally:
        restore()
    wall = time.time() - start
    done = [t for t in result.trials if t["status"] == "COMPLETED"]
    ends = [dt.datetime.fromisoformat(t["finished"]).timestamp() for t in result.trials]
    first_start = min(e - t["seconds"] for e, t in zip(ends, result.trials))
    busy = max(ends) - first_start
    return {"mode": mode, "workers": workers, "trials": len(result.trials), "completed": len(done),
            "wall_seconds": wall, "trials_per_hour": 3600 * len(done) / wall,
            "first_start_to_last_end_seconds": busy, "trials_per_hour_excluding_startup": 3600 * len(done) / busy,
            "mean_trial_seconds": sum(t["seconds"] for t in result.trials) / len(result.trials)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--lesions", type=int, default=300)
    parser.add_argument("--modes", nargs="+", default=["in-process", "1 worker", "2 workers"],
                        choices=["in-process", "1 worker", "2 workers"])
    args = parser.parse_args(argv)

    from automammo.phantom import synthesize

    counts = {"in-process": 0, "1 worker": 1, "2 workers": 2}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "phantom.npz"
        synthesize(n_lesions=args.lesions, size=args.size, seed=0).save(data)
        rows = []
        for mode in args.modes:
            rows.append(one(mode, counts[mode], data, args, Path(tmp)))
            print(f"  {mode}: {rows[-1]['trials_per_hour']:.0f} trials/h", flush=True)
    print(f"\n{args.trials} scratch-CNN trials x {args.epochs} epochs on a {args.size} px phantom "
          f"({args.lesions} lesions), {len(__import__('os').sched_getaffinity(0))} cores\n")
    print(_bench.table(["mode", "trials/h", "wall s", "trials/h without start-up", "mean trial s"],
                       [[r["mode"], r["trials_per_hour"], r["wall_seconds"], r["trials_per_hour_excluding_startup"],
                         r["mean_trial_seconds"]] for r in rows]))
    by_mode = {r["mode"]: r for r in rows}
    speedup = None
    if "1 worker" in by_mode and "2 workers" in by_mode:
        speedup = by_mode["2 workers"]["trials_per_hour"] / by_mode["1 worker"]["trials_per_hour"]
        print(f"\n2 workers vs 1: {speedup:.2f}x trials per hour")
    path = _bench.save("workers", {"settings": vars(args), "rows": rows, "speedup_2_vs_1": speedup})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
