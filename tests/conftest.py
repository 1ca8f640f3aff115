"""Shared fixtures: small datasets in the real format, built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from automammo.dataset import Dataset


def make_dataset(n_pairs: int = 80, size: int = 32, seed: int = 0, test_fraction: float = 0.25,
                 dtype=np.uint16) -> Dataset:
    """Lesion/baseline pairs whose classes are learnable: brightness blob = malignant,
    speckle grid = calcification. Not realistic (that is the phantom's job), but fast.
    """
    rng = np.random.default_rng(seed)
    top = 4095 if dtype == np.uint16 else 255
    x, label, pair, patient, split = [], [], [], [], []
    n_patients = max(8, n_pairs // 2)
    for i in range(n_pairs):
        lab = 1 + i % 4
        base = rng.normal(0.35 * top, 0.08 * top, (size, size))
        lesion = base.copy()
        c = size // 2
        yy, xx = np.mgrid[:size, :size]
        if lab in (2, 4):
            lesion += 0.3 * top * np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / (2 * (size / 6) ** 2))
        if lab in (3, 4):
            lesion[::4, ::4] += 0.4 * top
        p = f"P{i % n_patients:03d}"
        x += [base, lesion]
        label += [0, lab]
        pair += [2 * i + 1, 2 * i]
        patient += [p, p]
    patient = np.array(patient)
    ids = np.unique(patient)
    test_ids = set(rng.choice(ids, max(2, int(len(ids) * test_fraction)), replace=False))
    split = np.where(np.isin(patient, list(test_ids)), "test", "train")
    x = np.clip(np.array(x), 0, top).astype(dtype)
    return Dataset.create(x, np.array(label), np.array(pair), patient, split, source="fixture")


@pytest.fixture(scope="session")
def small_dataset() -> Dataset:
    return make_dataset()


@pytest.fixture(scope="session")
def small_dataset_path(tmp_path_factory, small_dataset):
    path = tmp_path_factory.mktemp("data") / "small.npz"
    small_dataset.save(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # The phantom cache and Keras' own cache must never touch the user's home in tests.
    cache = tmp_path_factory.getbasetemp() / "automammo-cache"
    monkeypatch.setenv("AUTOMAMMO_CACHE", str(cache))
