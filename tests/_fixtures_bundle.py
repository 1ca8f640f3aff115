"""Small data and one finished run shared by the ensemble and bundle tests.

The run is built once per test process (``finished_run``), whichever module asks first:
a search costs seconds, and every test of the bundle machinery only needs *a* finished run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from automammo.dataset import Dataset

N_PATIENTS = 40
LESIONS_PER_PATIENT = 3
SIZE = 32


def small_dataset(seed: int = 0) -> Dataset:
    """uint8 32x32 lesions (labels 1-4), each paired with a label-0 baseline of its patient.

    Malignant lesions are bright, compact blobs; benign ones are faint and wide, so a CNN
    learns something in two epochs, though not everything. 32 patients are ``train``, 8 ``test``.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    x, label, pair, patient, split = [], [], [], [], []
    for p in range(N_PATIENTS):
        for k in range(LESIONS_PER_PATIENT):
            lab = int([1, 2, 3, 4][(p + k) % 4])
            malignant = lab in (2, 4)
            background = rng.normal(90, 12, (SIZE, SIZE))
            cy, cx = rng.uniform(12, 20, 2)
            # Overlapping ranges, so that members disagree and stacking has work to do.
            width = rng.uniform(2.5, 5.0) if malignant else rng.uniform(4.0, 9.0)
            height = rng.uniform(45, 110) if malignant else rng.uniform(25, 70)
            blob = height * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
            lesion = np.clip(background + blob, 0, 255).astype(np.uint8)
            base = np.clip(rng.normal(90, 12, (SIZE, SIZE)), 0, 255).astype(np.uint8)
            i = len(x)
            x += [lesion, base]
            label += [lab, 0]
            pair += [i + 1, i]
            patient += [f"P{p:03d}"] * 2
            split += ["train" if p < 32 else "test"] * 2
    return Dataset.create(np.stack(x), np.array(label), np.array(pair), np.array(patient), np.array(split))


_RUN: dict[str, Path] = {}


def finished_run() -> tuple[Path, Path]:
    """(run directory, dataset path) of one small finished search, built once per process."""
    if "run" not in _RUN:
        from automammo.search import SearchConfig, run_search

        root = Path(tempfile.mkdtemp(prefix="automammo-bundle-tests-"))
        data = small_dataset().save(root / "dataset.npz")
        run_dir = root / "run"
        run_search(SearchConfig(data=str(data), task="benign-malignant", objective="f2", builders=["scratch_cnn"],
                                trials=3, epochs=2, image_size=SIZE, val_fraction=0.25, tensorboard=False,
                                seed=0), run_dir)
        _RUN["run"], _RUN["data"] = run_dir, data
    return _RUN["run"], _RUN["data"]


def finished_bundle() -> Path:
    """A bundle stacked from ``finished_run`` (every meta-learner tried), built once."""
    if "bundle" not in _RUN:
        from automammo.ensemble import ensemble_and_export

        run_dir, _ = finished_run()
        _RUN["bundle"] = ensemble_and_export([run_dir], run_dir.parent / "shared.ammo", top=2).bundle
    return _RUN["bundle"]
