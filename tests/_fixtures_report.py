"""One small finished search with TensorBoard logs, and a bundle of it, shared by the
report and validate tests (built once per test process, whichever module asks first)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from _fixtures_bundle import small_dataset

_BUILT: dict[str, Path] = {}


def logged_run() -> tuple[Path, Path]:
    """(run directory, dataset path): 3 scratch_cnn trials of 2 epochs on 32 px, with TensorBoard."""
    if "run" not in _BUILT:
        from automammo.search import SearchConfig, run_search

        root = Path(tempfile.mkdtemp(prefix="automammo-report-tests-"))
        data = small_dataset().save(root / "dataset.npz")
        run_search(SearchConfig(data=str(data), task="benign-malignant", objective="f2", builders=["scratch_cnn"],
                                trials=3, epochs=2, image_size=32, val_fraction=0.25, tensorboard=True, seed=0),
                   root / "run")
        _BUILT["run"], _BUILT["data"] = root / "run", data
    return _BUILT["run"], _BUILT["data"]


def logged_bundle() -> Path:
    """A bundle of the two best trials of ``logged_run`` (logistic meta-learner, 3 folds)."""
    if "bundle" not in _BUILT:
        from automammo.ensemble import ensemble_and_export

        run_dir, _ = logged_run()
        _BUILT["bundle"] = ensemble_and_export([run_dir], run_dir.parent / "report.ammo", meta="logistic",
                                               top=2, folds=3).bundle
    return _BUILT["bundle"]
