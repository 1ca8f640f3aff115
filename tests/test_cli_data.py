"""`automammo data info` and the contact sheet."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from automammo.cli import cli


def test_info_counts_and_sheet(tmp_path, small_dataset, small_dataset_path):
    sheet = tmp_path / "sheet.png"
    result = CliRunner().invoke(cli, ["data", "info", str(small_dataset_path), "--sheet", str(sheet)])
    assert result.exit_code == 0, result.output
    n_train_mm = int(np.sum((small_dataset.label == 2) & (small_dataset.split == "train")))
    assert "mass malignant" in result.output and str(n_train_mm) in result.output
    for task in ("benign-malignant", "type-with-baseline", "diagnosis"):
        assert task in result.output
    assert "pixels" in result.output
    data = sheet.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(sheet)
    assert img.shape[0] > 100 and img[..., :3].std() > 0.05


def test_info_bad_file_exit_2(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("hello")
    result = CliRunner().invoke(cli, ["data", "info", str(bad)])
    assert result.exit_code == 2
    assert "bad.npz" in result.output and "Traceback" not in result.output
