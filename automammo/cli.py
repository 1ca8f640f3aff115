"""The ``automammo`` command line. Library errors become one line and exit code 2 here."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource

# TensorFlow's C++ chatter (CUDA probing, oneDNN notes, graph-attribute notices) and its
# Python retracing warnings are noise to a CLI user; --debug or AUTOMAMMO_DEBUG keeps them.
if not os.environ.get("AUTOMAMMO_DEBUG") and "--debug" not in sys.argv:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # The start-up lines printed before TensorFlow reads that variable.
    from automammo import _quiet

    _quiet.install()

from automammo import __version__
from automammo.errors import AutomammoError


class UserError(click.ClickException):
    """A one-line error the user can fix: exit code 2, like click's usage errors."""

    exit_code = 2


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AutomammoError as exc:
            if _debug(ctx):
                # The traceback too, and the same exit code: scripts see a bad input the same way.
                import traceback

                traceback.print_exc()
            raise UserError(str(exc)) from None


def _debug(ctx) -> bool:
    root = ctx.find_root()
    return bool((root.obj or {}).get("debug")) or bool(os.environ.get("AUTOMAMMO_DEBUG"))


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _quiet_failed_trials() -> None:
    """Keras Tuner prints the whole traceback of every failed trial; the CLI shows one line
    per failed trial and ``trials.jsonl`` keeps the traceback, so it is printed only with
    ``--debug``."""
    if _debug(click.get_current_context()):
        return
    try:
        from keras_tuner.src import config as tuner_config
    except ImportError:  # a Keras Tuner that moved its flag: its tracebacks show, nothing breaks
        return
    tuner_config.DEBUG = False


def esc(value) -> str:
    """``value`` as text for a rich console: names, paths and messages from data files, runs
    and plugins are shown as they are, never read as markup ("[a,b]" would vanish and
    "[/x]" would raise)."""
    from rich.markup import escape

    return escape(str(value))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="automammo")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx, debug):
    """AutoML for mammography patches: search, stack, tune the threshold, export a bundle."""
    ctx.obj = {"debug": debug}


# -- plugins ---------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def plugins(as_json):
    """List every builder, objective, meta-learner and importer, and where it comes from."""
    from automammo import registry

    tables = {kind: registry.registered(kind) for kind in registry.KINDS}
    failures = registry.load_failures()
    if as_json:
        out = {kind: [{"name": r.name, "package": r.package, "module": r.module,
                       "description": r.description} for r in table.values()]
               for kind, table in tables.items()}
        out["failures"] = [f.__dict__ for f in failures]
        click.echo(json.dumps(out, indent=2))
        return
    from rich.table import Table

    con = console()
    for kind, table in tables.items():
        t = Table(title=f"{kind}s ({len(table)})", title_justify="left", expand=False)
        t.add_column("name", style="bold", no_wrap=True)
        t.add_column("package", no_wrap=True)
        t.add_column("description")
        for r in sorted(table.values(), key=lambda r: r.name):
            t.add_row(esc(r.name), esc(r.package), esc(r.description))
        con.print(t)
    for f in failures:
        console(stderr=True).print(f"[red]plugin failed to load[/red]: {esc(f'{f.package} ({f.where}): {f.error}')}")


# -- data ----------------------------------------------------------------------------------


class _DataGroup(_Group):
    """``automammo data``: ``info`` plus one subcommand per registered importer."""

    def _importer_commands(self):
        from automammo import registry

        return {name: imp.command for name, imp in registry.importers().items()}

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self._importer_commands()})

    def get_command(self, ctx, name):
        return super().get_command(ctx, name) or self._importer_commands().get(name)


@cli.group(cls=_DataGroup)
def data():
    """Make, import and inspect datasets (dataset.npz)."""


@data.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--sheet", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a contact sheet PNG: example lesions beside their baselines, per class.")
@click.option("--per-class", type=click.IntRange(1, 20), default=6, show_default=True,
              help="Examples per class on the sheet.")
def info(path, sheet, per_class):
    """Counts per split x class, per task, patients, pixel statistics of PATH."""
    import numpy as np
    from rich.table import Table

    from automammo.dataset import LABEL_NAMES, load
    from automammo.tasks import TASKS

    ds = load(path)
    con = console()
    con.print(f"[bold]{esc(path)}[/bold]: {len(ds)} patches of {ds.image_shape[0]}x{ds.image_shape[1]} px, "
              f"{ds.x.dtype}, values {int(ds.x.min())}-{int(ds.x.max())}; "
              f"{int(np.sum(ds.pair >= 0) // 2)} lesion/baseline pairs; fingerprint {ds.fingerprint()[:12]}")
    splits = [s for s in ("train", "test") if np.any(ds.split == s)]
    t = Table(title="labels", title_justify="left")
    t.add_column("label")
    for s in splits:
        t.add_column(s, justify="right")
    for i, name in enumerate(LABEL_NAMES):
        t.add_row(f"{i} {name}", *[str(int(np.sum((ds.label == i) & (ds.split == s)))) for s in splits])
    t.add_row("patients", *[str(len(np.unique(ds.patient[ds.split == s]))) for s in splits], style="dim")
    con.print(t)
    t = Table(title="tasks", title_justify="left")
    t.add_column("task")
    t.add_column("class")
    for s in splits:
        t.add_column(s, justify="right")
    for task in TASKS.values():
        y = task.targets(ds.label)
        for c, cname in enumerate(task.classes):
            t.add_row(task.name if c == 0 else "", cname,
                      *[str(int(np.sum((y == c) & (ds.split == s)))) for s in splits])
    con.print(t)
    t = Table(title="pixels", title_justify="left")
    for col in ("label", "mean", "sd", "p2", "p98", "max"):
        t.add_column(col, justify="right" if col != "label" else "left")
    for i, name in enumerate(LABEL_NAMES):
        sel = ds.x[ds.label == i]
        if len(sel):
            sample = sel[:: max(1, len(sel) // 200)].astype(np.float64)
            p2, p98 = np.percentile(sample, (2, 98))
            t.add_row(f"{i} {name}", f"{sample.mean():.1f}", f"{sample.std():.1f}", f"{p2:.0f}", f"{p98:.0f}",
                      f"{int(sel.max())}")
    con.print(t)
    if ds.meta:
        con.print("metadata: " + esc(", ".join(f"{k} ({v.dtype})" for k, v in sorted(ds.meta.items()))))
    if sheet is not None:
        from automammo.sheet import contact_sheet

        contact_sheet(ds, sheet, per_class=per_class)
        con.print(f"contact sheet: {esc(sheet)}")


# -- search ----------------------------------------------------------------------------------


class RichReporter:
    """Live progress of a search: trial i/N, epoch, best so far, elapsed."""

    def __init__(self, con):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.con = con
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=con, transient=False)
        self.trials_task = self.epoch_task = None
        self.best = None
        self.objective = ""

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def search_begin(self, run_dir, total, config, done):
        self.objective = config.objective
        self.con.print(f"run [bold]{esc(run_dir)}[/bold]: task {config.task}, objective {config.objective}, "
                       f"tuner {config.tuner}, "
                       f"{total or (config.trials if config.tuner != 'hyperband' else 'hyperband')} trials "
                       f"x <= {config.epochs} epochs"
                       + (f" ({done} already done)" if done else ""))
        self.trials_task = self.progress.add_task("trials", total=total, completed=done)
        self.epoch_task = self.progress.add_task("epochs", total=config.epochs)

    def message(self, text):
        # Soft-wrapped: a terminal wraps it for the eye, a log file keeps a URL whole.
        self.con.print(f"[dim]{esc(text)}[/dim]", soft_wrap=True)

    def trial_begin(self, trial_id, builder, hp):
        self.progress.reset(self.epoch_task, description=esc(f"trial {trial_id} {builder}"))

    def epoch_end(self, epoch, epochs, logs):
        key = f"val_{self.objective}_best" if f"val_{self.objective}_best" in logs else f"val_{self.objective}"
        value = logs.get(key)
        shown = f" {key} {value:.3f}" if isinstance(value, float) else ""
        self.progress.update(self.epoch_task, completed=epoch, total=epochs,
                             description=f"{self.progress.tasks[self.epoch_task].description.split(' |')[0]} |{shown}")

    def trial_end(self, record, best):
        self.progress.advance(self.trials_task)
        if record["status"] == "COMPLETED":
            score = record.get("score")
            label = record.get("score_key", self.objective).replace("_best", " (best threshold)")
            msg = esc(f"trial {record['trial_id']} {record['builder']}: {label} "
                      f"{score:.4f} in {record['epochs']} epochs, {record['seconds']:.0f} s" if score is not None
                      else f"trial {record['trial_id']} {record['builder']}: no score")
        else:
            failed = f"trial {record['trial_id']} {record['builder']} failed"
            msg = f"[red]{esc(failed)}[/red]: {esc(record.get('error'))}"
        self.con.print(msg)
        if best is not None:
            self.progress.update(self.trials_task, description=f"trials (best {self.objective} {best['score']:.4f})")

    def search_end(self, result):
        pass


@cli.command()
@click.option("--data", "data_path", type=click.Path(dir_okay=False, path_type=Path),
              help="dataset.npz (default: the built-in digital phantom, generated once and cached).")
@click.option("--task", default="benign-malignant", show_default=True, help="Question to answer (see `automammo data info`).")
@click.option("--objective", default="auc", show_default=True, help="Objective to optimise (see `automammo plugins`).")
@click.option("--builder", "builders", multiple=True, help="Model family to search (repeatable; default: every one that fits).")
@click.option("--tuner", type=click.Choice(["random", "bayesian", "hyperband"]), default="random", show_default=True)
@click.option("--trials", type=click.IntRange(1), default=None, help="Trials to run [default: 10].")
@click.option("--epochs", type=click.IntRange(1), default=20, show_default=True, help="Maximum epochs per trial.")
@click.option("--patience", type=click.IntRange(0), default=4, show_default=True, help="Early-stopping patience in epochs.")
@click.option("--image-size", type=click.IntRange(8, 1024), default=None, help="Model input side in px [default: the data's].")
@click.option("--val-fraction", type=click.FloatRange(0.05, 0.5), default=0.2, show_default=True)
@click.option("--folds", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Score each trial by the mean over K patient-grouped folds of train (1: one split).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--contrast-stretch/--no-contrast-stretch", default=False, show_default=True,
              help="Stretch each patch's 2nd-98th percentile to the full range.")
@click.option("--symmetries/--no-symmetries", default=True, show_default=True,
              help="Augment with the 8 exact symmetries (rot90 x flip).")
@click.option("--rotation", type=click.FloatRange(0, 180), default=0.0, help="Free rotation range, degrees.")
@click.option("--shift", type=click.FloatRange(0, 0.5), default=0.0, help="Shift range, fraction of the side.")
@click.option("--zoom", type=click.FloatRange(0, 0.5), default=0.0, help="Zoom range, fraction.")
@click.option("--weights", default="imagenet", show_default=True, help="Pretrained weights: imagenet, none or a file.")
@click.option("--weights-dir", envvar="AUTOMAMMO_WEIGHTS_DIR", type=click.Path(file_okay=False),
              help="Directory of Keras weight files [env AUTOMAMMO_WEIGHTS_DIR].")
@click.option("--keep-models", type=click.IntRange(1), default=10, show_default=True, help="Keep the models of the best K trials.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run directory [default: runs/TASK-OBJECTIVE-TIME].")
@click.option("--resume", is_flag=True, help="Continue the search in --run where it stopped.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--tensorboard/--no-tensorboard", default=True, show_default=True, help="Log each trial for TensorBoard.")
@click.option("--ensemble/--no-ensemble", default=True, show_default=True,
              help="Stack the best trials, tune the threshold and export a bundle at the end.")
@click.option("--top", type=click.IntRange(1), default=5, show_default=True, help="Ensemble members: the best K trials.")
@click.option("--meta", default=None, help="Meta-learner [default: the best by cross-validation].")
@click.option("--min-sensitivity", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Binary tasks: threshold with the highest specificity at this sensitivity or more.")
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True,
              help="Worker processes on this machine, sharing its cores and GPUs (0: train here).")
@click.option("--listen", metavar="HOST:PORT", help="Serve the search to workers on other machines, e.g. 0.0.0.0:8470.")
@click.option("--strategy", type=click.Choice(["default", "mirrored"]), default="default", show_default=True,
              help="mirrored: tf.distribute over every local GPU.")
@click.option("--precision", type=click.Choice(["float32", "mixed"]), default="float32", show_default=True,
              help="mixed: mixed_float16 with a float32 output layer.")
def search(data_path, task, objective, builders, tuner, trials, epochs, patience, image_size, val_fraction,
           folds, seed, contrast_stretch, symmetries, rotation, shift, zoom, weights, weights_dir, keep_models,
           run_dir, resume, overwrite, tensorboard, ensemble, top, meta, min_sensitivity, workers, listen,
           strategy, precision):
    """Search model families and hyperparameters for TASK, scored by OBJECTIVE."""
    from automammo.search import SearchConfig, run_search

    if resume and run_dir is None:
        raise UserError("--resume needs --run DIR (the run to continue)")
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other")
    config = SearchConfig(
        task=task, objective=objective, data=str(data_path) if data_path else None, builders=list(builders),
        tuner=tuner, trials=trials or 10, epochs=epochs, patience=patience, image_size=image_size,
        seed=seed, val_fraction=val_fraction, folds=folds, contrast_stretch=contrast_stretch,
        augmentation={"symmetries": symmetries, "rotation": rotation, "shift": shift, "zoom": zoom},
        weights=weights, weights_dir=weights_dir, keep_models=keep_models, tensorboard=tensorboard,
        ensemble=ensemble, workers=workers, listen=listen, strategy=strategy, precision=precision,
    )
    if resume:
        stored = _resumed_settings(run_dir, config)
        if stored is not None:
            config.trials, task = trials or stored.trials, stored.task
            if click.get_current_context().get_parameter_source("ensemble") != ParameterSource.COMMANDLINE:
                ensemble = stored.ensemble  # --no-ensemble at the start holds for the resume
    _check_ensemble_options(task, meta, min_sensitivity)
    _quiet_failed_trials()
    if run_dir is None:
        run_dir = Path("runs") / f"{task}-{objective}-{time.strftime('%Y%m%d-%H%M%S')}"
    con = console()
    started = time.time()
    try:
        with RichReporter(con) as reporter:
            result = run_search(config, run_dir, resume=resume, overwrite=overwrite, reporter=reporter)
    except KeyboardInterrupt:
        con.print(f"\n[yellow]interrupted[/yellow]: finished trials are kept; continue with\n"
                  f"  automammo search --run {esc(run_dir)} --resume")
        sys.exit(130)
    if result.stopped:
        con.print(f"[red]{esc(result.stopped)}[/red]")
    best = result.best
    done = sum(t["status"] == "COMPLETED" for t in result.trials)
    con.print(f"{done}/{len(result.trials)} trials completed in {time.time() - started:.0f} s")
    if best:
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in sorted(best["metrics"].items())
                            if v is not None and not k.endswith("_threshold") and not k.endswith("_best"))
        label = best.get("score_key", best["objective"]).replace("_best", " at its best threshold")
        con.print("[bold green]best[/bold green] " + esc(f"trial {best['trial_id']} ({best['builder']}): "
                                                        f"{label} {best['score']:.4f} on validation; at 0.5: {metrics}"))
        con.print(f"model: {esc(Path(result.run_dir) / 'best.keras')}")
    if ensemble and best:
        from automammo.ensemble import ensemble_and_export

        out = Path(result.run_dir).with_name(Path(result.run_dir).name + ".ammo")
        try:
            made = ensemble_and_export([result.run_dir], out, meta=meta, top=top, min_sensitivity=min_sensitivity,
                                       seed=seed, reporter=_EnsembleMessages(con))
        except AutomammoError as exc:
            # The search itself succeeded; its run stays usable with `automammo ensemble`.
            con.print(f"[yellow]no bundle[/yellow]: {esc(exc)}")
            sys.exit(1 if result.stopped else 0)
        threshold = "" if made.threshold is None else f", threshold {made.threshold:.3f}"
        con.print("[bold green]bundle[/bold green] "
                  + esc(f"{made.bundle}: {len(made.manifest['members'])} members, meta-learner {made.meta}{threshold}; "
                        f"cross-validated {made.manifest['validation']['score']['name']} {_fmt(made.score)} "
                        f"(best single member {_fmt(made.best_member.get('score'))})"))
        from automammo.runs import Run

        data_used = Run(result.run_dir).config().get("data", "DATA")
        con.print(esc(f"next: automammo report {result.run_dir}\n      automammo evaluate {made.bundle} --data {data_used}"))
    if result.stopped:
        sys.exit(1)


# Options a resumed run keeps from its start: SearchConfig fields of the same name, the
# augmentation ones inside its augmentation dict.
_KEPT_ON_RESUME = ("task", "objective", "builders", "tuner", "epochs", "patience", "image_size", "val_fraction",
                   "folds", "seed", "contrast_stretch", "weights", "weights_dir", "keep_models", "tensorboard",
                   "strategy", "precision")
_AUGMENTATION = ("symmetries", "rotation", "shift", "zoom")


def _resumed_settings(run_dir: Path, given):
    """The stored settings of the run to resume (None if there is none to resume), after
    refusing any option typed on the command line that would differ from them: a resumed
    run keeps its settings, and silently ignoring ``--task diagnosis`` would mislead."""
    from automammo.runs import Run
    from automammo.search import SearchConfig

    run = Run(run_dir)
    if not run.exists():
        return None
    stored = SearchConfig.from_dict(run.config().get("search", {}))
    ctx = click.get_current_context()
    changed = []
    for param in (*_KEPT_ON_RESUME, *_AUGMENTATION):
        if ctx.get_parameter_source(param) != ParameterSource.COMMANDLINE:
            continue
        if param in _AUGMENTATION:
            mine, theirs = given.augmentation[param], stored.augmentation.get(param)
        else:
            mine, theirs = getattr(given, param), getattr(stored, param)
        if mine != theirs:
            option = "--builder" if param == "builders" else "--" + param.replace("_", "-")
            changed.append(f"{option} {_setting(mine)} (the run's: {_setting(theirs)})")
    if changed:
        raise UserError(f"{run.path}: a resumed run keeps its settings; {'; '.join(changed)}. "
                        "Start a new run for other settings (--trials may grow, --data may point to moved data)")
    return stored


def _setting(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(value) or "every one that fits"
    return "default" if value is None else str(value)


def _check_ensemble_options(task_name: str, meta: str | None, min_sensitivity: float | None) -> None:
    """Options of the ensemble stage, checked before the search rather than after it."""
    from automammo import registry
    from automammo.tasks import get_task

    if meta is not None:
        registry.get("meta-learner", meta)
    task = get_task(task_name)
    if min_sensitivity is not None and not task.binary:
        raise UserError(f"--min-sensitivity applies to binary tasks; task {task.name} has {task.n_classes} classes")


@cli.command()
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--chief", metavar="HOST:PORT", help="The chief's address [default: from RUN/workers/chief.json].")
@click.option("--tuner-id", help="Unique in the search [default: tuner-HOST-PID].")
@click.option("--threads", type=click.IntRange(1), help="TensorFlow threads of this worker.")
@click.option("--max-trials", type=click.IntRange(1), help="Leave after N trials with exit code 75.")
def worker(run_dir, chief, tuner_id, threads, max_trials):
    """Join a distributed search: train the trials its chief hands out until none is left."""
    from automammo import distributed

    _quiet_failed_trials()
    con = console()
    with RichReporter(con) as reporter:
        records = distributed.work(chief, run_dir, tuner_id=tuner_id, threads=threads,
                                   reporter=reporter, max_trials=max_trials)
    if max_trials and len(records) >= max_trials:
        sys.exit(distributed.RECYCLE_EXIT)
    con.print(f"this worker ran {len(records)} trials; the search is over")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class _EnsembleMessages:
    """Progress messages of the ensemble stage, dimmed."""

    def __init__(self, con):
        self.con = con

    def message(self, text):
        self.con.print(f"[dim]{esc(text)}[/dim]")


def _mount_commands():
    # Commands that live in their own modules, to keep this one readable.
    import importlib

    for name in ("automammo.cli_bundle", "automammo.cli_report"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        for command in module.COMMANDS:
            cli.add_command(command)


def main(argv=None):
    """Console-script entry point."""
    return cli.main(args=argv, prog_name="automammo")


_mount_commands()
