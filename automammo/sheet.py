"""The contact sheet of a dataset: example lesions beside their baselines, one row per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from automammo.atomic import atomic_path
from automammo.dataset import LABEL_NAMES, Dataset


def contact_sheet(ds: Dataset, out: str | Path, per_class: int = 6, seed: int = 0) -> Path:
    """Write a PNG with up to ``per_class`` examples of each lesion class (lesion | baseline).

    Each patch is shown with its own 1st-99th percentile window, as a radiologist would
    window a film, so that 12-bit data and faint calcifications are visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    classes = [c for c in range(1, 5) if np.any(ds.label == c)] or [0]
    fig, axes = plt.subplots(len(classes), 2 * per_class, figsize=(2 * per_class * 1.1, len(classes) * 1.35),
                             squeeze=False)
    for row, c in zip(axes, classes):
        rows = np.flatnonzero(ds.label == c)
        chosen = rng.choice(rows, min(per_class, len(rows)), replace=False) if len(rows) else []
        for ax in row:
            ax.axis("off")
        for j, i in enumerate(chosen):
            row[2 * j].imshow(_window(ds.x[i]), cmap="gray", vmin=0, vmax=1)
            row[2 * j].set_title(f"#{i}", fontsize=6)
            if ds.pair[i] >= 0:
                row[2 * j + 1].imshow(_window(ds.x[ds.pair[i]]), cmap="gray", vmin=0, vmax=1)
                row[2 * j + 1].set_title("baseline", fontsize=6)
        row[0].text(-0.15, 0.5, LABEL_NAMES[c], transform=row[0].transAxes, rotation=90,
                    va="center", ha="right", fontsize=8)
    fig.suptitle(f"{Path(ds.source).name}: lesion | baseline, {per_class} per class", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def _window(img: np.ndarray) -> np.ndarray:
    img = img.astype(np.float32)
    lo, hi = np.percentile(img, (1, 99))
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
