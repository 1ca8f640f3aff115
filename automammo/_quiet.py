"""TensorFlow's start-up notices, kept off a CLI user's terminal.

Importing TensorFlow prints absl INFO lines from C++ (oneDNN, CUDA probing, CPU
instructions) before its logging is configured, so ``TF_CPP_MIN_LOG_LEVEL`` cannot silence
them. :func:`install` adds an import hook that runs the first ``import tensorflow``
(whoever triggers it: Keras, Keras Tuner, a plugin) with file descriptor 2 captured, then
writes back every captured line except those notices: warnings, errors and tracebacks
still reach the terminal. TensorFlow is imported no sooner than before.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

_NOTICE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} [\d:.]+ +\d+ \S+:\d+\] .*"
    r"|To enable the following instructions: .*in other operations, rebuild TensorFlow with the "
    r"appropriate compiler flags\.)$")


def is_notice(line: str) -> bool:
    """True for TensorFlow's start-up INFO lines (``I0000 ...``) and absl's preamble."""
    return bool(_NOTICE.match(line.rstrip("\n")))


@contextlib.contextmanager
def filtered_stderr():
    """Capture file descriptor 2 for the block; write back all but the notices."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            lines = _join_cpu_notice(text.splitlines(keepends=True))
            kept = "".join(line for line in lines if not is_notice(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def _join_cpu_notice(lines: list[str]) -> list[str]:
    """TensorFlow's CPU-instructions notice is one message over two lines."""
    out: list[str] = []
    for line in lines:
        if out and out[-1].startswith("To enable the following instructions:") and not out[-1].rstrip(
                "\n").endswith("flags."):
            out[-1] = out[-1].rstrip("\n") + " " + line
        else:
            out.append(line)
    return out


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        uninstall()
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = self.loader
        with filtered_stderr():
            self.loader.exec_module(module)


_finder = _Finder()


def install() -> None:
    """Filter the first ``import tensorflow`` of this process (no-op once imported)."""
    if "tensorflow" not in sys.modules and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
