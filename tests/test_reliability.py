"""Misbehaving builders, kills mid-search, and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest

from automammo import hookimpl, registry
from automammo.builders import Builder
from automammo.errors import AutomammoError
from automammo.objectives import Objective
from automammo.search import SearchConfig, run_search


class Exploding(Builder):
    name = "exploding"
    description = "raises while building"

    def build_model(self, hp):
        hp.Int("units", 1, 4)
        raise ValueError("this builder always fails to build")


class ExplodingSmallSpace(Builder):
    name = "exploding_small"
    description = "raises while building; two configurations in all"

    def build_model(self, hp):
        hp.Choice("width", [8, 16])
        raise ValueError("this builder always fails to build")


class FailsInFit(Builder):
    name = "fails_in_fit"
    description = "builds, then raises while training"

    def build_model(self, hp):
        import keras

        inputs, x = self.input_layers()
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, self.classifier(x))

    def fit(self, hp, model, *args, **kwargs):
        raise RuntimeError("out of memory while training (simulated)")


class OneConfiguration(FailsInFit):
    name = "one_configuration"
    description = "a space of one configuration"
    fit = Builder.fit

    def training_space(self, hp):
        return {"optimizer": hp.Choice("optimizer", ["adam"]), "learning_rate": hp.Choice("learning_rate", [1e-3]),
                "batch_size": hp.Choice("batch_size", [32]), "class_weight": hp.Choice("class_weight", ["none"])}


@pytest.fixture
def bad_plugins(monkeypatch):
    mod = types.ModuleType("bad_builders_plugin")

    @hookimpl
    def automammo_register_builders():
        return [Exploding, ExplodingSmallSpace, FailsInFit, OneConfiguration]

    @hookimpl
    def automammo_register_objectives():
        return [Objective("never_finite", "max", lambda *a: float("nan"), "a broken objective: always NaN")]

    mod.automammo_register_builders = automammo_register_builders
    mod.automammo_register_objectives = automammo_register_objectives
    monkeypatch.setitem(sys.modules, "bad_builders_plugin", mod)
    ep = types.SimpleNamespace(name="bad", value="bad_builders_plugin", dist=types.SimpleNamespace(name="bad-pkg"),
                               load=lambda: mod)
    monkeypatch.setattr(registry, "_entry_points", lambda: [ep])
    registry.reset()
    yield
    registry.reset()


def _config(path, **kw):
    base = dict(data=str(path), task="benign-malignant", objective="auc", trials=3, epochs=1,
                image_size=32, tensorboard=False)
    base.update(kw)
    return SearchConfig(**base)


def test_failed_trials_are_recorded_and_the_search_goes_on(bad_plugins, tmp_path, small_dataset_path):
    result = run_search(_config(small_dataset_path, builders=["scratch_cnn", "fails_in_fit"], trials=4,
                                max_consecutive_failures=5), tmp_path / "r")
    statuses = {(t["builder"], t["status"]) for t in result.trials}
    assert ("scratch_cnn", "COMPLETED") in statuses
    failed = [t for t in result.trials if t["builder"] == "fails_in_fit"]
    assert failed, "the oracle picked the failing builder at least once with this seed"
    for t in failed:
        assert t["status"] == "FAILED" and "out of memory while training (simulated)" in t["error"]
    assert result.best["builder"] == "scratch_cnn"


def test_too_many_consecutive_failures_stop_with_a_summary(bad_plugins, tmp_path, small_dataset_path):
    with pytest.raises(AutomammoError, match="3 consecutive failed trials.*exploding: ValueError: this builder always fails"):
        run_search(_config(small_dataset_path, builders=["exploding"], trials=10), tmp_path / "r")
    lines = (tmp_path / "r" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["status"] == "FAILED" for x in lines)


def test_a_search_whose_every_trial_failed_says_so_even_when_its_space_runs_out(bad_plugins, tmp_path,
                                                                                small_dataset_path):
    from click.testing import CliRunner

    from automammo.cli import cli
    from automammo.report import collect, open_source

    # Two configurations: the tuner runs out before three consecutive failures.
    result = CliRunner().invoke(cli, ["search", "--data", str(small_dataset_path), "--builder", "exploding_small",
                                      "--trials", "6", "--epochs", "1", "--image-size", "32", "--no-tensorboard",
                                      "--no-ensemble", "--run", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "no trial completed (exploding_small: ValueError: this builder always fails to build)" in result.output
    # One line per failed trial; Keras Tuner's tracebacks stay in trials.jsonl.
    assert "Traceback" not in result.output
    assert "Traceback" in json.loads((tmp_path / "r" / "trials.jsonl").read_text().splitlines()[0])["traceback"]
    status = collect(open_source(tmp_path / "r"))["status"]
    assert status["state"] == "stopped" and status["message"].startswith("no trial completed")


def test_a_search_space_that_runs_out_is_said_to(bad_plugins, tmp_path, small_dataset_path):
    from automammo.report import collect, open_source

    said = []
    reporter = type("R", (), {"message": lambda self, text: said.append(text),
                              "__getattr__": lambda self, name: (lambda *a, **k: None)})()
    result = run_search(_config(small_dataset_path, builders=["one_configuration"], trials=3), tmp_path / "r",
                        reporter=reporter)
    assert len(result.trials) == 1 and result.best is not None and not result.stopped
    note = "the tuner ended after 1 of 3 trials: no untried configuration is left in the search space"
    assert note in said
    status = collect(open_source(tmp_path / "r"))["status"]
    assert status["state"] == "finished" and status["message"].endswith(note)


def test_an_objective_that_gives_no_score_is_an_error_not_a_success(bad_plugins, tmp_path, small_dataset_path):
    with pytest.raises(AutomammoError, match="no trial has a score: objective never_finite gave no finite value"):
        run_search(_config(small_dataset_path, builders=["scratch_cnn"], objective="never_finite", trials=1),
                   tmp_path / "r")
    assert json.loads((tmp_path / "r" / "ended.json").read_text())["state"] == "stopped"


def test_kill_9_then_resume_keeps_finished_trials(tmp_path, small_dataset_path):
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "automammo", "search", "--data", str(small_dataset_path),
           "--builder", "scratch_cnn", "--trials", "3", "--epochs", "3", "--patience", "5",
           "--image-size", "32", "--run", str(run_dir), "--no-tensorboard", "--no-ensemble"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    log = open(tmp_path / "search.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    trials = run_dir / "trials.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (trials.exists() and trials.read_text().count("\n") >= 1):
        time.sleep(0.2)
    time.sleep(1.0)  # into the next trial
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert trials.exists(), (tmp_path / "search.log").read_text()[-2000:]
    before = [json.loads(x) for x in trials.read_text().splitlines()]
    assert 1 <= len(before) < 3, "killed during the search, with at least one trial finished"

    resumed = subprocess.run(cmd[:cmd.index("--run")] + ["--run", str(run_dir), "--resume", "--no-ensemble"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = [json.loads(x) for x in trials.read_text().splitlines()]
    ids = [t["trial_id"] for t in after]
    assert len(ids) == len(set(ids)) == 3
    assert after[: len(before)] == before, "finished trials are kept as they were"


def test_image_size_too_small_for_the_builder_is_one_line(tmp_path, small_dataset_path):
    from click.testing import CliRunner

    from automammo.cli import cli

    result = CliRunner().invoke(cli, ["search", "--data", str(small_dataset_path), "--builder", "scratch_cnn",
                                      "--image-size", "12", "--run", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "builder scratch_cnn cannot run: needs images of at least 16 px" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_debug_shows_the_real_exception(tmp_path):
    from click.testing import CliRunner

    from automammo.cli import cli
    from automammo.errors import UnknownNameError

    result = CliRunner().invoke(cli, ["--debug", "search", "--task", "nope", "--run", str(tmp_path / "r")])
    # The traceback of the real exception, and still the exit code of a bad input.
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.output
    assert f"{UnknownNameError.__module__}.{UnknownNameError.__name__}: unknown task 'nope'" in result.output
