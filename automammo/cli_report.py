"""``automammo report`` and ``automammo validate``: looking at runs and bundles.

Mounted into the main group by ``automammo.cli``; library errors raised here become one
line and exit code 2 there. Progress goes to stderr so that ``--json`` output stays clean.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from automammo.cli import console, esc


@click.command()
@click.argument("path", metavar="RUN_OR_BUNDLE", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write PNG figures into this directory (created if needed).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON for scripts.")
@click.option("--top", type=click.IntRange(1), default=10, show_default=True,
              help="Completed trials in the leaderboard (failed ones are always listed) and learning curves.")
@click.option("--data", "data_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The dataset, if it moved since the search (patch gallery, patient bootstrap).")
def report(path, plots_dir, as_json, top, data_path):
    """Leaderboard, progress, ensemble, thresholds and metrics of a run or a bundle."""
    from automammo.render import render_plots, render_report
    from automammo.report import collect, open_source

    source = open_source(path, data_path)
    content = collect(source, top)
    plots = None
    if plots_dir is not None:
        from automammo.plots import write_plots

        plots = write_plots(source, plots_dir, top=min(top, 5))
    if as_json:
        if plots is not None:
            content["plots"] = plots
        click.echo(json.dumps(content, indent=2))
        return
    con = console()
    render_report(content, con)
    if plots is not None:
        con.print()
        render_plots(plots, con)


@click.command()
@click.argument("path", metavar="RUN_OR_BUNDLE", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--trial", "trial_id", default=None, help="Trial of a run to re-train [default: the best].")
@click.option("--repeats", type=click.IntRange(1), default=None,
              help="Trainings with different seeds [default: 5, or 1 with --folds].")
@click.option("--folds", type=click.IntRange(2), default=None,
              help="Patient-grouped folds of the train split (each fold held out once) instead of the run's split.")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Maximum epochs per training [default: the run's].")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed; repeat r uses seed + r.")
@click.option("--data", "data_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The dataset, if it moved since the search.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON for scripts.")
def validate(path, trial_id, repeats, folds, epochs, seed, data_path, as_json):
    """Re-train a trial (or every member of a bundle) R times and/or over K folds: mean +- sd."""
    from automammo.render import render_validation
    from automammo.validate import validate as run_validation

    err = console(stderr=True)

    def progress(text: str) -> None:
        err.print(f"[dim]{esc(text)}[/dim]")

    result = run_validation(path, trial_id=trial_id, repeats=repeats, folds=folds, epochs=epochs, seed=seed,
                            data=data_path, progress=progress)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    render_validation(result, console())


COMMANDS = [report, validate]
