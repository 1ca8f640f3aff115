"""`automammo report`: finished, failed and in-progress runs, bundles, JSON, plots, TensorBoard."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from _fixtures_report import logged_bundle, logged_run
from automammo.cli import cli
from automammo.plots import PLOTS, write_plots
from automammo.render import render_report
from automammo.report import collect, open_source
from automammo.runs import Run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir():
    return logged_run()[0]


@pytest.fixture(scope="module")
def bundle():
    return logged_bundle()


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def rendered(report: dict, width: int = 80) -> str:
    buffer = io.StringIO()
    render_report(report, Console(file=buffer, width=width, color_system=None, highlight=False))
    return buffer.getvalue()


def assert_fits(text: str, width: int = 80):
    # The TensorBoard command is printed unbroken on purpose, so that it can be copied;
    # a terminal wraps it visually.
    long = [line for line in text.splitlines() if len(line) > width and not line.startswith("  tensorboard --logdir")]
    assert not long, f"lines wider than {width} columns: {long[:3]}"


def copy_run(run_dir, tmp_path, name="copy"):
    # The tuner's checkpoints are not read by a report; leaving them out keeps the copy small.
    out = tmp_path / name
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("tuner"))
    return out


def test_finished_run_report_ranks_trials_and_names_what_differs(run_dir):
    run = Run(run_dir)
    trials = run.trials()
    report = collect(open_source(run_dir))

    assert report["status"]["state"] == "finished" and report["status"]["recorded"] == 3
    rows = report["leaderboard"]["rows"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)  # f2: higher is better
    by_id = {t["trial_id"]: t for t in trials}
    for r in rows:
        assert r["auc"] == by_id[r["trial_id"]]["metrics"]["auc"]
        assert r["epochs"] == by_id[r["trial_id"]]["epochs"] and r["status"] == "COMPLETED"
    # "differ" means: not the same value in every trial.
    names = {k for t in trials for k in t["hyperparameters"]}
    differ = {k for k in names if len({json.dumps(t["hyperparameters"].get(k)) for t in trials}) > 1}
    assert set(report["leaderboard"]["varying"]) == differ
    assert set(report["leaderboard"]["constant"]) == names - differ
    for r in rows:
        assert set(r["hyperparameters"]) <= differ

    best = max(trials, key=lambda t: t["score"])
    assert report["best_per_builder"] == [{"builder": "scratch_cnn", "trials": 3, "completed": 3, "failed": 0,
                                           "best_trial": rows[0]["trial_id"], "score": best["score"],
                                           "auc": rows[0]["auc"]}]
    assert [p["best"] for p in report["progress"]] == list(np.maximum.accumulate([t["score"] for t in trials]))

    preds = run.load_preds(rows[0]["trial_id"])
    assert report["evaluated"]["n"] == len(preds["index"]) == report["metrics"]["n"]
    assert report["metrics"]["n_patients"] > 1 and report["metrics"]["bootstrap"]["unit"] == "patient"
    assert np.sum(report["confusion_matrix"]["counts"]) == len(preds["index"])
    for name in ("auc", "f2", "sensitivity", "specificity"):
        m = report["metrics"]["metrics"][name]
        assert m["n"] > 0 and (m["low"] is None or m["low"] <= m["value"] <= m["high"])
    assert report["thresholds"]["at"]["chosen"]["threshold"] == 0.5
    assert len(report["thresholds"]["grid"]) == len(report["thresholds"]["sensitivity"]) == 99
    # The search scored f2 at each trial's own best threshold: the report says so, and
    # names that threshold, instead of calling 0.5 the threshold trials were scored at.
    assert {t["score_key"] for t in trials} == {"f2_best"} and report["leaderboard"]["score_key"] == "f2_best"
    optimum = by_id[rows[0]["trial_id"]]["metrics"]["f2_threshold"]
    assert report["evaluated"]["optimum"] == optimum
    assert f"scored f2 at the trial's best threshold, {optimum:.2f}" in report["evaluated"]["threshold_label"]

    text = rendered(report)
    assert_fits(text)
    for needle in ("Leaderboard", "Hyperparameters that differ", "Best trial of each builder", "Progress",
                   "across thresholds", "Confusion matrix", "95% CI", "finished", "tensorboard --logdir"):
        assert needle in text, needle


def test_json_round_trips_and_respects_top(run_dir):
    result = invoke("report", run_dir, "--json", "--top", "2")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == collect(open_source(run_dir), top=2)
    assert printed["leaderboard"]["shown"] == 2 and len(printed["leaderboard"]["rows"]) == 2


def test_failed_trials_are_listed_with_their_reason(run_dir, tmp_path):
    copy = copy_run(run_dir, tmp_path)
    failed = {"trial_id": "9", "status": "FAILED", "builder": "scratch_cnn", "objective": "f2", "direction": "max",
              "hyperparameters": {"conv_blocks": 9}, "score": None, "metrics": {}, "epochs": 0, "best_epoch": None,
              "history": {}, "seconds": 0.4, "model": None,
              "error": "ValueError: conv_blocks=9 leaves no pixel to pool [b,h,w] [/2]",
              "traceback": "Traceback...\nValueError: conv_blocks=9 leaves no pixel to pool"}
    with open(copy / "trials.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(failed) + "\n")

    report = collect(open_source(copy))
    assert report["status"]["failed"] == 1 and report["status"]["completed"] == 3
    last = report["leaderboard"]["rows"][-1]
    assert last["rank"] is None and last["status"] == "FAILED" and "no pixel to pool" in last["error"]
    assert "conv_blocks" in report["leaderboard"]["varying"]
    assert report["best_per_builder"][0]["failed"] == 1 and report["best_per_builder"][0]["trials"] == 4
    assert report["progress"][-1]["score"] is None and report["progress"][-1]["best"] == report["progress"][-2]["best"]
    text = rendered(report)
    assert_fits(text)
    assert "failed (1)" in text and "trial 9 (scratch_cnn): ValueError: conv_blocks=9 leaves no pixel" in text
    # Shown as recorded: brackets in a message are not rich markup ("[/2]" would raise).
    assert "[b,h,w] [/2]" in text
    assert "f2 (best t)" in text and "f2 (best t): at each trial's own best threshold" in " ".join(text.split())


def test_a_run_in_progress_says_so(run_dir, tmp_path):
    copy = copy_run(run_dir, tmp_path)
    first = (copy / "trials.jsonl").read_text().splitlines()[0]
    (copy / "trials.jsonl").write_text(first + "\n")
    (copy / "best.keras").unlink()

    report = collect(open_source(copy))
    status = report["status"]
    assert status["state"] == "in progress" and status["recorded"] == 1 and status["planned"] == 3
    assert not status["best_model"] and "1 of 3 trials" in status["message"]
    assert len(report["leaderboard"]["rows"]) == 1 and report["leaderboard"]["varying"] == []
    text = rendered(report)
    assert_fits(text)
    assert "in progress" in text and "--resume" in text


def test_bundle_report_shows_members_meta_learner_threshold_and_metrics(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    report = collect(open_source(bundle))
    ens = report["ensemble"]
    assert report["kind"] == "bundle" and not report["warnings"]
    assert [m["trial_id"] for m in ens["members"]] == [m["trial_id"] for m in manifest["members"]]
    assert ens["meta_learner"]["name"] == "logistic" and ens["threshold"] == manifest["threshold"]
    # The recomputed out-of-fold decisions are the ones the manifest's metrics came from.
    assert report["evaluated"]["reproduced"] is True
    assert report["confusion_matrix"] == manifest["validation"]["confusion_matrix"]
    assert report["metrics"]["metrics"] == manifest["validation"]["metrics"]
    assert report["thresholds"]["at"]["chosen"]["threshold"] == manifest["threshold"]

    result = invoke("report", bundle, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == report
    text = rendered(report)
    assert_fits(text)
    for needle in ("Members", "Meta-learner: logistic", "threshold", "Confusion matrix", "95% CI", "out-of-fold"):
        assert needle in text, needle


def test_stored_out_of_fold_predictions_are_what_the_runs_give_again(bundle):
    from automammo.bundle import read_manifest, read_oof
    from automammo.report import _recompute_ensemble_predictions, locate_run

    manifest = read_manifest(bundle)
    stored = read_oof(bundle, manifest)
    source = open_source(bundle)
    runs = [locate_run(r, bundle) for r in manifest["data"]["runs"]]
    again = _recompute_ensemble_predictions(source, runs)
    np.testing.assert_array_equal(stored["rows"], again.rows)
    np.testing.assert_array_equal(stored["y_true"], again.y_true)
    np.testing.assert_array_equal(stored["decisions"], again.decisions)
    np.testing.assert_allclose(stored["y_prob"], again.y_prob, rtol=0, atol=1e-9)
    assert list(stored["groups"]) == [str(g) for g in again.groups]


def test_a_bundle_alone_is_enough_for_its_report(bundle, tmp_path):
    """Runs and dataset gone: the curves still come from the bundle's own out-of-fold file."""
    alone = tmp_path / "elsewhere" / "alone.ammo"
    shutil.copytree(bundle, alone)
    manifest = json.loads((alone / "manifest.json").read_text())
    manifest["data"]["source"] = str(tmp_path / "gone.npz")
    manifest["data"]["runs"] = [str(tmp_path / "gone-run") for _ in manifest["data"]["runs"]]
    for member in manifest["members"]:
        member["run"] = str(tmp_path / "gone-run")
    (alone / "manifest.json").write_text(json.dumps(manifest))
    source = open_source(alone)
    report = collect(source)
    assert any("dataset unavailable" in w for w in report["warnings"])
    assert source.preds is not None and report["evaluated"]["reproduced"] is True
    assert report["confusion_matrix"] == json.loads((bundle / "manifest.json").read_text())["validation"]["confusion_matrix"]
    assert not any("out-of-fold" in w for w in report["warnings"])
    plots = write_plots(source, tmp_path / "plots")
    # Only what needs the runs' trials or the dataset's images is skipped.
    assert {s["plot"] for s in plots["skipped"]} == {"objective_by_trial", "learning_curves", "misclassified"}


def test_a_damaged_out_of_fold_file_is_not_trusted(bundle, tmp_path):
    copy = tmp_path / "damaged.ammo"
    shutil.copytree(bundle, copy)
    np.savez(copy / "oof.npz", rows=np.arange(3))
    report = collect(open_source(copy))
    assert any("integrity check failed" in w and "oof.npz" in w for w in report["warnings"])
    # Recomputed from the runs instead, and still the manifest's numbers.
    assert report["evaluated"]["reproduced"] is True


def _check_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = matplotlib.image.imread(path)[..., :3]
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300, path
    assert pixels.std() > 0.05, f"{path.name} is nearly blank"
    colours = np.unique((pixels.reshape(-1, 3) * 255).round().astype(np.uint8), axis=0)
    assert len(colours) > 30, f"{path.name} has only {len(colours)} colours"


def test_every_run_plot_is_a_readable_png(run_dir, tmp_path):
    result = invoke("report", run_dir, "--plots", tmp_path / "plots", "--top", "3")
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert written == sorted(f"{name}.png" for name in PLOTS)
    for path in (tmp_path / "plots").glob("*.png"):
        _check_png(path)
    assert "wrote" in result.output and "skipped" not in result.output


def test_bundle_plots_skip_only_what_a_bundle_lacks(bundle, tmp_path):
    plots = write_plots(open_source(bundle), tmp_path)
    assert [s["plot"] for s in plots["skipped"]] == ["objective_by_trial"]
    assert len(plots["written"]) == len(PLOTS) - 1
    for p in plots["written"]:
        _check_png(tmp_path / f"{p['plot']}.png")


def test_a_moved_dataset_is_a_note_not_a_failure(run_dir, tmp_path):
    copy = copy_run(run_dir, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["data"] = str(tmp_path / "gone.npz")
    (copy / "config.json").write_text(json.dumps(config))
    source = open_source(copy)
    report = collect(source)
    assert any("dataset unavailable" in w for w in report["warnings"])
    assert report["metrics"]["bootstrap"]["unit"] == "sample"  # no patients known
    plots = write_plots(source, tmp_path / "plots")
    assert {s["plot"] for s in plots["skipped"]} == {"misclassified"}
    # --data points at the file again.
    again = collect(open_source(copy, data=logged_run()[1]))
    assert not again["warnings"] and again["metrics"]["bootstrap"]["unit"] == "patient"
    # A --data the user names is checked: a wrong one is an error, not a note.
    result = CliRunner().invoke(cli, ["report", str(copy), "--data", str(tmp_path / "typo.npz")])
    assert result.exit_code == 2 and "typo.npz: no such file" in result.output
    other = tmp_path / "other.npz"
    from conftest import make_dataset

    make_dataset(seed=9).save(other)
    result = CliRunner().invoke(cli, ["report", str(copy), "--data", str(other)])
    assert result.exit_code == 2 and "other.npz: not the dataset this was built on" in result.output


def test_tensorboard_has_event_files_with_curves_and_hparams_per_trial(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trials = [t["trial_id"] for t in Run(run_dir).trials()]
    report = collect(open_source(run_dir))
    assert sorted(report["tensorboard"]["trials_with_logs"]) == sorted(trials)
    assert report["tensorboard"]["command"] == f"tensorboard --logdir {run_dir / 'logs'}"
    for trial_id in trials:
        root = run_dir / "logs" / trial_id / "execution0"
        tags = {}
        for part in ("", "train", "validation"):
            acc = EventAccumulator(str(root / part))
            acc.Reload()
            tags[part] = set(acc.Tags()["tensors"])
        assert "_hparams_/session_start_info" in tags[""]  # the HPARAMS table
        assert "epoch_loss" in tags["train"]
        assert {"epoch_loss", "epoch_f2", "epoch_auc"} <= tags["validation"]


def test_not_a_run_or_bundle_is_one_line_and_exit_2(tmp_path):
    result = invoke("report", tmp_path)
    assert result.exit_code == 2
    assert "neither a run directory" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_k_fold_search_shows_the_spread_over_folds(run_dir, tmp_path):
    # What `automammo search --folds 3` records: the score is the mean of fold_scores.
    copy = copy_run(run_dir, tmp_path)
    records = [json.loads(line) for line in (copy / "trials.jsonl").read_text().splitlines()]
    for i, r in enumerate(records):
        r["fold_scores"] = [0.5 + 0.1 * i, 0.6, 0.7 - 0.05 * i]
        r["folds"], r["score"] = 3, float(np.mean(r["fold_scores"]))
    (copy / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = json.loads((copy / "config.json").read_text())
    config["search"]["folds"] = 3
    (copy / "config.json").write_text(json.dumps(config))

    report = collect(open_source(copy))
    for row in report["leaderboard"]["rows"]:
        assert row["folds"] == 3 and row["fold_sd"] == pytest.approx(np.std(row["fold_scores"], ddof=1))
    assert "fold 1 of 3" in report["evaluated"]["data"]
    text = rendered(report)
    assert_fits(text)
    assert "means over 3 patient-grouped folds" in text and "fold 1 of 3" in text
