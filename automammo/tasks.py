"""Tasks: views over the 0-4 labels of a dataset, never copies of it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from automammo.dataset import Dataset
from automammo.errors import DataError, UnknownNameError


@dataclass(frozen=True)
class Task:
    """One question asked of the patches.

    Attributes:
        name: the CLI name.
        classes: class names, index = model output.
        mapping: dataset label (0-4) -> class index; labels not in it are left out.
        positive: for binary tasks, the class a missed case is costly for (F2, sensitivity).
        description: one line.
    """

    name: str
    classes: tuple[str, ...]
    mapping: dict[int, int]
    positive: int | None
    description: str

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def binary(self) -> bool:
        return self.n_classes == 2

    @property
    def lesions_only(self) -> bool:
        """True when every sample is a lesion, so a baseline partner can be an input."""
        return 0 not in self.mapping

    def targets(self, label: np.ndarray) -> np.ndarray:
        """Class index per sample, -1 where the task leaves the sample out."""
        lut = np.full(5, -1, dtype=np.int64)
        for raw, cls in self.mapping.items():
            lut[raw] = cls
        return lut[np.asarray(label, dtype=np.int64)]

    def indices(self, ds: Dataset, split: str | None = None) -> np.ndarray:
        keep = self.targets(ds.label) >= 0
        if split is not None:
            keep &= ds.split == split
        return np.flatnonzero(keep)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("mass-calcification", ("mass", "calcification"), {1: 0, 2: 0, 3: 1, 4: 1}, 1,
             "lesion type: mass or calcification"),
        Task("benign-malignant", ("benign", "malignant"), {1: 0, 3: 0, 2: 1, 4: 1}, 1,
             "pathology of a lesion: benign or malignant"),
        Task("diagnosis", ("mass benign", "mass malignant", "calcification benign",
                           "calcification malignant"), {1: 0, 2: 1, 3: 2, 4: 3}, None,
             "the 4-way diagnosis of a lesion"),
        Task("abnormality", ("baseline", "lesion"), {0: 0, 1: 1, 2: 1, 3: 1, 4: 1}, 1,
             "healthy tissue (baseline) or a lesion"),
        Task("type-with-baseline", ("baseline", "mass", "calcification"),
             {0: 0, 1: 1, 2: 1, 3: 2, 4: 2}, None,
             "baseline, mass or calcification"),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UnknownNameError("task", name, TASKS)
    return TASKS[name]


def check_classes(task: Task, y: np.ndarray, where: str, source: str) -> None:
    """Refuse a split in which a class of the task has no sample."""
    counts = np.bincount(y, minlength=task.n_classes)
    empty = [task.classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(
            f"{source}: task {task.name} has no '{empty[0]}' samples in {where} "
            f"(counts {dict(zip(task.classes, counts.tolist()))})"
        )
