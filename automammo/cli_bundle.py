"""``automammo ensemble``, ``predict`` and ``evaluate``: making and using bundles.

Mounted into the main group by ``automammo.cli``; library errors raised here become one
line and exit code 2 there.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click
import numpy as np

from automammo.cli import console, esc
from automammo.render import confusion_table, metrics_table


class _Messages:
    """Ensemble progress as dim lines."""

    def __init__(self, con):
        self.con = con

    def message(self, text: str) -> None:
        self.con.print(f"[dim]{esc(text)}[/dim]")


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--meta", default=None, help="Meta-learner [default: the best by cross-validation of every registered one].")
@click.option("--top", type=click.IntRange(1), default=5, show_default=True, help="Members: the best K trials.")
@click.option("--diverse", is_flag=True, help="Take the best trial of each builder before any second best.")
@click.option("--features", type=click.Choice(["probs", "penultimate"]), default="probs", show_default=True,
              help="What the meta-learner stacks: member probabilities or penultimate-layer features.")
@click.option("--objective", default=None, help="Objective for ranking, selection and threshold [default: the run's].")
@click.option("--min-sensitivity", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Binary tasks: the threshold with the highest specificity at this sensitivity or more.")
@click.option("--data", "data_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The runs' dataset, if it moved since the search.")
@click.option("--folds", type=click.IntRange(2), default=5, show_default=True,
              help="Patient-grouped folds over the validation rows.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Bundle to write, NAME.ammo [default: beside the first run].")
def ensemble(runs, meta, top, diverse, features, objective, min_sensitivity, data_path, folds, seed, out):
    """Stack the best trials of finished RUNS into a bundle with a tuned threshold."""
    from rich.table import Table

    from automammo.ensemble import ensemble_and_export

    con = console()
    out = out or Path(runs[0]).with_name(Path(runs[0]).name + ".ammo")
    result = ensemble_and_export(list(runs), out, meta=meta, top=top, diverse=diverse, features=features,
                                 min_sensitivity=min_sensitivity, objective=objective, data=data_path,
                                 folds=folds, seed=seed, reporter=_Messages(con))
    manifest = result.manifest
    val = manifest["validation"]
    score_name = val["score"]["name"]
    t = Table(title=f"meta-learners: cross-validated {score_name} on {val['n']} validation rows, "
                    f"{val['folds']} patient-grouped folds", title_justify="left")
    # With --min-sensitivity the score is the specificity: one column for it.
    scores = [k for k in ("score", "sensitivity", "specificity") if k == "score" or k != score_name]
    for col in ("meta-learner", *[score_name if k == "score" else k for k in scores], "note"):
        t.add_column(col, justify="left" if col in ("meta-learner", "note") else "right")
    for name, a in result.assessments.items():
        cells = [_f(a.get(k)) for k in scores]
        t.add_row(esc(name + (" *" if name == result.meta else "")), *cells, esc(a.get("error") or ""))
    con.print(t)
    m = Table(title="members", title_justify="left")
    for col in ("member", "builder", "inputs", f"{manifest['objective']['name']} (val, t=0.5)"):
        m.add_column(col)
    for spec in manifest["members"]:
        m.add_row(esc(f"{Path(spec['run']).name}/{spec['trial_id']}"), esc(spec["builder"]), esc(spec["inputs"]),
                  _f(spec["validation"]["score"]))
    con.print(m)
    con.print(metrics_table(val, "Validation metrics of the ensemble (out-of-fold, cross-validated threshold)"))
    if result.threshold is not None:
        rule = manifest["threshold_rule"]
        why = (f"highest specificity with sensitivity >= {rule['min_sensitivity']:g}"
               if rule["rule"] == "min_sensitivity" else f"{rule['rule']} {rule.get('objective') or ''}".strip())
        positive = manifest["task"]["classes"][manifest["task"]["positive"]]
        con.print(f"threshold [bold]{result.threshold:.4f}[/bold] on {esc(f'p({positive}) ({why})')}")
    con.print(esc(f"best single member {result.best_member['member']}: {score_name} {_f(result.best_member['score'])}; "
                  f"ensemble ({result.meta}): {_f(result.score)}"))
    con.print(f"[bold green]bundle[/bold green] {esc(result.bundle)}")


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--baseline", "baselines", multiple=True, type=click.Path(path_type=Path),
              help="Baseline patch for each image file, in order (bundles with pair members).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the predictions as CSV.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
def predict(bundle, inputs, baselines, out, batch_size):
    """Class probabilities and decisions of BUNDLE for INPUTS (PNG/JPEG/DICOM files, dataset.npz)."""
    from rich.table import Table

    from automammo.atomic import atomic_path
    from automammo.bundle import Bundle
    from automammo.errors import DataError
    from automammo.inputs import read_inputs
    from automammo.tasks import get_task

    b = Bundle.load(bundle)
    items = read_inputs(inputs, baselines, task=get_task(b.task_name), need_baseline=b.needs_baseline)
    if baselines and not b.needs_baseline:
        console(stderr=True).print("[yellow]note[/yellow]: this bundle does not use baselines; --baseline ignored")
    _warn_bit_depth(b, items.dtypes)
    raw_b = items.baselines if b.needs_baseline else None
    if raw_b is not None and any(x is None for x in raw_b):
        raise DataError("every patch needs a baseline for this bundle")
    probs = b.predict_proba(items.images, raw_b, batch_size)
    decided = b.decide(probs)
    header = ["input", *items.columns, *[f"p_{c}" for c in b.classes], "decision", "threshold"]
    rows = []
    for i, name in enumerate(items.names):
        rows.append([name, *[items.columns[k][i] for k in items.columns], *[f"{p:.6f}" for p in probs[i]],
                     b.classes[decided[i]], "" if b.threshold is None else f"{b.threshold:.6f}"])
    if out is not None:
        with atomic_path(out, suffix=".csv") as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(header)
                writer.writerows(rows)
    con = console()
    shown = 50
    title = f"{len(rows)} predictions of {b.path.name}" + (
        f" (threshold {b.threshold:.4f} on p({b.classes[b.positive]}))" if b.threshold is not None else "")
    t = Table(title=esc(title), title_justify="left")
    columns = ["input", *([c for c in items.columns if c != "split"]), *header[-2 - len(b.classes):-1]]
    for col in columns:
        t.add_column(col, justify="right" if col.startswith("p_") else "left", overflow="fold")
    index = {h: i for i, h in enumerate(header)}
    for row in rows[:shown]:
        t.add_row(*[esc(row[index[c]]) for c in columns])
    con.print(t)
    if len(rows) > shown:
        con.print(esc(f"... {len(rows) - shown} more" + (f" in {out}" if out else "; use --out FILE for all")))
    counts = {c: int((decided == i).sum()) for i, c in enumerate(b.classes)}
    con.print(esc("decisions: " + ", ".join(f"{c} {n}" for c, n in counts.items()) + (f"; written to {out}" if out else "")))


def _warn_bit_depth(b, dtypes) -> str | None:
    scales = {m.preprocessing.scale_max for m in b.members}
    trained_deep = any(s > 255 for s in scales)
    # Any input of the other depth, even beside inputs of the right one.
    other = sorted(d for d in set(dtypes) if (np.dtype(d) == np.uint16) != trained_deep)
    if not other:
        return None
    some = "" if len(set(dtypes)) == len(other) else "some of "
    text = (f"the bundle scales pixels by {max(scales):g} (its training data), but {some}the inputs are "
            f"{'/'.join(other)}; predictions are only meaningful on data of the same bit depth")
    console(stderr=True).print(f"[yellow]warning[/yellow]: {esc(text)}")
    return text


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="dataset.npz whose test split is scored.")
@click.option("--replicates", type=click.IntRange(100), default=2000, show_default=True, help="Bootstrap replicates.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def evaluate(bundle, data_path, replicates, seed, as_json):
    """Score BUNDLE on the test split of --data: metrics with n and bootstrap 95% CIs."""
    from automammo.bundle import Bundle
    from automammo.evaluation import evaluate_bundle, format_metric

    b = Bundle.load(bundle)
    report = evaluate_bundle(b, data_path, replicates, seed)
    mismatch = _warn_bit_depth(b, {report["dtype"]})
    report["warnings"] = [mismatch] if mismatch else []
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    con = console()
    origin = ("the dataset the bundle was built on; its test split was used by no stage before"
              if report["same_data"] else "a dataset the bundle was not built on (external test)")
    con.print(f"[bold]{esc(report['bundle'])}[/bold] on the test split of {esc(report['data'])}: "
              f"{report['n']} samples of {report['n_patients']} patients, task {report['task']}"
              + (f", threshold {report['threshold']:.4f}" if report["threshold"] is not None else ""))
    con.print(f"[dim]{origin}[/dim]")
    con.print(metrics_table(report, "Test metrics"))
    con.print(confusion_table(report["confusion_matrix"], con.width))
    for name, m in report["metrics"].items():
        if " called " in name:
            value, ci = format_metric(m, integer=True)
            con.print(f"[bold]{esc(name)}[/bold]: {value} of {m['n']} (95% CI {ci})")


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"

COMMANDS = [ensemble, predict, evaluate]
