"""The example third-party plugin package: listed, searched with, exported, reloaded elsewhere.

CI installs ``examples/automammo-example-plugin`` (the README's test command); this test
fails, rather than skips, when it is missing, because it is what proves the plugin path.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from automammo import registry
from automammo.cli import cli
from automammo.search import SearchConfig, run_search


def test_listed_with_its_package():
    registry.reset()
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    found = {(kind, r["name"]): r["package"] for kind, rows in out.items() if kind != "failures" for r in rows}
    assert found[("builder", "tiny_resnet")] == "automammo-example-plugin"
    assert found[("objective", "youden_j")] == "automammo-example-plugin"
    assert found[("meta-learner", "nnls_mean")] == "automammo-example-plugin"
    assert not [f for f in out["failures"] if f["package"] == "automammo-example-plugin"]


def test_youden_j_against_a_direct_count():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p1 = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.4])
    j = registry.objectives()["youden_j"](y, np.stack([1 - p1, p1], 1), 1, 0.5)
    assert j == np.float64(2 / 3 + 3 / 4 - 1)


def test_youden_j_vectorised_sweep_equals_one_call_per_threshold():
    from automammo.objectives import THRESHOLDS

    obj = registry.objectives()["youden_j"]
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    p1 = np.round(rng.uniform(0, 1, 120), 2)
    p = np.stack([1 - p1, p1], 1)
    np.testing.assert_allclose(obj.sweep(y, p, 1), [obj(y, p, 1, t) for t in THRESHOLDS], atol=1e-12)
    assert np.isnan(obj.sweep(np.ones(5, int), p[:5], 1)).all()


def test_search_ensemble_and_fresh_process_reload(tmp_path, small_dataset_path, small_dataset):
    from automammo.ensemble import ensemble_and_export

    run_dir = tmp_path / "run"
    result = run_search(SearchConfig(data=str(small_dataset_path), task="benign-malignant", objective="youden_j",
                                     builders=["tiny_resnet"], trials=2, epochs=2, image_size=32,
                                     tensorboard=False), run_dir)
    assert {t["builder"] for t in result.trials} == {"tiny_resnet"}
    assert all("youden_j" in t["metrics"] for t in result.trials if t["status"] == "COMPLETED")
    out = tmp_path / "example.ammo"
    made = ensemble_and_export([run_dir], out, meta="nnls_mean", top=2, replicates=50)
    assert made.meta == "nnls_mean"
    rows = np.flatnonzero((small_dataset.split == "test") & (small_dataset.label > 0))[:6]
    here = _predict(out, small_dataset.x[rows])
    script = ("import sys, json, numpy as np\n"
              "from automammo.bundle import Bundle\n"
              "x = np.load(sys.argv[2])\n"
              "print(json.dumps(Bundle.load(sys.argv[1]).predict_proba(x).tolist()))\n")
    np.save(tmp_path / "x.npy", small_dataset.x[rows])
    proc = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    there = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(there, here, atol=1e-5)


def _predict(path, x):
    from automammo.bundle import Bundle

    return Bundle.load(path).predict_proba(x)


def test_end_to_end_example_script_runs(tmp_path):
    """examples/end_to_end.py: phantom -> search -> ensemble -> evaluate -> report."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "end_to_end.py"
    module = runpy.run_path(str(script))
    out = module["main"]([str(tmp_path / "e2e"), "--lesions", "60", "--size", "32", "--trials", "2",
                          "--epochs", "2", "--builder", "scratch_cnn"])
    assert (tmp_path / "e2e" / "model.ammo" / "manifest.json").exists()
    evaluation = json.loads((tmp_path / "e2e" / "evaluation.json").read_text())
    assert evaluation["split"] == "test"
    assert out["plots"]["written"], out["plots"]
    for item in out["plots"]["written"]:
        assert Path(item["file"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
