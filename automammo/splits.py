"""Patient-grouped, class-stratified splits of the ``train`` part of a dataset."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from automammo.errors import DataError


def grouped_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (fit, validation) position arrays; no group is on both sides of any fold."""
    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise DataError(f"only {n_groups} patients, need at least {k} for {k} folds")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(np.sort(a), np.sort(b)) for a, b in cv.split(np.zeros(len(y)), y, groups)]


def fit_validation_split(y: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int):
    """One grouped, stratified split: (fit positions, validation positions)."""
    if not 0.05 <= val_fraction <= 0.5:
        raise DataError(f"validation fraction must be within 0.05-0.5, got {val_fraction}")
    k = max(2, int(round(1.0 / val_fraction)))
    return grouped_folds(y, groups, k, seed)[0]
