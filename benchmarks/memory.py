"""Resident memory of the training process after each of 30 trials: does it stay flat?

Keras Tuner users have long seen memory climb trial after trial until a long search dies.
automammo clears the Keras session and collects garbage after every trial and keeps no
model or history in memory. It also drops the ``tf.custom_gradient`` entries each trial's
train step leaves in TensorFlow's global gradient registry, whose closures would otherwise
keep every traced train-step graph alive (tensorflow/tensorflow#97697). Two ways
of running the same search of ``--trials`` small scratch-CNN trials (the search's defaults
otherwise, TensorBoard logging included):

- ``in-process``: ``run_search`` trains every trial itself; RSS read from
  /proc/self/status after each trial is recorded;
- ``worker``: a chief and one local worker process (``distributed.serve``) that a fresh
  process replaces every ``--recycle`` trials (default ``distributed.RECYCLE_TRIALS``, 50:
  longer than the benchmark); the worker writes its RSS after each trial to its heartbeat
  file.

Target: RSS grows by less than 10% from trial 5 to trial 30. The search draws models of
different sizes, and the first trial with a model larger than any before raises memory
once (the allocator of TensorFlow's oneDNN build keeps a larger region;
``docs/scaling.md``); a leak grows every trial. So the table also compares the highest RSS
of each window of ``--window`` trials, first window against last.

Usage::

    python benchmarks/memory.py                      # 30 trials, 1 epoch, 32 px phantom, both modes
    python benchmarks/memory.py --modes worker --trials 100 --recycle 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, __import__("os").path.dirname(__file__))
import _bench  # noqa: E402


class RssReporter:
    """Notes this process's RSS each time a trial has been recorded."""

    def __init__(self):
        self.rows: list[dict] = []

    def trial_end(self, record, best):
        self.rows.append({"trial": len(self.rows) + 1, "trial_id": record["trial_id"],
                          "status": record["status"], "rss_mb": _bench.rss_mb()})
        print(f"  trial {len(self.rows):>3}: {self.rows[-1]['rss_mb']:.0f} MiB", flush=True)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def in_process(data: Path, args, root: Path) -> list[float]:
    from automammo.search import SearchConfig, run_search

    reporter = RssReporter()
    run_search(SearchConfig(data=str(data), builders=["scratch_cnn"], trials=args.trials, epochs=args.epochs),
               root / "in-process", reporter=reporter)
    return [r["rss_mb"] for r in reporter.rows]


def in_worker(data: Path, args, root: Path) -> list[float]:
    import json

    from automammo import distributed, search
    from automammo.search import SearchConfig, run_search

    make = search._tuner_for

    def chief_tuner(config, *a, **kw):
        # What run_search does for SearchConfig.workers: serve instead of training.
        tuner = make(config, *a, **kw)
        tuner.search = lambda **fit: distributed.serve(tuner, tuner.run, tuner.reporter, 1, recycle=args.recycle)
        return tuner

    search._tuner_for = chief_tuner
    try:
        result = run_search(SearchConfig(data=str(data), builders=["scratch_cnn"], trials=args.trials,
                                         epochs=args.epochs), root / "worker")
    finally:
        search._tuner_for = make
    beats = sorted((result.run_dir / "workers").glob("tuner*.json"), key=lambda p: int(p.stem[5:]))
    rss = [x for p in beats for x in json.loads(p.read_text()).get("rss_mb_after_trials", [])]
    for i, x in enumerate(rss, 1):
        print(f"  trial {i:>3}: {x:.0f} MiB (worker)")
    return rss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--lesions", type=int, default=200)
    parser.add_argument("--recycle", type=int, default=None,
                        help="worker mode: fresh process every N trials (default: distributed.RECYCLE_TRIALS)")
    parser.add_argument("--window", type=int, default=10, help="trials per window for the peak comparison")
    parser.add_argument("--modes", nargs="+", default=["in-process", "worker"], choices=["in-process", "worker"])
    args = parser.parse_args(argv)
    if args.trials < 6:
        parser.error("--trials must be at least 6 (growth is measured from trial 5)")
    if args.recycle is None:
        from automammo.distributed import RECYCLE_TRIALS

        args.recycle = RECYCLE_TRIALS

    from automammo.phantom import synthesize

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "phantom.npz"
        synthesize(n_lesions=args.lesions, size=args.size, seed=0).save(data)
        for mode in args.modes:
            rss = (in_process if mode == "in-process" else in_worker)(data, args, Path(tmp))
            growth = (rss[-1] - rss[4]) / rss[4]
            # A recycled worker's memory is a saw-tooth, and a model larger than any before
            # raises the high-water mark once: compare the highest RSS of each window of
            # --window trials too, first window against last.
            peaks = [max(rss[i:i + args.window]) for i in range(0, len(rss), args.window)]
            results[mode] = {"rss_mb": rss, "growth_5_to_last": growth, "peak_mb": max(rss),
                             "mib_per_trial_after_5": (rss[-1] - rss[4]) / (len(rss) - 5), "met": growth < 0.10,
                             "window_peaks_mb": peaks, "window_peak_growth": (peaks[-1] - peaks[0]) / peaks[0]}
    print()
    print(_bench.table(["mode", "after trial 1", "after trial 5", f"after trial {args.trials}", "peak",
                        "MiB/trial after 5", "growth 5 to last", f"peak of each {args.window} trials",
                        "first to last peak"],
                       [[m, r["rss_mb"][0], r["rss_mb"][4], r["rss_mb"][-1], r["peak_mb"], r["mib_per_trial_after_5"],
                         f"{100 * r['growth_5_to_last']:+.1f}%", " ".join(f"{p:.0f}" for p in r["window_peaks_mb"]),
                         f"{100 * r['window_peak_growth']:+.1f}%"] for m, r in results.items()]))
    for mode, r in results.items():
        print(f"{mode}: target < 10% growth from trial 5 to {args.trials}: {'met' if r['met'] else 'MISSED'}")
    path = _bench.save("memory", {"settings": vars(args), "modes": results,
                                  "target": {"required_growth_below": 0.10,
                                             "met": {m: r["met"] for m, r in results.items()}}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
