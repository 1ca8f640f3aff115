"""Fuzzing: mutated bytes of a dataset.npz and of a bundle's manifest give a clean error or a
correct result, never a crash or a hang."""

from __future__ import annotations

import shutil
import signal
from contextlib import contextmanager

import numpy as np
import pytest

from automammo.dataset import load
from automammo.errors import AutomammoError

CASES = 60


@contextmanager
def deadline(seconds: int):
    def _hang(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _mutations(data: bytes, rng: np.random.Generator):
    for i in range(CASES):
        buf = bytearray(data)
        kind = i % 4
        if kind == 0:  # flip a few random bytes
            for pos in rng.integers(0, len(buf), rng.integers(1, 8)):
                buf[pos] ^= int(rng.integers(1, 256))
        elif kind == 1:  # truncate
            buf = buf[: int(rng.integers(0, len(buf)))]
        elif kind == 2:  # overwrite a run of bytes
            pos = int(rng.integers(0, len(buf)))
            buf[pos:pos + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        else:  # duplicate a slice
            a, b = sorted(rng.integers(0, len(buf), 2))
            buf = buf[:b] + buf[a:b] + buf[b:]
        yield i, bytes(buf)


def test_mutated_dataset_npz(tmp_path, small_dataset):
    original = small_dataset.save(tmp_path / "good.npz").read_bytes()
    rng = np.random.default_rng(0)
    outcomes = {"error": 0, "loaded": 0}
    for i, data in _mutations(original, rng):
        path = tmp_path / f"m{i}.npz"
        path.write_bytes(data)
        with deadline(20):
            try:
                ds = load(path)
            except AutomammoError as exc:
                msg = str(exc)
                assert str(path) in msg and "\n" not in msg
                outcomes["error"] += 1
                continue
        # Loaded: then it validated, so every invariant holds.
        assert ds.x.dtype in (np.uint8, np.uint16) and ds.x.ndim == 3
        assert np.all((ds.label >= 0) & (ds.label <= 4))
        linked = ds.pair >= 0
        assert np.all(ds.pair[ds.pair[linked]] == np.flatnonzero(linked))
        outcomes["loaded"] += 1
    assert outcomes["error"] > CASES // 2


def test_mutated_bundle_manifest(tmp_path):
    from _fixtures_bundle import finished_bundle, small_dataset as bundle_dataset

    from automammo.bundle import Bundle

    source = finished_bundle()
    x = bundle_dataset().x[:4]
    reference = Bundle.load(source).predict_proba(x)
    manifest = (source / "manifest.json").read_bytes()
    rng = np.random.default_rng(1)
    refused = 0
    for i, data in _mutations(manifest, rng):
        if i >= 30:
            break
        copy = tmp_path / f"b{i}.ammo"
        shutil.copytree(source, copy)
        (copy / "manifest.json").write_bytes(data)
        with deadline(60):
            try:
                bundle = Bundle.load(copy)
            except AutomammoError as exc:
                assert "\n" not in str(exc)
                refused += 1
                continue
            # A mutation the loader accepted must not change what the bundle computes
            # beyond what the manifest legitimately controls (the threshold, names).
            np.testing.assert_allclose(bundle.predict_proba(x), reference, atol=1e-6)
    assert refused >= 20
