"""phantom -> search -> ensemble -> evaluate -> report, through the Python API.

    python examples/end_to_end.py OUT_DIR [--lesions 400] [--size 64] [--trials 4] [--epochs 15]

Everything lands in OUT_DIR: the phantom dataset, the run, the bundle, the report as JSON
and the plots. The same steps on the command line are in the README.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from automammo.bundle import Bundle
from automammo.ensemble import ensemble_and_export
from automammo.evaluation import evaluate_bundle
from automammo.phantom import synthesize
from automammo.plots import write_plots
from automammo.render import render_report
from automammo.report import collect, open_source
from automammo.search import SearchConfig, run_search


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--lesions", type=int, default=400)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--builder", action="append", default=None,
                        help="builders to search (default: scratch_cnn and siamese)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    console = Console()

    # 1. Data: the digital phantom, saved in the one dataset format.
    data = synthesize(n_lesions=args.lesions, size=args.size, seed=0).save(out / "phantom.npz")

    # 2. Search: Keras Tuner over the chosen builders, F2 as the objective.
    result = run_search(SearchConfig(data=str(data), task="benign-malignant", objective="f2",
                                     builders=args.builder or ["scratch_cnn", "siamese"],
                                     trials=args.trials, epochs=args.epochs, tensorboard=False),
                        out / "run", overwrite=True)
    label = result.best.get("score_key", "f2").replace("_best", " at its best threshold")
    console.print(f"best trial {result.best['trial_id']} ({result.best['builder']}): {label} {result.best['score']:.3f}")

    # 3. Ensemble: stack the best trials, cross-validate the meta-learner and the threshold.
    made = ensemble_and_export([result.run_dir], out / "model.ammo", top=3)
    console.print(f"bundle {made.bundle}: meta-learner {made.meta}, threshold {made.threshold:.3f}")

    # 4. Evaluate on the untouched test split, with bootstrap intervals.
    evaluation = evaluate_bundle(Bundle.load(made.bundle), data, replicates=500)
    (out / "evaluation.json").write_text(json.dumps(evaluation, indent=2, default=str))

    # 5. Report: the same content as `automammo report`, and its plots.
    source = open_source(made.bundle)
    content = collect(source)
    render_report(content, console)
    plots = write_plots(source, out / "plots")
    (out / "report.json").write_text(json.dumps(content, indent=2, default=str))
    return {"evaluation": evaluation, "plots": plots, "bundle": str(made.bundle)}


if __name__ == "__main__":
    main()
