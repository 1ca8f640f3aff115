"""Distributed search on Keras Tuner's own chief/worker protocol.

The chief is the process that ran ``run_search``: it prepared the run directory and built
the tuner, and instead of training it serves the tuner's oracle over gRPC with Keras
Tuner's ``OracleServicer`` (``serve``). Workers are ordinary Keras Tuner tuners whose
oracle is Keras Tuner's ``OracleClient``, selected by the environment variables
``KERASTUNER_TUNER_ID``, ``KERASTUNER_ORACLE_IP`` and ``KERASTUNER_ORACLE_PORT`` (``work``).
The oracle alone decides which trial runs where; this module only starts processes,
splits the machine among them and notices the ones that die.

```
 automammo search --workers 2            automammo worker --chief HOST:PORT --run DIR
   chief: oracle + gRPC server  <------  (another machine, same shared run directory)
     |-- python -m automammo.distributed --tuner-id tuner1   (1 core)
     '-- python -m automammo.distributed --tuner-id tuner2   (1 core)
```

Every worker reads the search's ``config.json`` from the shared run directory, checks that
it sees the same data (fingerprint) and the same builders, trains the trials it is handed,
and appends each one to ``trials.jsonl`` itself. It also keeps ``workers/<id>.json`` fresh
(a heartbeat with its current trial and epoch). A worker that dies loses only its current
trial: the chief ends that trial as FAILED, records it, and, for a local worker, starts a
replacement. A local worker is seen dying at once; one on another machine when its
heartbeat has not changed for ``HEARTBEAT_TIMEOUT`` seconds. Local workers are also
replaced by fresh processes every ``RECYCLE_TRIALS`` trials, a bound on whatever memory a
long-lived training process keeps that the search cannot free.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import keras_tuner as kt

from automammo.atomic import append_line, write_json
from automammo.errors import AutomammoError, RunError
from automammo.runs import Run

# A worker rewrites its heartbeat this often; the chief declares a worker on another machine
# dead when the heartbeat has not changed for HEARTBEAT_TIMEOUT seconds of the chief's own
# clock (so clock skew between machines does not matter). The timeout allows for NFS
# attribute caching, which can hide a new file for up to a minute.
HEARTBEAT_SECONDS = 10.0
HEARTBEAT_TIMEOUT = 180.0
# How long a worker started before its chief waits for the run's config.json.
CONFIG_WAIT_SECONDS = 600.0
# A local worker leaves after this many trials and the chief starts a fresh one in its
# place. The search frees every trial's graphs itself (see search._drop_custom_gradients),
# so this is insurance against what it cannot free: a third-party builder's caches, the
# allocator's high-water mark. A new process costs seconds, once per this many trials.
RECYCLE_TRIALS = 50
# The exit code of a worker that left after its quota of trials, to be replaced.
RECYCLE_EXIT = 75
# How long the chief waits, once the search is over, for local workers to exit by themselves.
EXIT_GRACE_SECONDS = 10.0
WORKERS_DIR = "workers"
# In WORKERS_DIR while a chief listens for workers on other machines: {"address": "HOST:PORT"}.
CHIEF_FILE = "chief.json"

_FAILED, _STOPPED, _IDLE = "FAILED", "STOPPED", "IDLE"


def _silence_keras_tuner_debug_print() -> None:
    # Keras Tuner 1.4.8 left a debugging print() in conditions.Parent.to_proto: every trial
    # sent over gRPC would print a builder name on the chief's and the workers' output. A
    # module-level name shadows the builtin for that module alone.
    from keras_tuner.src.engine import conditions

    conditions.print = lambda *args, **kwargs: None


_silence_keras_tuner_debug_print()


# -- addresses and the split of the machine ----------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> (host, port); an IPv6 host keeps its brackets (``[::1]:8470``).

    Raises:
        AutomammoError: not of the form HOST:PORT with a port in 0-65535.
    """
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise AutomammoError(f"expected HOST:PORT (e.g. 10.0.0.5:8470), got {text!r}")
    return host, int(port)


@dataclass(frozen=True)
class Slot:
    """The share of this machine one local worker gets.

    Attributes:
        threads: TensorFlow intra-op threads (and BLAS/OpenMP threads).
        gpus: GPU indices for ``CUDA_VISIBLE_DEVICES``; None leaves the variable alone.
    """

    threads: int
    gpus: tuple[str, ...] | None = None

    def env(self) -> dict[str, str]:
        """Environment variables that confine a worker process to this slot."""
        env = {"OMP_NUM_THREADS": str(self.threads)}
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        return env


def plan(workers: int, cores: int | None = None, gpus: list[str] | None = None) -> list[Slot]:
    """Split this machine's cores and GPUs among ``workers`` local worker processes.

    Cores are shared out evenly (the first workers take the remainder). With at least as
    many GPUs as workers each worker gets its own GPUs (a mirrored strategy then spans
    them); with fewer, workers share GPUs round-robin and rely on memory growth.

    Args:
        workers: number of local workers, at least 1.
        cores: usable cores; default: this process's CPU affinity.
        gpus: GPU indices; default: ``CUDA_VISIBLE_DEVICES`` or every GPU TensorFlow sees.
    """
    if workers < 1:
        raise AutomammoError(f"need at least one local worker, got {workers}")
    cores = cores or len(os.sched_getaffinity(0))
    gpus = _visible_gpus() if gpus is None else list(gpus)
    slots = []
    for i in range(workers):
        threads = max(1, cores // workers + (1 if i < cores % workers else 0))
        if not gpus:
            devices = None
        elif len(gpus) >= workers:
            share = len(gpus) // workers
            devices = tuple(gpus[i * share:(i + 1) * share])
        else:
            devices = (gpus[i % len(gpus)],)
        slots.append(Slot(threads, devices))
    return slots


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import tensorflow as tf

    return [str(i) for i in range(len(tf.config.list_physical_devices("GPU")))]


# -- the chief ---------------------------------------------------------------------------


def _servicer_class():
    # Imported here, as Keras Tuner does, so that the protobuf runtime is loaded only by a
    # process that serves or calls the oracle.
    from keras_tuner.src import protos
    from keras_tuner.src.distribute.oracle_chief import OracleServicer
    from keras_tuner.src.engine import trial as trial_module

    class Servicer(OracleServicer):
        """Keras Tuner's servicer, plus what a long search over unreliable workers needs.

        - It notes when each trial started (on the chief's clock) for the record of a trial
          whose worker dies.
        - It applies the consecutive-failure limit itself, after the oracle's bookkeeping of
          the trial is complete: Keras Tuner raises it from inside ``end_trial``, which
          over gRPC would leave the trial ongoing forever and fail the worker's call.
        - Once stopped, it answers every request for a trial with STOPPED.
        - It ignores the end of a trial already ended: a worker declared dead that was only
          slow must not end its trial twice.
        """

        def __init__(self, oracle, failure_limit):
            super().__init__(oracle)
            self.failure_limit = failure_limit
            self.started: dict[str, float] = {}
            self.stop_error: str | None = None

        def CreateTrial(self, request, context):  # noqa: N802 (gRPC method name)
            if self.stop_error:
                _forget(self.oracle, request.tuner_id)
                trial = trial_module.Trial(self.oracle.get_space(), status=_STOPPED)
                return protos.get_service().CreateTrialResponse(trial=trial.to_proto())
            response = super().CreateTrial(request, context)
            if response.trial.trial_id and response.trial.trial_id not in self.started:
                self.started[response.trial.trial_id] = time.time()
            return response

        def EndTrial(self, request, context):  # noqa: N802
            if request.trial.trial_id in _ended(self.oracle):
                return protos.get_service().EndTrialResponse()
            response = super().EndTrial(request, context)
            self.check_failures()
            return response

        def check_failures(self) -> None:
            if not self.failure_limit or self.stop_error:
                return
            count, last = _trailing_failures(self.oracle)
            if count >= self.failure_limit:
                # The same words as Keras Tuner's own error, which run_search recognises.
                self.stop_error = (f"Number of consecutive failures exceeded the limit of "
                                   f"{self.failure_limit}.\n" + (last.message or ""))

        @property
        def stopped(self) -> bool:
            return self.stop_triggered or bool(self.stop_error)

    return Servicer


# The oracle's own lock (Keras Tuner's ``synchronized``, keyed by the first argument) guards
# every read and change of its state from the monitor loop, which runs beside the gRPC threads.


@kt.synchronized
def _forget(oracle, tuner_id):
    oracle.tuner_ids.discard(tuner_id)


@kt.synchronized
def _ended(oracle):
    return set(oracle.end_order)


@kt.synchronized
def _trailing_failures(oracle):
    count, last = 0, None
    for trial_id in reversed(oracle.end_order):
        trial = oracle.trials[trial_id]
        if trial.status != _FAILED:
            break
        count += 1
        last = last or trial
    return count, last


@kt.synchronized
def _lose(oracle, tuner_id, message):
    """End the trial a dead tuner was running as FAILED; forget the tuner. Returns it."""
    oracle.tuner_ids.discard(tuner_id)
    trial = oracle.ongoing_trials.get(tuner_id)
    if trial is None:
        return None
    trial.status = _FAILED
    trial.message = message
    oracle.end_trial(trial)  # also pops it from the ongoing trials
    return trial


@kt.synchronized
def _idle(oracle):
    return not oracle.ongoing_trials and not oracle.tuner_ids


@kt.synchronized
def _active_tuners(oracle):
    return set(oracle.tuner_ids) | set(oracle.ongoing_trials)


@dataclass
class _Local:
    tuner_id: str
    slot: Slot
    proc: subprocess.Popen
    log: Path


class _Fleet:
    """The chief's local worker processes: started, watched, replaced once when they die."""

    def __init__(self, run: Run, address: str, workers: int, reporter, recycle: int | None):
        self.run, self.address, self.reporter, self.recycle = run, address, reporter, recycle
        self.slots = plan(workers) if workers else []
        self.live: dict[str, _Local] = {}
        self.spares = len(self.slots)  # replacements allowed over the whole search
        self.count = 0
        self.last_log: Path | None = None

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        self.count += 1
        # tuner0 is the name of the chief's own tuner state file (tuner/tuner0.json).
        tuner_id = f"tuner{self.count}"
        log = self.run.path / WORKERS_DIR / f"{tuner_id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "automammo.distributed", "--chief", self.address,
               "--run", str(self.run.path), "--tuner-id", tuner_id, "--threads", str(slot.threads),
               "--parent-pid", str(os.getpid())]
        if self.recycle:
            cmd += ["--max-trials", str(self.recycle)]
        env = {**os.environ, **slot.env(), "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
               "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as out:
            # A session of its own: a Ctrl-C reaches the chief only, which then stops the
            # workers in order instead of racing them.
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.live[tuner_id] = _Local(tuner_id, slot, proc, log)

    def exited(self) -> list[tuple[_Local, int]]:
        """Workers that exited since the last call, with their exit codes."""
        gone = [(w, w.proc.poll()) for w in self.live.values() if w.proc.poll() is not None]
        for w, _ in gone:
            del self.live[w.tuner_id]
            self.last_log = w.log
        return gone

    def replace(self, worker: _Local, recycled: bool = False) -> bool:
        """Start a worker in ``worker``'s slot; a dead one's replacement uses up a spare."""
        if not recycled:
            if self.spares <= 0:
                return False
            self.spares -= 1
        self._spawn(worker.slot)
        return True

    def stop(self, grace: float = 30.0) -> None:
        deadline = time.time() + grace
        for w in self.live.values():
            if w.proc.poll() is None:
                w.proc.terminate()
        for w in self.live.values():
            try:
                w.proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        self.live.clear()


def serve(tuner, run: Run, reporter, workers: int = 0, listen: str | None = None,
          recycle: int | None = RECYCLE_TRIALS, poll_seconds: float = 0.5) -> None:
    """Serve ``tuner``'s oracle to workers until the search is over; the chief's ``search``.

    Called by ``run_search`` in place of ``tuner.search()`` once the run directory and its
    ``config.json`` exist. Returns when the oracle has no trial left and every worker has
    been told so; ``run_search`` then collects the records as after any search.

    Args:
        tuner: the search's tuner, built in this process without any ``KERASTUNER_*``
            variable (so its state file is ``tuner0.json`` whether the search runs here or
            distributed, and a run can be resumed either way).
        run: the run directory, shared with every worker.
        reporter: the search's reporter; it sees every worker's trials as they are recorded.
        workers: local worker processes to start (0: only workers from other machines).
        listen: ``HOST:PORT`` the oracle listens on, for workers on other machines
            (``0.0.0.0:8470``); default ``127.0.0.1`` on a free port.
        recycle: replace each local worker by a fresh process after this many trials
            (None: never).
        poll_seconds: how often the chief looks at its workers and the records.

    Raises:
        RuntimeError: the consecutive-failure limit was reached (Keras Tuner's message).
        RunError: every local worker exited and none can replace them.
        AutomammoError: no workers and no address to listen on, or a bad address.
    """
    import grpc
    from keras_tuner.src import protos

    if workers < 0:
        raise AutomammoError(f"--workers must be 0 or more, got {workers}")
    if not workers and not listen:
        raise AutomammoError("a distributed search needs local workers (--workers N) or an address "
                             "for workers on other machines (--listen HOST:PORT)")
    host, port = parse_address(listen) if listen else ("127.0.0.1", 0)
    oracle = tuner.oracle
    oracle.verbose = 0  # the reporter shows the trials; Keras Tuner's tables would repeat them
    servicer = _servicer_class()(oracle, oracle.max_consecutive_failed_trials)
    limit, oracle.max_consecutive_failed_trials = oracle.max_consecutive_failed_trials, None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        oracle.max_consecutive_failed_trials = limit
        raise AutomammoError(f"the chief cannot listen on {host}:{port} (in use, or not an address of this machine)")
    anywhere = host in ("0.0.0.0", "[::]", "")
    address = f"{'127.0.0.1' if anywhere else host}:{bound}"
    tuner.save()
    server.start()
    chief_file = run.path / WORKERS_DIR / CHIEF_FILE
    if listen:
        # Workers started with only --run find the chief here: on a cluster the chief's
        # node is known only once its job starts.
        write_json(chief_file, {"address": f"{socket.getfqdn() if anywhere else host}:{bound}",
                                "pid": os.getpid(), "started": time.time()})
    fleet = _Fleet(run, address, workers, reporter, recycle)
    records = _Records(run, oracle.objective.direction, reporter)
    watch = _Heartbeats(run)
    idle_since = None
    try:
        fleet.start()
        reporter.message(f"chief serving the oracle on {host}:{bound}; "
                         + (f"{workers} local workers ({', '.join(str(s.threads) for s in fleet.slots)} threads); "
                            if workers else "")
                         + f"worker logs in {run.path / WORKERS_DIR}")
        if workers > len(os.sched_getaffinity(0)):
            reporter.message(f"{workers} workers on {len(os.sched_getaffinity(0))} cores: "
                             "more workers than cores only adds contention")
        while True:
            time.sleep(poll_seconds)
            for worker, code in fleet.exited():
                _worker_exited(worker, code, oracle, servicer, tuner, run, fleet, reporter)
            for tuner_id in watch.stale(_active_tuners(oracle) - set(fleet.live)):
                trial = _lose(oracle, tuner_id, f"worker {tuner_id} stopped sending heartbeats for "
                                                f"{HEARTBEAT_TIMEOUT:.0f} s during this trial")
                if trial is not None:
                    _record_lost(tuner, run, trial, servicer.started)
                    servicer.check_failures()
                reporter.message(f"worker {tuner_id} is silent; presumed dead")
            records.report()
            if servicer.stopped and _idle(oracle):
                # No trial is ongoing and every worker that asked for one was told to stop.
                # A local worker still starting holds no trial: give the others a moment to
                # exit on their own, then stop it rather than wait for it to start.
                idle_since = idle_since or time.time()
                if not fleet.live or time.time() - idle_since > EXIT_GRACE_SECONDS:
                    break
            if workers and not fleet.live and not _active_tuners(oracle) and not listen:
                if servicer.stopped:
                    break
                tail = _tail(fleet.last_log)
                raise RunError("every local worker exited before the search finished; the last one said:\n" + tail)
    finally:
        # Gone with the chief, so that a worker started later waits (and then says so)
        # instead of calling an address where nobody answers.
        chief_file.unlink(missing_ok=True)
        fleet.stop()
        server.stop(grace=2.0).wait()
        oracle.max_consecutive_failed_trials = limit
    _reconcile(tuner, run, oracle, servicer.started)
    records.report()
    if servicer.stop_error:
        raise RuntimeError(servicer.stop_error)


def _worker_exited(worker: _Local, code: int, oracle, servicer, tuner, run: Run, fleet: _Fleet, reporter) -> None:
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    if code == RECYCLE_EXIT:
        how = "left after its quota of trials"
    # The record's one-line error is the message's last line; the log tail above it says why.
    trial = _lose(oracle, worker.tuner_id, f"{_tail(worker.log)}\n\nworker {worker.tuner_id} {how} during this trial")
    if trial is not None:
        _record_lost(tuner, run, trial, servicer.started)
        servicer.check_failures()
        reporter.message(f"worker {worker.tuner_id} {how} during trial {trial.trial_id}; the trial is lost")
    if code == 0 or servicer.stopped:
        return
    if code == RECYCLE_EXIT and trial is None:
        fleet.replace(worker, recycled=True)
        return
    if trial is None:
        reporter.message(f"worker {worker.tuner_id} {how}: {_last_line(worker.log)}")
    if fleet.replace(worker):
        reporter.message(f"started tuner{fleet.count} in its place")


def _record_lost(tuner, run: Run, trial, started: dict[str, float]) -> None:
    extra = {"start": started.get(trial.trial_id, time.time()), "history": {}}
    record = tuner._record(trial, extra)
    if record["trial_id"] not in {t["trial_id"] for t in run.trials()}:
        append_line(run.trials_path, record)


def _reconcile(tuner, run: Run, oracle, started: dict[str, float]) -> None:
    """Record any trial the oracle ended but no worker recorded (it died in between)."""
    recorded = {t["trial_id"] for t in run.trials()}
    for trial_id in sorted(_ended(oracle) - recorded):
        _record_lost(tuner, run, oracle.trials[trial_id], started)


class _Records:
    """Tells the chief's reporter about each trial a worker appends to trials.jsonl."""

    def __init__(self, run: Run, direction: str, reporter):
        self.run, self.direction, self.reporter = run, direction, reporter
        self.seen = {t["trial_id"] for t in run.trials()}

    def report(self) -> None:
        for record in self.run.trials():
            if record["trial_id"] in self.seen:
                continue
            self.seen.add(record["trial_id"])
            ranked = self.run.ranked(self.direction)
            self.reporter.trial_end(record, ranked[0] if ranked else None)


class _Heartbeats:
    """When each worker's heartbeat file last changed, on the chief's clock."""

    def __init__(self, run: Run):
        self.dir = run.path / WORKERS_DIR
        self.seen: dict[str, tuple[bytes | None, float]] = {}

    def stale(self, tuner_ids) -> list[str]:
        now, out = time.time(), []
        for tuner_id in tuner_ids:
            try:
                content = (self.dir / f"{tuner_id}.json").read_bytes()
            except OSError:
                content = None
            previous = self.seen.get(tuner_id)
            if previous is None or previous[0] != content:
                self.seen[tuner_id] = (content, now)
            elif now - previous[1] > HEARTBEAT_TIMEOUT:
                out.append(tuner_id)
                del self.seen[tuner_id]
        return out


def _tail(log: Path | None, lines: int = 12) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


def _last_line(log: Path | None) -> str:
    tail = _tail(log, 1)
    return tail or "(no output)"


# -- a worker ----------------------------------------------------------------------------


class _Heartbeat:
    """A worker's reporter: forwards everything and keeps ``workers/<id>.json`` fresh.

    The file says which trial and epoch the worker is on; the chief watches it change to
    know that a worker on another machine is alive.
    """

    def __init__(self, path: Path, tuner_id: str, inner, threads: int | None, parent_pid: int | None,
                 chief_file: Path | None = None):
        self.path, self.inner, self.parent_pid, self.chief_file = path, inner, parent_pid, chief_file
        self.records: list[dict] = []
        self.state = {"tuner_id": tuner_id, "host": socket.gethostname(), "pid": os.getpid(),
                      "threads": threads, "status": "starting", "trial": None, "epoch": None,
                      "epochs": None, "beat": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="automammo-heartbeat", daemon=True)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread.start()

    def stop(self, status: str) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._write(status=status, trial=None)

    def _write(self, **changes) -> None:
        with self._lock:
            self.state.update(changes)
            self.state["beat"] += 1
            self.state["time"] = time.time()
            self.state["rss_mb"] = _rss_mb()
            write_json(self.path, self.state)

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            # The chief is gone (the local parent died, or the chief that announced itself
            # in chief.json removed it): nobody will hand out another trial, and Keras
            # Tuner's client would wait an hour for one.
            if self.parent_pid and os.getppid() != self.parent_pid:
                os._exit(3)
            if self.chief_file is not None and not self.chief_file.exists() and not self._stop.is_set():
                os._exit(3)
            try:
                self._write()
            except OSError:
                pass  # a shared file system hiccup; the next beat tries again

    # Reporter interface.
    def search_begin(self, run_dir, total, config, done):
        self._write(status="running")
        _call(self.inner, "search_begin", run_dir, total, config, done)

    def message(self, text):
        _call(self.inner, "message", text)

    def trial_begin(self, trial_id, builder, hyperparameters):
        self._write(trial=trial_id, epoch=0)
        _call(self.inner, "trial_begin", trial_id, builder, hyperparameters)

    def epoch_end(self, epoch, epochs, logs):
        self._write(epoch=epoch, epochs=epochs)
        _call(self.inner, "epoch_end", epoch, epochs, logs)

    def trial_end(self, record, best):
        self.records.append(record)
        # Memory after each trial, for the operator (and benchmarks/memory.py) to watch.
        self._write(trial=None, epoch=None, rss_mb_after_trials=[*self.state.get("rss_mb_after_trials", []), _rss_mb()])
        _call(self.inner, "trial_end", record, best)

    def search_end(self, result):
        _call(self.inner, "search_end", result)


def _rss_mb() -> float | None:
    """This process's resident memory in MiB (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return None


def _call(reporter, name, *args):
    method = getattr(reporter, name, None)
    if callable(method):
        method(*args)


class LineReporter:
    """Plain progress lines, for a worker's log file."""

    def search_begin(self, run_dir, total, config, done):
        self._say(f"joined the search in {run_dir}: task {config.task}, objective {config.objective}")

    def message(self, text):
        self._say(text)

    def trial_begin(self, trial_id, builder, hyperparameters):
        self._say(f"trial {trial_id} {builder} {json.dumps(hyperparameters, sort_keys=True, default=str)}")

    def epoch_end(self, epoch, epochs, logs):
        shown = " ".join(f"{k} {v:.4f}" for k, v in sorted(logs.items())
                         if k.startswith("val_") and isinstance(v, float))
        self._say(f"  epoch {epoch}/{epochs} {shown}")

    def trial_end(self, record, best):
        score = record.get("score")
        self._say(f"trial {record['trial_id']} {record['status']}"
                  + (f" {record['objective']} {score:.4f}" if score is not None else f": {record.get('error')}"))

    def search_end(self, result):
        pass

    @staticmethod
    def _say(text):
        print(time.strftime("%H:%M:%S"), text, flush=True)


def work(chief: str | None, run_dir, tuner_id: str | None = None, threads: int | None = None,
         reporter=None, parent_pid: int | None = None, max_trials: int | None = None) -> list[dict]:
    """Join a distributed search as a worker; return when its chief has no trial left.

    Sets the Keras Tuner variables of this process (``KERASTUNER_TUNER_ID``,
    ``KERASTUNER_ORACLE_IP``, ``KERASTUNER_ORACLE_PORT``), so call it once per process.

    Args:
        chief: ``HOST:PORT`` of the chief's oracle; None: the address the chief wrote to
            ``workers/chief.json`` in the run directory (it does when it listens with
            ``--listen``).
        run_dir: the search's run directory, shared with the chief (same path or a mount of
            it); a worker started first waits up to ``CONFIG_WAIT_SECONDS`` for the chief.
        tuner_id: this worker's name, unique in the search; default ``KERASTUNER_TUNER_ID``
            or ``tuner-HOST-PID``. A worker restarted under the same name (a requeued
            cluster job) resumes the trial its predecessor had, if the chief has not yet
            given it up.
        threads: TensorFlow intra-op threads; default: TensorFlow's (every core).
        reporter: receives this worker's progress (``search.Reporter`` interface).
        parent_pid: exit when this process is no longer the parent (the local chief died).
        max_trials: leave after this many trials, though the search goes on (the chief
            then starts a fresh process: see ``RECYCLE_TRIALS``).

    Returns:
        The records of the trials this worker ran.

    Raises:
        AutomammoError: bad address or name, no config.json, or data or builders that differ
            from the chief's.
    """
    if chief is not None:
        parse_address(chief)
    tuner_id = tuner_id or os.environ.get("KERASTUNER_TUNER_ID") or f"tuner-{socket.gethostname()}-{os.getpid()}"
    if "chief" in tuner_id:
        # Keras Tuner treats any tuner whose name contains "chief" as the chief.
        raise AutomammoError(f"a worker's name must not contain 'chief', got {tuner_id!r}")
    if threads:
        _limit_threads(threads)
    from automammo import accel
    from automammo.search import Reporter

    reporter = reporter or Reporter()
    run = Run(run_dir)
    _wait_for(run.config_path, CONFIG_WAIT_SECONDS, reporter)
    chief_file = None
    if chief is None:
        chief_file = run.path / WORKERS_DIR / CHIEF_FILE
        _wait_for(chief_file, CONFIG_WAIT_SECONDS, reporter)
        chief = json.loads(chief_file.read_text())["address"]
    host, port = parse_address(chief)
    stored = run.config()
    search = stored["search"]
    strategy = accel.configure(search.get("strategy", "default"), search.get("precision", "float32"), reporter)
    os.environ.update(KERASTUNER_TUNER_ID=tuner_id, KERASTUNER_ORACLE_IP=host, KERASTUNER_ORACLE_PORT=str(port))
    beat = _Heartbeat(run.path / WORKERS_DIR / f"{tuner_id}.json", tuner_id, reporter, threads, parent_pid,
                      chief_file)
    beat.start()
    status = "failed"
    try:
        with _sigterm_exits():
            tuner, config = _worker_tuner(run, stored, beat, strategy)
            _adapt_client(tuner.oracle, max_trials)
            from automammo.search import _deterministic, frozen_heap

            _deterministic(config.seed)
            beat.search_begin(run.path, None, config, len(run.trials()))
            with frozen_heap():
                tuner.search(epochs=config.epochs, verbose=0)
        status = "finished"
    except (KeyboardInterrupt, SystemExit):
        status = "stopped"  # Ctrl-C, or the chief ending its local workers
        raise
    finally:
        beat.stop(status)
    return beat.records


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM (how a chief stops its local workers, and how SLURM or Kubernetes stop a job)
    raises ``SystemExit`` instead of ending the process on the spot, so that the heartbeat
    file is left saying *stopped*, not *running*. Only the main thread can set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _limit_threads(threads: int) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        # Two inter-op threads even for a one-core worker: a single one can deadlock ops
        # that wait on each other, and the scratch models rarely run two ops at once.
        tf.config.threading.set_inter_op_parallelism_threads(max(2, threads // 2))
    except RuntimeError:
        pass  # TensorFlow already started in this process; it keeps its thread pools


def _wait_for(path: Path, seconds: float, reporter=None) -> None:
    deadline = time.time() + seconds
    if not path.exists() and reporter is not None:
        # Said once, so that a worker started before its chief (or at a mistyped --run) is
        # not silent while it waits.
        reporter.message(f"waiting up to {seconds:.0f} s for {path} (written by the chief: "
                         "automammo search --listen HOST:PORT --run DIR)")
    while not path.exists():
        if time.time() > deadline:
            raise RunError(f"no {path} after {seconds:.0f} s; is a chief running "
                           "(automammo search --listen HOST:PORT --run DIR)?")
        time.sleep(2.0)


def _worker_tuner(run: Run, stored: dict, reporter, strategy):
    """The same tuner the chief built, from the run's config.json, for the same data."""
    from automammo.search import SearchConfig, make_tuner, prepare_search

    setup = prepare_search(SearchConfig.from_dict(stored["search"]), run, reporter)
    if setup.prepared.fingerprint != stored.get("data_fingerprint"):
        raise RunError(f"{setup.source}: this worker's data differs from the chief's (fingerprint); "
                       "every worker must see the same dataset file")
    if sorted(setup.builders) != sorted(stored.get("builders", [])):
        raise RunError(f"this worker can run builders {sorted(setup.builders)}, the chief searches "
                       f"{sorted(stored.get('builders', []))}; install the same plugins and weights")
    return make_tuner(setup, run, reporter, strategy), setup.config


def _adapt_client(client, max_trials: int | None = None, idle_seconds: float = 1.0) -> None:
    """Two gaps between Keras Tuner's in-process loop and its gRPC client, closed; a quota.

    - The oracle scores a trial in ``end_trial``; in one process that sets ``trial.score``
      on the tuner's own trial object, over gRPC it sets it on the chief's copy only. The
      worker's record of the trial needs the score and the oracle's final status.
    - While the oracle is IDLE (Hyperband waiting for a bracket to finish) the tuner asks
      again at once: over gRPC a busy loop that takes a core from workers still training.
    - After ``max_trials`` trials the worker answers itself STOPPED, without asking the
      chief, so Keras Tuner's loop ends and the process can leave.
    """
    create, end = client.create_trial, client.end_trial
    started: set[str] = set()

    def create_trial(tuner_id):
        if max_trials and len(started) >= max_trials:
            from keras_tuner.src.engine import trial as trial_module

            return trial_module.Trial(kt.HyperParameters(), status=_STOPPED)
        trial = create(tuner_id)
        if trial.status == "RUNNING":
            started.add(trial.trial_id)
        if trial.status == _IDLE:
            time.sleep(idle_seconds)
        return trial

    def end_trial(trial):
        end(trial)
        ended = client.get_trial(trial.trial_id)
        trial.score, trial.best_step, trial.status = ended.score, ended.best_step, ended.status

    client.create_trial, client.end_trial = create_trial, end_trial


def main(argv=None) -> int:
    """``python -m automammo.distributed``: a local worker as the chief starts it.

    People start workers with ``automammo worker``; this entry point spares the chief's
    children the command line's imports and has one more option, ``--parent-pid``.
    """
    parser = argparse.ArgumentParser(prog="python -m automammo.distributed",
                                     description="One worker of a distributed automammo search.")
    parser.add_argument("--chief", help="HOST:PORT of the chief's oracle (default: from the run directory)")
    parser.add_argument("--run", required=True, help="the search's run directory")
    parser.add_argument("--tuner-id", help="this worker's name, unique in the search")
    parser.add_argument("--threads", type=int, help="TensorFlow intra-op threads")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is no longer the parent")
    parser.add_argument("--max-trials", type=int, help=f"leave after this many trials (exit code {RECYCLE_EXIT})")
    args = parser.parse_args(argv)
    try:
        records = work(args.chief, args.run, args.tuner_id, args.threads, LineReporter(), args.parent_pid,
                       args.max_trials)
    except AutomammoError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    # Had the search ended exactly at the quota, the replacement is simply told so.
    return RECYCLE_EXIT if args.max_trials and len(records) >= args.max_trials else 0


if __name__ == "__main__":
    sys.exit(main())
