"""What every scaling benchmark shares: the machine's description, tables, JSON results."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU, usable cores, load and library versions: the context every number needs."""
    from automammo.search import versions

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": len(os.sched_getaffinity(0)),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "gpus": _gpus(), "versions": versions(), "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _gpus() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def rss_mb() -> float:
    """Resident set size of this process in MiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def table(headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width table; numbers right-aligned."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def save(name: str, payload: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the machine's description."""
    from automammo.atomic import write_json

    path = RESULTS / f"{name}.json"
    write_json(path, {"benchmark": name, "machine": machine(), **payload})
    return path


def matmul_gflops(n: int = 2048, seconds: float = 3.0) -> float:
    """The machine's float32 matrix-multiply rate with every core: the training ceiling."""
    import tensorflow as tf

    a = tf.random.normal((n, n), seed=1)
    b = tf.random.normal((n, n), seed=2)

    @tf.function
    def step(a, b):
        return tf.reduce_sum(tf.matmul(a, b))

    step(a, b).numpy()  # trace and warm up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(a, b).numpy()
        done += 1
    return 2.0 * n**3 * done / (time.perf_counter() - start) / 1e9
