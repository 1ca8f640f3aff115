"""Run every scaling benchmark, one after the other, each in its own process.

Each benchmark prints its table and writes ``benchmarks/results/<name>.json``. They run in
separate processes so that one's TensorFlow state (threads, memory, precision policy) does
not colour the next one's numbers, and one after the other because each wants every core.

Usage::

    python benchmarks/run_all.py                           # all five, default sizes
    python benchmarks/run_all.py throughput memory         # some of them
    python benchmarks/run_all.py workers -- --trials 20    # options after -- go to each one
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("throughput", "input_pipeline", "search_to_target", "memory", "workers")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    names = (argv[:argv.index("--")] if "--" in argv else argv) or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        start = time.time()
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py"), *extra])
        print(f"=== {name}: {'ok' if code == 0 else f'exit code {code}'} in {time.time() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
