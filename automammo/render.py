"""Rich views of a report (``automammo.report``) and of a validation (``automammo.validate``).

Both take the plain dicts the ``--json`` flags print, so the terminal and a script see the
same content. Every table is laid out to stay readable in an 80-column terminal: wide
content (hyperparameters, failure reasons) goes into tables of its own or wraps, instead of
stretching the leaderboard.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from automammo.evaluation import format_metric

_SPARK = "▁▂▃▄▅▆▇█"
# Display order of clinical metrics (the bootstrap report stores them by insertion).
_ORDER = ("accuracy", "auc", "f1", "f2", "sensitivity", "specificity", "ppv", "npv", "recall")
# Thresholds shown in the terminal; the JSON holds the whole 0.01-0.99 grid.
_SHOWN_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def fmt(v, digits: int = 3) -> str:
    """A number for a table cell; a dash for a missing one."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-2:
            return f"{v:.1e}"
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def plural(n, noun: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def fmt_hp(v) -> str:
    """A hyperparameter value: short, with 3 significant digits for floats."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.3g}"
    return "-" if v is None else str(v)


class _Section:
    """A table with its title above and its caption below as plain lines: a narrow table's
    own title and caption would wrap to the table's width, not the terminal's."""

    def __init__(self, title: str, caption: str | None = None):
        self.title, self.caption = title, caption
        self.table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)

    def __getattr__(self, name):
        return getattr(self.table, name)

    def add_row(self, *cells, **kwargs) -> None:
        # Cells hold names, paths and messages from runs, plugins and data files: shown as
        # they are, never read as rich markup ("[a,b]" would vanish, "[/x]" would raise).
        self.table.add_row(*[Text(c) if isinstance(c, str) else c for c in cells], **kwargs)

    def __rich_console__(self, console, options):
        yield Text(self.title, style="bold")
        yield self.table
        if self.caption:
            yield Text(self.caption, style="dim")
        yield Text("")


def _table(title: str, caption: str | None = None) -> _Section:
    return _Section(title, caption)


# -- report ------------------------------------------------------------------------------


def render_report(report: dict, con: Console) -> None:
    """Print a collected report (``automammo.report.collect``) to ``con``."""
    _header(report, con)
    if report["kind"] == "run":
        _leaderboard(report, con)
        _best_per_builder(report, con)
        _progress(report, con)
    else:
        _ensemble(report, con)
    if "evaluated" in report:
        _evaluated(report, con)
    if report.get("thresholds"):
        _thresholds(report, con)
    if "confusion_matrix" in report:
        con.print(confusion_table(report["confusion_matrix"], con.width))
    if "metrics" in report:
        con.print(metrics_table(report["metrics"], _metrics_title(report)))
    if report["kind"] == "run":
        _tensorboard(report, con)
    for w in report.get("warnings", []):
        con.print(f"[yellow]note[/yellow]: {escape(w)}")


def _header(report: dict, con: Console) -> None:
    task, obj = report["task"], report["objective"]
    con.print(f"[bold]{report['kind']} {escape(str(report['path']))}[/bold]")
    positive = f", positive class {task['positive']}" if task["positive"] else ""
    con.print(escape(f"task {task['name']} ({' / '.join(task['classes'])}{positive})"))
    con.print(escape(f"objective {obj['name']} ({'higher' if obj['direction'] == 'max' else 'lower'} is better): "
                     f"{obj['description']}"))
    status = report["status"]
    colour = {"finished": "green", "in progress": "yellow", "stopped": "red"}.get(status["state"], "cyan")
    con.print(f"status [{colour}]{status['state']}[/{colour}]: {escape(str(status['message']))}")
    search = report.get("search")
    if search:
        split = search.get("split") or {}
        con.print(f"search: {search.get('tuner')} tuner, at most {plural(search.get('epochs'), 'epoch')} "
                  f"(patience {search.get('patience')}), {search.get('image_size')} px, seed {search.get('seed')}; "
                  f"{split.get('fit', '?')} fit / {split.get('validation', '?')} validation samples"
                  + (f" in fold 1 of {search['folds']}, each trial scored by the mean over the folds"
                     if (search.get("folds") or 1) > 1 else "")
                  + f"; data {escape(str(search.get('data') or 'the built-in phantom'))}")
    con.print()


def _leaderboard(report: dict, con: Console) -> None:
    board = report["leaderboard"]
    if not board["rows"]:
        con.print("[yellow]no trial has finished yet[/yellow]\n")
        return
    obj = _score_label(report)
    folds = max((row.get("folds") or 1) for row in board["rows"])
    caption = "validation scores at each trial's best epoch; epochs = best/ran"
    if obj != report["objective"]["name"]:
        caption += f"; {obj}: at each trial's own best threshold"
    if folds > 1:
        caption += f"; scores are means over {folds} patient-grouped folds, sd their spread (n - 1)"
    t = _table(f"Leaderboard: {board['shown']} of {board['completed']} completed trials, best first", caption)
    auc = report["objective"]["name"] != "auc"  # the objective column already is the AUC
    for name, justify in (("#", "right"), ("trial", "left"), ("builder", "left"), (obj, "right"), ("sd", "right"),
                          ("AUC", "right"), ("epochs", "right"), ("seconds", "right"), ("status", "left")):
        if (name != "AUC" or auc) and (name != "sd" or folds > 1):
            t.add_column(name, justify=justify, no_wrap=name != "builder")
    failures = []
    for row in board["rows"]:
        status = "ok" if row["status"] == "COMPLETED" else str(row["status"]).lower()
        if row["status"] != "COMPLETED":
            failures.append(row)
            status = Text(f"{status} ({len(failures)})", style="red")
        epochs = f"{fmt(row['best_epoch'])}/{fmt(row['epochs'])}" if row["epochs"] else "-"
        t.add_row(fmt(row["rank"]), str(row["trial_id"]), str(row["builder"]), fmt(row["score"]),
                  *([fmt(row.get("fold_sd"))] if folds > 1 else []), *([fmt(row["auc"])] if auc else []),
                  epochs, fmt(row["seconds"], 0), status)
    con.print(t)
    for i, row in enumerate(failures, 1):
        con.print(escape(f"  ({i}) trial {row['trial_id']} ({row['builder']}): {row['error'] or 'no reason recorded'}"))
    if failures:
        con.print()
    _hyperparameter_tables(board["rows"], board["varying"], board["constant"], con,
                           lambda row: f"#{row['rank']}" if row["rank"] else f"t{row['trial_id']}")


def _score_label(report: dict) -> str:
    """The objective column's name: ``f2 (best t)`` when the search scored a thresholded
    objective at each trial's best threshold, as the leaderboard's scores then are."""
    obj = report["objective"]["name"]
    key = (report.get("leaderboard") or {}).get("score_key")
    return f"{obj} (best t)" if key and key != obj and key.endswith("_best") else obj


def _hyperparameter_tables(rows, varying, constant, con: Console, label, noun: str = "trial") -> None:
    """Hyperparameters that differ, one column per trial, split to fit the console width."""
    if not rows:
        return
    if varying:
        cells = {name: [fmt_hp(r["hyperparameters"].get(name)) for r in rows] for name in varying}
        headers = [label(r) for r in rows]
        name_width = max(len(n) for n in varying)
        widths = [max(len(headers[i]), *(len(cells[n][i]) for n in varying)) for i in range(len(rows))]
        # A column takes its width plus 3 for padding and the separator (SIMPLE_HEAD box).
        budget = max(20, con.width - name_width - 1)
        start = 0
        while start < len(rows):
            used, stop = 0, start
            while stop < len(rows) and (stop == start or used + widths[stop] + 3 <= budget):
                used += widths[stop] + 3
                stop += 1
            part = "" if start == 0 and stop == len(rows) else f" ({start + 1}-{stop} of {len(rows)})"
            t = _table(f"Hyperparameters that differ{part}")
            t.add_column("hyperparameter", no_wrap=True)
            for i in range(start, stop):
                t.add_column(headers[i], justify="right", no_wrap=True)
            for name in varying:
                t.add_row(name, *cells[name][start:stop])
            con.print(t)
            start = stop
    if constant:
        same = ", ".join(f"{k} {fmt_hp(v)}" for k, v in constant.items())
        con.print(f"[dim]same in every {noun}: {escape(same)}[/dim]\n")


def _best_per_builder(report: dict, con: Console) -> None:
    rows = report["best_per_builder"]
    if not rows:
        return
    obj = _score_label(report)
    t = _table("Best trial of each builder")
    auc = report["objective"]["name"] != "auc"
    for name, justify in (("builder", "left"), ("trials", "right"), ("failed", "right"), ("best trial", "left"),
                          (obj, "right"), ("AUC", "right")):
        if name != "AUC" or auc:
            t.add_column(name, justify=justify)
    for r in rows:
        t.add_row(r["builder"], str(r["trials"]), str(r["failed"]), fmt(r["best_trial"]), fmt(r["score"]),
                  *([fmt(r["auc"])] if auc else []))
    con.print(t)


def sparkline(values, width: int) -> str:
    """Values as one line of block characters (None as a space), at most ``width`` long."""
    if len(values) > width:
        # Keep the last value of each bucket: for a running best that is the bucket's best.
        step = len(values) / width
        values = [values[min(len(values) - 1, int((i + 1) * step) - 1)] for i in range(width)]
    known = [v for v in values if v is not None]
    if not known:
        return " " * len(values)
    lo, hi = min(known), max(known)
    span = hi - lo
    return "".join(" " if v is None else _SPARK[int(round((v - lo) / span * (len(_SPARK) - 1))) if span else 3]
                   for v in values)


def _progress(report: dict, con: Console) -> None:
    steps = report["progress"]
    if not steps:
        return
    obj = report["objective"]["name"]
    best = [s["best"] for s in steps]
    known = [b for b in best if b is not None]
    con.print(f"[bold]Progress[/bold]: best {obj} after each of {plural(len(steps), 'trial')}"
              + (f" ({fmt(min(known))} to {fmt(max(known))})" if known else ""))
    con.print("  " + sparkline(best, con.width - 4))
    marks, last = [], None
    for s in steps:
        if s["best"] is not None and s["best"] != last:
            marks.append(f"trial {s['n']} ({s['trial_id']}): {fmt(s['best'])}")
            last = s["best"]
    if marks:
        con.print(escape("  improved at " + "; ".join(marks)), overflow="fold")
    con.print()


def _ensemble(report: dict, con: Console) -> None:
    e, obj = report["ensemble"], report["objective"]["name"]
    t = _table(f"Members ({len(e['members'])}, stacking {e['features']})",
               f"{obj} of each member at threshold 0.5 on the stacking rows")
    for name, justify in (("#", "right"), ("member", "left"), ("builder", "left"), ("inputs", "left"), (obj, "right")):
        t.add_column(name, justify=justify)
    for i, m in enumerate(e["members"], 1):
        t.add_row(str(i), m["member"], m["builder"], m["inputs"], fmt(m["score"]))
    con.print(t)
    rows = [{**m, "rank": i} for i, m in enumerate(e["members"], 1)]
    _hyperparameter_tables(rows, e["member_hyperparameters_varying"], e["member_hyperparameters_constant"], con,
                           lambda row: f"#{row['rank']}", noun="member")
    meta = e["meta_learner"]
    score_name = (e.get("score") or {}).get("name", obj)
    t = _table(f"Meta-learner: {meta['name']}", f"{meta.get('selection') or ''}; cross-validated "
               f"{score_name} over {e.get('folds')} patient-grouped folds")
    # With --min-sensitivity the score is the specificity: one column for it.
    scores = [k for k in ("score", "sensitivity", "specificity") if k == "score" or k != score_name]
    for name in ("candidate", *[score_name if k == "score" else k for k in scores], "note"):
        t.add_column(name, justify="left" if name in ("candidate", "note") else "right")
    for c in meta["candidates"]:
        t.add_row(c["name"] + (" *" if c["name"] == meta["name"] else ""), *[fmt(c[k]) for k in scores],
                  c["error"] or "")
    con.print(t)
    best_member = e.get("best_member") or {}
    con.print(escape(f"ensemble {score_name} {fmt((e.get('score') or {}).get('value'))}, best single member "
                     f"{best_member.get('member', '-')} {fmt(best_member.get('score'))} (judged the same way)"))
    if e["threshold"] is not None:
        con.print(f"threshold [bold]{e['threshold']:.4f}[/bold] on "
                  + escape(f"p({report['task']['positive']}): {e['threshold_rule']}"))
    con.print()


def _evaluated(report: dict, con: Console) -> None:
    ev = report["evaluated"]
    counts = ", ".join(f"{n} {c}" for c, n in ev["n_per_class"].items())
    con.print("[bold]Evaluated[/bold]: " + escape(f"{ev['subject']} on {ev['n']} samples ({counts})"))
    con.print(f"[dim]{escape(str(ev['data']))}[/dim]")
    if ev["threshold"] is not None:
        con.print(escape(f"decision threshold {ev['threshold']:.4f}: {ev['threshold_label']}"))
    if ev.get("optimum") is not None:
        con.print(f"[dim]the {report['objective']['name']} optimum on these same predictions is at "
                  f"{ev['optimum']:.2f} (optimistic: chosen on the data it is scored on)[/dim]")
    con.print()


def _thresholds(report: dict, con: Console) -> None:
    sweep = report["thresholds"]
    grid = sweep["grid"]
    obj = sweep["objective"]
    t = _table(f"{obj if sweep['thresholded'] else 'Decisions'} across thresholds on p({sweep['positive']})",
               None if sweep["thresholded"] else f"{obj} does not depend on the threshold")
    t.add_column("threshold", justify="right")
    if sweep["thresholded"]:
        t.add_column(obj, justify="right")
    for name in ("sensitivity", "specificity", "PPV"):
        t.add_column(name, justify="right")
    t.add_column("")
    rows = {}
    for i, th in enumerate(grid):
        if any(abs(th - s) < 1e-9 for s in _SHOWN_THRESHOLDS):
            rows[th] = ([sweep["objective_values"][i]] if sweep["thresholded"] else []) + \
                       [sweep["sensitivity"][i], sweep["specificity"][i], sweep["ppv"][i]], ""
    for name, at in sweep["at"].items():
        cells = ([at["objective"]] if sweep["thresholded"] else []) + [at["sensitivity"], at["specificity"], at["ppv"]]
        key = round(at["threshold"], 6)
        note = "chosen" if name == "chosen" else "optimum (optimistic)"
        previous = rows.get(key, (None, ""))[1]
        rows[key] = cells, f"{previous}, {note}" if previous else note
    for th in sorted(rows):
        cells, note = rows[th]
        style = "bold" if note else None
        on_grid = abs(th * 100 - round(th * 100)) < 1e-6
        t.add_row(f"{th:.2f}" if on_grid else f"{th:.4f}", *[fmt(v) for v in cells], note, style=style)
    con.print(t)


def _metrics_title(report: dict) -> str:
    if report["kind"] == "bundle":
        return "Validation metrics of the ensemble (out-of-fold, cross-validated threshold)"
    return f"Validation metrics of {report.get('evaluated', {}).get('subject', 'the best trial')}"


def metrics_table(metrics: dict, title: str) -> Table:
    """Value, 95% interval and n of every metric of a ``clinical_metrics`` report."""
    b = metrics["bootstrap"]
    patients = f" of {metrics['n_patients']} patients" if metrics.get("n_patients") else ""
    t = _table(title, f"{metrics['n']} samples{patients}; n = denominator; 95% CI: percentile bootstrap "
                      f"over {b['unit']}s, {b['replicates']} replicates")
    for name, justify in (("metric", "left"), ("value", "right"), ("95% CI", "right"), ("n", "right")):
        t.add_column(name, justify=justify)
    order = {name: i for i, name in enumerate(_ORDER)}
    for name, m in sorted(metrics["metrics"].items(), key=lambda kv: order.get(kv[0].split(" ")[0], len(order))):
        value, ci = format_metric(m, integer=" called " in name)
        t.add_row(name, value, ci, str(m["n"]))
    return t


def confusion_table(cm: dict, width: int = 80) -> Table:
    """Counts with true classes as rows, decisions as columns, and each row's recall.

    When the class names side by side would not fit ``width``, columns are numbered as
    the rows are, instead of wrapping names inside the header.
    """
    classes = cm["classes"]
    numbered = len("true \\ decided") + sum(len(c) + 3 for c in classes) + 10 > width
    caption = "rows: true class; columns: the model's decision"
    t = _table("Confusion matrix", caption + (", numbered as the rows" if numbered else ""))
    t.add_column("true \\ decided")
    for i, c in enumerate(classes, 1):
        t.add_column(str(i) if numbered else c, justify="right")
    t.add_column("recall", justify="right")
    for i, (c, row) in enumerate(zip(classes, cm["counts"])):
        total = sum(row)
        t.add_row(f"{i + 1} {c}" if numbered else c, *[str(v) for v in row], fmt(row[i] / total) if total else "-")
    return t


def _tensorboard(report: dict, con: Console) -> None:
    tb = report["tensorboard"]
    if tb["trials_with_logs"]:
        con.print(f"[bold]TensorBoard[/bold]: {len(tb['trials_with_logs'])} trials logged "
                  "(per-epoch curves and the HPARAMS table):")
        # Soft-wrapped so that a long path stays one line to copy.
        con.print(escape(f"  {tb['command']}"), soft_wrap=True)
    elif not tb["enabled"]:
        con.print("[dim]TensorBoard: this run was searched with --no-tensorboard[/dim]")
    else:
        con.print(f"[dim]TensorBoard: no logs in {escape(str(tb['logdir']))} yet[/dim]")


def render_plots(plots: dict, con: Console) -> None:
    """The list of PNGs written by ``automammo.plots.write_plots`` and those skipped."""
    for p in plots["written"]:
        con.print("[green]wrote[/green] " + escape(f"{p['file']}: {p['title']}"))
    for p in plots["skipped"]:
        skipped = f"skipped {p['plot']}: {p['reason']}"
        con.print(f"[dim]{escape(skipped)}[/dim]")


# -- validation ----------------------------------------------------------------------------------


def render_validation(result: dict, con: Console) -> None:
    """Print a validation (``automammo.validate.validate``): mean +- sd of every objective."""
    d = result["design"]
    con.print(f"[bold]{result['kind']} {escape(str(result['path']))}[/bold]: task {result['task']['name']}, "
              f"objective {result['objective']['name']}")
    con.print(escape(d["description"]))
    con.print(f"[dim]{escape(d['note'])}[/dim]\n")
    for model in result["models"]:
        _validation_model(model, result["objective"]["name"], con)
    for w in result.get("warnings", []):
        con.print(f"[yellow]note[/yellow]: {escape(w)}")


def _validation_model(model: dict, objective: str, con: Console) -> None:
    units = model["units"]
    t = _table(f"{model['label']} ({model['builder']}): {plural(len(units), 'training')} of at most "
               f"{plural(model['max_epochs'], 'epoch')}, patience {model['patience']}",
               "mean +- sample sd (n - 1) over the trainings; search = the trial's own recorded score")
    for name, justify in (("objective", "left"), ("mean +- sd", "right"), ("min", "right"), ("max", "right"),
                          ("search", "right")):
        t.add_column(name, justify=justify, no_wrap=True)
    for name, s in model["summary"].items():
        sd = "" if s["sd"] is None else f" +- {s['sd']:.3f}"
        mean = "-" if s["mean"] is None else f"{s['mean']:.3f}{sd}"
        t.add_row(name, mean, fmt(s["min"]), fmt(s["max"]), fmt(model["recorded"].get(name)),
                  style="bold" if name == objective else None)
    con.print(t)
    u = _table("Each training", "epochs = best/ran; fit and held out = samples")
    auc = objective != "auc"  # else the objective column already is the AUC
    for name in ("repeat", "fold", "seed", "fit", "held out", "epochs", objective, *(["auc"] if auc else []),
                 "seconds"):
        u.add_column(name, justify="right", no_wrap=True)
    for unit in units:
        s = unit["scores"]
        u.add_row(str(unit["repeat"]), fmt(unit["fold"]), str(unit["seed"]), str(unit["n_fit"]),
                  str(unit["n_validation"]), f"{unit['best_epoch']}/{unit['epochs']}", fmt(s.get(objective)),
                  *([fmt(s.get("auc"))] if auc else []), fmt(unit["seconds"], 0))
    con.print(u)
