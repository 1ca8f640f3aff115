"""The run directory: everything one search writes, and how to read it back.

```
runs/NAME/
  config.json    every option of the search, the data fingerprint, versions
  trials.jsonl   one line per finished trial (builder, hyperparameters, objectives, ...)
  tuner/         Keras Tuner's own state (oracle, checkpoints): what --resume continues
  models/        <trial>.keras, the best epoch of the best trials
  preds/         <trial>.npz, validation predictions (dataset rows, targets, probabilities)
  logs/          TensorBoard, one folder per trial
  best.keras     the best trial's model
```
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from automammo.errors import RunError


class Run:
    """A run directory on disk."""

    def __init__(self, path):
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    trials_path = property(lambda self: self.path / "trials.jsonl")
    models_dir = property(lambda self: self.path / "models")
    preds_dir = property(lambda self: self.path / "preds")
    logs_dir = property(lambda self: self.path / "logs")
    tuner_dir = property(lambda self: self.path / "tuner")
    cache_dir = property(lambda self: self.path / "cache")
    best_model_path = property(lambda self: self.path / "best.keras")
    ended_path = property(lambda self: self.path / "ended.json")

    def exists(self) -> bool:
        return self.config_path.exists()

    def config(self) -> dict:
        if not self.exists():
            raise RunError(f"{self.path}: not a run directory (no config.json)")
        try:
            return json.loads(self.config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunError(f"{self.config_path}: unreadable ({exc})") from None

    def trials(self) -> list[dict]:
        """Finished trials in the order they ended; a line cut by a crash is skipped."""
        if not self.trials_path.exists():
            return []
        records, seen = [], set()
        for line in self.trials_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or record.get("trial_id") in seen:
                continue
            seen.add(record.get("trial_id"))
            records.append(record)
        return records

    def model_path(self, trial_id: str) -> Path:
        return self.models_dir / f"{trial_id}.keras"

    def preds_path(self, trial_id: str) -> Path:
        return self.preds_dir / f"{trial_id}.npz"

    def load_preds(self, trial_id: str) -> dict[str, np.ndarray]:
        """Validation predictions of a trial: ``index``, ``y_true``, ``y_prob``."""
        path = self.preds_path(trial_id)
        if not path.exists():
            raise RunError(f"{path}: no validation predictions for trial {trial_id}")
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}

    def ranked(self, direction: str) -> list[dict]:
        """Completed trials, best first by the run's objective."""
        done = [t for t in self.trials() if t.get("status") == "COMPLETED" and t.get("score") is not None]
        return sorted(done, key=lambda t: t["score"], reverse=(direction == "max"))
