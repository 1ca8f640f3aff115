"""Where a pretrained backbone's weights come from: ImageNet files, a user's file, or none.

``--weights`` takes one of three values:

- ``imagenet``: the exact file Keras itself would download for the backbone without its
  classification top (e.g. ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``), looked
  for, in order, in the weights directory (``--weights-dir`` / ``AUTOMAMMO_WEIGHTS_DIR``),
  then in Keras' own cache (``$KERAS_HOME/models``, by default ``~/.keras/models``), and
  otherwise downloaded into Keras' cache. A file is only used when its hash is the one Keras
  publishes. When none of this works the answer is one ``AutomammoError`` that says which
  file to put where and where to download it from: a pretrained family never falls back to
  random weights silently.
- ``none``: random initialisation (for tests, timing, or data far from natural images).
- ``PATH``: a weights file saved from the same architecture (``.h5`` or ``.weights.h5``),
  e.g. a backbone pretrained on mammograms.

Keras is imported lazily, so that resolving a name costs nothing when nothing is built.
"""

from __future__ import annotations

import functools
import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from automammo.errors import AutomammoError

WEIGHTS_DIR_ENV = "AUTOMAMMO_WEIGHTS_DIR"
KERAS_APPLICATIONS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
IMAGENET, NONE = "imagenet", "none"


@dataclass(frozen=True)
class WeightsFile:
    """One ImageNet weights file as Keras publishes it (the variant without the top).

    Attributes:
        file_name: the exact name Keras saves it under.
        folder: its folder under ``KERAS_APPLICATIONS_URL``.
        file_hash: md5 (32 hex digits) or sha256 (64), as listed in Keras' sources.
    """

    file_name: str
    folder: str
    file_hash: str

    @property
    def url(self) -> str:
        return f"{KERAS_APPLICATIONS_URL}{self.folder}/{self.file_name}"


# Keyed by builder name. The names, folders and hashes are Keras' own (keras/src/applications);
# tests/test_transfer.py checks them against the installed Keras so that a drift is caught.
IMAGENET_FILES: dict[str, WeightsFile] = {
    "vgg16": WeightsFile("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "vgg16",
                         "6d6bbae143d832006294945121d1f1fc"),
    "vgg19": WeightsFile("vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "vgg19",
                         "253f8cb515780f3b799900260a226db6"),
    "resnet50": WeightsFile("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "resnet",
                            "4d473c1dd8becc155b73f8504c6f6626"),
    "inception_v3": WeightsFile("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "inception_v3",
                                "bcbd6486424b2319ff4ef7d526e38f63"),
    "efficientnetv2_b0": WeightsFile("efficientnetv2-b0_notop.h5", "efficientnet_v2",
                                     "893217f2bb855e2983157299931e43ff"),
    "convnext_tiny": WeightsFile("convnext_tiny_notop.h5", "convnext",
                                 "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"),
    "mobilenet_v3_small": WeightsFile("weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", "mobilenet_v3",
                                      "d3e8ec802a04aa4fc771ee12a9a9b836"),
}


def weights_dir(configured: str | os.PathLike | None = None) -> Path | None:
    """The user's weights directory: the configured one, else ``AUTOMAMMO_WEIGHTS_DIR``."""
    chosen = configured or os.environ.get(WEIGHTS_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights: ``$KERAS_HOME/models`` or ``~/.keras/models``."""
    home = os.environ.get("KERAS_HOME") or Path.home() / ".keras"
    return Path(home).expanduser() / "models"


def search_dirs(configured: str | os.PathLike | None = None) -> list[Path]:
    """The folders an ImageNet file is looked for in, in order."""
    user = weights_dir(configured)
    return [d for d in (user, keras_cache_dir()) if d is not None]


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _digest_cached(path: str, size: int, mtime_ns: int, algorithm: str) -> str:
    # Keyed by size and mtime too, so a replaced file is hashed again; every trial builds
    # its backbone afresh and would otherwise re-hash up to 100 MB each time.
    return file_digest(Path(path), algorithm)


def matches_hash(path: Path, file_hash: str) -> bool:
    """True when ``path`` has the published hash (md5 or sha256, told apart by length)."""
    algorithm = "sha256" if len(file_hash) == 64 else "md5"
    st = path.stat()
    return _digest_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, algorithm) == file_hash


def find_imagenet(builder: str, configured_dir: str | os.PathLike | None = None) -> Path | None:
    """The local ImageNet file of ``builder`` with the published hash, or None.

    Raises:
        AutomammoError: the weights directory holds a file of the right name whose hash is
            wrong (truncated download, top-included variant renamed, ...).
    """
    spec = IMAGENET_FILES[builder]
    user = weights_dir(configured_dir)
    for folder in search_dirs(configured_dir):
        candidate = folder / spec.file_name
        if not candidate.is_file():
            continue
        if matches_hash(candidate, spec.file_hash):
            return candidate
        if folder == user:
            # The user put this file here on purpose: say so rather than skip it quietly.
            raise AutomammoError(
                f"{candidate} is not the published {builder} ImageNet file (hash differs from "
                f"{spec.file_hash}); download it again from {spec.url}"
            )
        # A stale copy in Keras' cache: Keras itself would download over it, and so do we.
    return None


def download(spec: WeightsFile) -> Path:
    """Fetch ``spec`` into Keras' cache with Keras' own downloader, which checks the hash."""
    import keras

    cache = keras_cache_dir()
    path = keras.utils.get_file(spec.file_name, spec.url, cache_subdir=cache.name,
                                cache_dir=str(cache.parent), file_hash=spec.file_hash)
    return Path(path)


def reachable(url: str) -> str | None:
    """None when ``url``'s server answers; otherwise the reason, one line.

    Asked once per server and process: every backbone's file lives on the same host, so a
    default search offline waits for at most one failed probe, not one per backbone.
    """
    return _probe(urllib.parse.urlsplit(url)._replace(path="/", query="", fragment="").geturl())


@functools.lru_cache(maxsize=8)
def _probe(url: str, timeout: float = 5.0) -> str | None:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered, if only to say no: the network is there
    except (OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))
    return None


def missing_message(builder: str, configured_dir: str | os.PathLike | None, why: str) -> str:
    """The one-line error for ImageNet weights that cannot be had."""
    spec = IMAGENET_FILES[builder]
    user = weights_dir(configured_dir)
    where = (f"{user} (the weights directory)" if user else
             f"a folder named by --weights-dir or {WEIGHTS_DIR_ENV}")
    return (
        f"ImageNet weights for {builder} are not available ({why}): download {spec.file_name} "
        f"from {spec.url} and put it in {where} or in {keras_cache_dir()}, "
        "or pass --weights none to train from random initialisation"
    )


def resolve(builder: str, weights: str, configured_dir: str | os.PathLike | None = None) -> Path | None:
    """The file to load into ``builder``'s backbone; None means random initialisation.

    Args:
        builder: a builder name with an entry in ``IMAGENET_FILES``.
        weights: ``"imagenet"``, ``"none"`` or a path to a weights file.
        configured_dir: the weights directory option (``BuildContext.weights_dir``).

    Raises:
        AutomammoError: ImageNet weights that are neither on disk nor downloadable, or a
            path that does not exist.
    """
    kind = weights_kind(weights)
    if kind == NONE:
        return None
    if kind == "path":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise AutomammoError(f"--weights {weights}: no such file")
        return path
    local = find_imagenet(builder, configured_dir)
    if local is not None:
        return local
    try:
        return download(IMAGENET_FILES[builder])
    except Exception as exc:  # noqa: BLE001 - urllib, HTTP and hash errors all mean "cannot be had"
        raise AutomammoError(missing_message(builder, configured_dir, _one_line(exc))) from None


def unavailable(builder: str, weights: str, configured_dir: str | os.PathLike | None = None) -> str | None:
    """Why ``builder`` cannot get its weights now, without downloading anything; None if it can.

    ImageNet weights count as available when the file is on disk or its server answers (the
    download then happens when the first trial builds the model).
    """
    kind = weights_kind(weights)
    if kind == NONE:
        return None
    if kind == "path":
        return None if Path(weights).expanduser().is_file() else f"--weights {weights}: no such file"
    try:
        if find_imagenet(builder, configured_dir) is not None:
            return None
    except AutomammoError as exc:
        return str(exc)
    why = reachable(IMAGENET_FILES[builder].url)
    return None if why is None else missing_message(builder, configured_dir, f"offline: {why}")


def weights_kind(weights: str) -> str:
    """``"imagenet"``, ``"none"`` or ``"path"``."""
    value = str(weights).strip()
    if value.lower() == IMAGENET:
        return IMAGENET
    if value.lower() == NONE:
        return NONE
    return "path"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
