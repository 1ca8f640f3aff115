"""Built-in importer ``synth``: the digital phantom written as a dataset file.

``automammo data synth OUT.npz [--lesions N] [--size PX] [--difficulty D] [--seed S]
[--test-fraction F]`` simulates lesion patches with adjacent healthy baselines
(see ``automammo.phantom`` and ``docs/phantom.md``).
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from automammo import hookimpl
from automammo.dataset import check_out_path
from automammo.errors import DataError
from automammo.importers import Importer
from automammo.phantom import synthesize


@click.command("synth", help="Simulate a phantom dataset of lesion patches with adjacent "
               "healthy baselines (labels 0-4, CBIS-DDSM coding) and write it to OUT.npz.")
@click.argument("out", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@click.option("--lesions", type=click.IntRange(1, 1_000_000), default=400, show_default=True,
              help="Number of lesions; each also gets a baseline patch.")
@click.option("--size", type=click.IntRange(16, 1024), default=64, show_default=True,
              help="Patch side in pixels.")
@click.option("--difficulty", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="0 = conspicuous textbook lesions, 1 = faint, noisy, overlapping morphology.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Same seed and options give the same file.")
@click.option("--test-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.2,
              show_default=True, help="Fraction of lesions (whole patients) in the test split.")
@click.option("--calc-fraction", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Fraction of lesions that are calcifications.")
@click.option("--malignant-fraction", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Fraction of malignant lesions within each type.")
def synth(out: Path, lesions: int, size: int, difficulty: float, seed: int, test_fraction: float,
          calc_fraction: float, malignant_fraction: float) -> None:
    """Write the phantom to OUT (atomically) and print a one-line summary."""
    try:
        check_out_path(out)
    except DataError as exc:
        raise click.BadParameter(str(exc), param_hint="OUT") from None
    ds = synthesize(n_lesions=lesions, size=size, difficulty=difficulty, seed=seed,
                    test_fraction=test_fraction, calc_fraction=calc_fraction,
                    malignant_fraction=malignant_fraction)
    try:
        ds.save(out)
    except OSError as exc:
        raise DataError(f"{out}: cannot write ({exc.strerror or exc})") from None
    counts = np.bincount(ds.label, minlength=5)
    n_test = int(np.sum(ds.split == "test"))
    click.echo(
        f"wrote {out}: {len(ds)} patches {size}x{size} {ds.x.dtype} ({lesions} lesions + baselines, "
        f"{len(np.unique(ds.patient))} patients), labels 0-4 {'/'.join(map(str, counts))}, "
        f"train {len(ds) - n_test} / test {n_test}, difficulty {difficulty:g}, seed {seed}"
    )


@hookimpl
def automammo_register_importers():
    return [Importer(name="synth", description="digital phantom: simulated lesion patches with "
                     "adjacent healthy baselines (no data needed)", command=synth)]
