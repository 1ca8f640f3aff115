"""Distributed search: a chief oracle and worker processes on 127.0.0.1, on Keras Tuner's protocol."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from automammo import distributed, search
from automammo.errors import AutomammoError, RunError
from automammo.runs import Run
from automammo.search import SearchConfig, run_search


def _config(path, **kw):
    base = dict(data=str(path), task="benign-malignant", objective="auc", builders=["scratch_cnn"],
                trials=4, epochs=1, image_size=32, tensorboard=False)
    base.update(kw)
    return SearchConfig(**base)


def _serving(monkeypatch, workers: int, listen: str | None = None):
    """Make run_search a chief with local workers: its tuner serves instead of training.

    This is the wiring run_search has for ``SearchConfig.workers``, applied from outside
    so that the test exercises the same serve() whatever the configuration fields are.
    """
    make = search._tuner_for

    def chief_tuner(config, *args, **kwargs):
        tuner = make(config, *args, **kwargs)
        tuner.search = lambda **fit: distributed.serve(tuner, tuner.run, tuner.reporter, workers, listen)
        return tuner

    monkeypatch.setattr(search, "_tuner_for", chief_tuner)


@pytest.fixture(scope="module")
def killed_search(tmp_path_factory, small_dataset_path):
    """A chief on 127.0.0.1 with one local worker and one that joins as from another
    machine; the local one is killed mid-trial. The search runs 4 trials of 2 epochs.

    One search serves every test below: starting TensorFlow in worker processes is the
    slow part on a small machine.
    """
    monkeypatch = pytest.MonkeyPatch()
    _serving(monkeypatch, workers=1, listen="127.0.0.1:0")
    run_dir = tmp_path_factory.mktemp("distributed") / "r"
    # Started before the chief, with only the run directory: it waits for config.json and
    # for the address the chief announces in workers/chief.json.
    log_path = run_dir.parent / "remote-1.log"
    with open(log_path, "w") as log:
        joiner = subprocess.Popen([sys.executable, "-m", "automammo.distributed", "--run", str(run_dir),
                                   "--tuner-id", "remote-1", "--threads", "1"], stdout=log, stderr=subprocess.STDOUT)
    killed: dict = {}

    def kill_local_worker_mid_trial():
        # Wait until the local worker has finished the first of two epochs of a trial: it
        # is training the second one, so SIGKILL lands in the middle of the trial.
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                beat = json.loads((run_dir / "workers" / "tuner1.json").read_text())
            except (OSError, json.JSONDecodeError):
                beat = {}
            if beat.get("trial") and beat.get("epoch") == 1 and beat.get("epochs") == 2:
                os.kill(beat["pid"], signal.SIGKILL)
                killed.update(beat)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_local_worker_mid_trial, daemon=True)
    killer.start()
    try:
        result = run_search(_config(small_dataset_path, epochs=2, patience=5), run_dir)
    finally:
        monkeypatch.undo()
        try:
            joiner.wait(timeout=120)
        except subprocess.TimeoutExpired:
            joiner.kill()
            joiner.wait()
    killer.join()
    output = log_path.read_text()
    assert killed, "the local worker was killed during a trial"
    return result, killed, joiner.returncode, output


def _oracle_trials(run: Run) -> dict[str, dict]:
    out = {}
    for path in run.tuner_dir.glob("trial_*/trial.json"):
        trial = json.loads(path.read_text())
        out[trial["trial_id"]] = trial
    return out


def test_every_trial_is_recorded_once_as_the_oracle_ran_it(killed_search):
    result, killed, *_ = killed_search
    run = Run(result.run_dir)
    lines = [json.loads(x) for x in run.trials_path.read_text().splitlines()]
    ids = [r["trial_id"] for r in lines]
    assert len(ids) == len(set(ids)) == 4, "the search finished, every trial recorded exactly once"
    oracle = _oracle_trials(run)
    assert set(ids) == set(oracle), "the records are the oracle's trials"
    for record in lines:
        assert record["status"] == oracle[record["trial_id"]]["status"]
        scoped = {k.split("/", 1)[1]: v for k, v in oracle[record["trial_id"]]["hyperparameters"]["values"].items()
                  if k.startswith("scratch_cnn/")}
        assert record["hyperparameters"] == scoped, "each worker trained the values the oracle chose"
        if record["status"] == "COMPLETED":
            assert record["score"] == pytest.approx(oracle[record["trial_id"]]["score"]), "scored by the oracle"
    completed = [r for r in lines if r["status"] == "COMPLETED"]
    assert result.best["score"] == max(r["score"] for r in completed)
    assert run.best_model_path.exists()
    beat = json.loads((run.path / "workers" / "remote-1.json").read_text())
    assert beat["status"] == "finished" and beat["threads"] == 1, "the joining worker was told the search is over"
    assert not (run.path / "workers" / "chief.json").exists(), "the chief's address is withdrawn at the end"


def test_a_worker_joins_from_another_machine_with_only_the_run_directory(killed_search):
    result, killed, code, output = killed_search
    assert code == 0, output[-3000:]
    assert "joined the search" in output


def test_a_killed_worker_loses_only_its_trial(killed_search):
    result, killed, *_ = killed_search
    lost = [t for t in result.trials if t["status"] != "COMPLETED"]
    assert [t["trial_id"] for t in lost] == [killed["trial"]], "only the killed worker's trial is lost"
    assert lost[0]["status"] == "FAILED"
    assert f"worker {killed['tuner_id']} was killed by SIGKILL" in lost[0]["traceback"]
    assert lost[0]["builder"] == "scratch_cnn" and lost[0]["hyperparameters"], "recorded with what it was trying"
    assert result.best is not None and result.best["status"] == "COMPLETED"
    assert (result.run_dir / "workers" / "tuner2.log").exists(), "a replacement local worker was started"


def test_plan_splits_cores_and_gpus():
    assert [s.threads for s in distributed.plan(2, cores=2, gpus=[])] == [1, 1]
    assert [s.threads for s in distributed.plan(3, cores=8, gpus=[])] == [3, 3, 2]
    assert [s.threads for s in distributed.plan(4, cores=2, gpus=[])] == [1, 1, 1, 1]
    assert [s.gpus for s in distributed.plan(2, cores=8, gpus=["0", "1", "2", "3"])] == [("0", "1"), ("2", "3")]
    assert [s.gpus for s in distributed.plan(3, cores=8, gpus=["0", "1"])] == [("0",), ("1",), ("0",)]
    slot = distributed.plan(1, cores=4, gpus=["3"])[0]
    assert slot.env() == {"OMP_NUM_THREADS": "4", "CUDA_VISIBLE_DEVICES": "3"}
    assert distributed.plan(1, cores=4, gpus=[])[0].env() == {"OMP_NUM_THREADS": "4"}


@pytest.mark.parametrize("text, expected", [("127.0.0.1:8470", ("127.0.0.1", 8470)),
                                            ("node-7.cluster:0", ("node-7.cluster", 0)),
                                            ("[::1]:9000", ("[::1]", 9000))])
def test_parse_address(text, expected):
    assert distributed.parse_address(text) == expected


@pytest.mark.parametrize("text", ["localhost", ":8470", "host:port", "host:70000"])
def test_parse_address_refuses_what_is_not_host_port(text):
    with pytest.raises(AutomammoError, match="expected HOST:PORT"):
        distributed.parse_address(text)


def test_a_chief_needs_workers_or_an_address():
    with pytest.raises(AutomammoError, match="--workers N.*--listen HOST:PORT"):
        distributed.serve(None, None, None, workers=0, listen=None)


def test_a_worker_may_not_be_named_chief(tmp_path):
    # Keras Tuner would take it for the chief and start a second oracle.
    with pytest.raises(AutomammoError, match="must not contain 'chief'"):
        distributed.work("127.0.0.1:1", tmp_path, tuner_id="chief-2")


def test_a_worker_says_what_it_waits_for_and_gives_up_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "CONFIG_WAIT_SECONDS", 0.1)
    said = []
    reporter = type("R", (search.Reporter,), {"message": lambda self, text: said.append(text)})()
    with pytest.raises(RunError, match=r"no .*nowhere/config.json after 0 s; is a chief running"):
        distributed.work(None, tmp_path / "nowhere", tuner_id="w1", reporter=reporter)
    assert len(said) == 1 and said[0].startswith("waiting up to 0 s for") and "nowhere/config.json" in said[0]


def test_a_worker_refuses_data_that_differs_from_the_chiefs(tmp_path, small_dataset_path):
    run = Run(tmp_path / "r")
    stored = {"search": _config(small_dataset_path).__dict__, "data_fingerprint": "0" * 64,
              "builders": ["scratch_cnn"]}
    with pytest.raises(RunError, match="data differs from the chief's"):
        distributed._worker_tuner(run, stored, search.Reporter(), None)


def test_a_silent_worker_is_presumed_dead_after_the_timeout(tmp_path, monkeypatch):
    run = Run(tmp_path)
    (tmp_path / "workers").mkdir()
    beat = tmp_path / "workers" / "tuner-far-away.json"
    beat.write_text('{"beat": 1}')
    watch = distributed._Heartbeats(run)
    monkeypatch.setattr(distributed, "HEARTBEAT_TIMEOUT", 0.2)
    assert watch.stale(["tuner-far-away", "tuner-never-wrote"]) == []
    time.sleep(0.1)
    beat.write_text('{"beat": 2}')  # alive: its heartbeat changed
    assert watch.stale(["tuner-far-away"]) == []
    time.sleep(0.3)
    assert sorted(watch.stale(["tuner-far-away", "tuner-never-wrote"])) == ["tuner-far-away", "tuner-never-wrote"]


class _FakeClient:
    """Keras Tuner's OracleClient as seen by a worker: trials 0, 1, 2, ... then STOPPED."""

    def __init__(self):
        self.asked = 0
        self.ended = {}

    def create_trial(self, tuner_id):
        import keras_tuner as kt
        from keras_tuner.src.engine import trial as trial_module

        self.asked += 1
        return trial_module.Trial(kt.HyperParameters(), trial_id=str(self.asked - 1), status="RUNNING")

    def end_trial(self, trial):
        self.ended[trial.trial_id] = trial

    def get_trial(self, trial_id):
        scored = self.ended[trial_id]
        scored.score, scored.best_step, scored.status = 0.75, 3, "COMPLETED"
        return scored


def test_a_worker_leaves_after_its_quota_without_asking_the_chief():
    client = _FakeClient()
    distributed._adapt_client(client, max_trials=2)
    for _ in range(2):
        trial = client.create_trial("tuner1")
        assert trial.status == "RUNNING"
        client.end_trial(trial)
    assert trial.score == 0.75 and trial.best_step == 3, "the worker's record gets the oracle's score"
    assert client.create_trial("tuner1").status == "STOPPED"
    assert client.asked == 2, "the quota is the worker's own business: the chief was not asked"


def test_the_chief_replaces_recycled_and_dead_workers_differently(tmp_path):
    import keras_tuner as kt

    oracle = kt.oracles.RandomSearchOracle(objective=kt.Objective("val_auc", "max"), max_trials=5)
    oracle.tuner_ids.update({"tuner1", "tuner2", "tuner3"})
    run = Run(tmp_path)
    (tmp_path / "workers").mkdir()
    fleet = distributed._Fleet(run, "127.0.0.1:1", 0, search.Reporter(), recycle=2)
    fleet.spares = 1
    spawned = []
    fleet._spawn = spawned.append
    servicer = type("S", (), {"stopped": False, "started": {}, "check_failures": lambda self: None})()
    messages = []
    reporter = type("R", (), {"message": lambda self, text: messages.append(text)})()

    def exit_(tuner_id, code):
        worker = distributed._Local(tuner_id, distributed.Slot(1), None, tmp_path / "workers" / f"{tuner_id}.log")
        distributed._worker_exited(worker, code, oracle, servicer, None, run, fleet, reporter)

    exit_("tuner1", distributed.RECYCLE_EXIT)
    assert len(spawned) == 1 and fleet.spares == 1, "a recycled worker is replaced without using a spare"
    exit_("tuner2", 1)
    assert len(spawned) == 2 and fleet.spares == 0, "a worker that failed to start uses the spare"
    exit_("tuner3", 1)
    assert len(spawned) == 2, "no spare left: not replaced again"
    assert oracle.tuner_ids == set(), "the oracle no longer waits for any of them"
    assert any("tuner2 exited with code 1" in m for m in messages)


def test_sigterm_raises_system_exit_inside_a_worker_and_not_after():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        with distributed._sigterm_exits():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; this is never reached in full
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
