"""The on-disk cache of a frozen backbone's features, so that a frozen phase trains the head alone.

While a pretrained base is frozen its output does not change between epochs, nor between
trials that share the backbone, its weights, the image size and the data: it is computed
once, stored under the run (``<run>/cache/features/``) and read back by every such trial.

Augmentation stays exact. The default augmentation draws one of the 8 symmetries of the
square (rot90 x flip, ``automammo.preprocess.augment_fn``) per patch per epoch; a CNN is not
equivariant to them (padding, strides), so the cache holds the features of all 8 transformed
copies of every fit patch, and each epoch draws one variant per patch, uniformly, exactly as
the image pipeline would. Validation patches are never augmented: one variant.

What is stored is the pooled head input, not the raw feature map: global average and max
pooling (a few thousand floats per patch, computed together in one pass), or the flattened
map when a trial's head flattens. An entry is a folder:

```
<root>/<digest>/
  meta.json   the key, shapes, dtype and the seconds the base took
  fit.npy     (variants, n_fit, features) float32
  val.npy     (n_val, features) float32
```

written beside its final name and renamed into place, so a reader never sees half of one;
arrays are memory-mapped when read, so an entry larger than RAM still works.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from automammo.atomic import atomic_dir, write_json

FORMAT_VERSION = 1
N_SYMMETRIES = 8
POOLINGS = ("avg", "max", "flatten")
# Computed together whenever the base runs: they cost a reduction each, not a forward pass.
CHEAP_POOLINGS = ("avg", "max")


def symmetry(x: np.ndarray, variant: int) -> np.ndarray:
    """The ``variant``-th (0-7) exact symmetry of (N, S, S, C) images.

    ``variant = 2 * k + flip``: rotate by ``k`` quarter turns counter-clockwise, then mirror
    left-right when ``flip``; the order ``tf.image.rot90`` then ``flip_left_right`` of the
    image pipeline. Variant 0 is the identity.
    """
    if not 0 <= variant < N_SYMMETRIES:
        raise ValueError(f"symmetry variant must be 0-7, got {variant}")
    out = np.rot90(x, variant // 2, axes=(1, 2))
    if variant % 2:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def pool(feature_map: np.ndarray, pooling: str) -> np.ndarray:
    """(N, h, w, c) -> (N, D) the way the head's first layer reduces it.

    ``avg`` and ``max`` equal Keras' ``GlobalAveragePooling2D`` / ``GlobalMaxPooling2D``,
    ``flatten`` equals ``Flatten`` (row-major, channels last).
    """
    if pooling == "avg":
        return feature_map.mean(axis=(1, 2), dtype=np.float32)
    if pooling == "max":
        return feature_map.max(axis=(1, 2))
    if pooling == "flatten":
        return feature_map.reshape(len(feature_map), -1)
    raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")


_fingerprints: dict[int, tuple[weakref.ref, str]] = {}


def fingerprint(*arrays: np.ndarray) -> str:
    """sha256 over the arrays' dtypes, shapes and bytes.

    Memoised per array object while it lives: a search hashes the same (up to several
    hundred MB) fit and validation arrays in every trial otherwise. The arrays of a search
    are never modified in place, which is what makes the memo safe.
    """
    h = hashlib.sha256()
    for arr in arrays:
        h.update(_array_digest(arr).encode())
    return h.hexdigest()


def _array_digest(arr: np.ndarray) -> str:
    known = _fingerprints.get(id(arr))
    if known is not None and known[0]() is arr:
        return known[1]
    a = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    digest = h.hexdigest()
    try:
        _fingerprints[id(arr)] = (weakref.ref(arr, lambda _, key=id(arr): _fingerprints.pop(key, None)), digest)
    except TypeError:  # not weak-referenceable (a view of a foreign buffer): just do not memoise
        pass
    return digest


def weights_fingerprint(weights: list[np.ndarray]) -> str:
    """sha256 of a model's weight values: what the features really depend on.

    Hashing the values rather than naming the source catches every way a base can differ
    (another file, a seed, a checkpoint that fine-tuned it) at the cost of one pass over them.
    """
    return fingerprint(*weights)


@dataclass(frozen=True)
class FeatureKey:
    """What one cache entry's features depend on.

    Attributes:
        backbone: the builder name (architecture).
        weights: ``weights_fingerprint`` of the frozen base.
        image_size: side of the input patches.
        data: ``fingerprint`` of the fit and validation patches, in order.
        pooling: one of ``POOLINGS``.
        variants: 8 when fit features cover the 8 symmetries, 1 without augmentation.
    """

    backbone: str
    weights: str
    image_size: int
    data: str
    pooling: str
    variants: int

    def digest(self) -> str:
        payload = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]


@dataclass
class Features:
    """One entry's arrays.

    Attributes:
        fit: (variants, n_fit, D) float32; ``fit[v, i]`` is patch ``i`` under symmetry ``v``.
        val: (n_val, D) float32.
        hit: read from disk (True) or computed by this call (False).
        seconds: time the base took when computed (recorded in the entry).
        path: the entry's folder, None when not persisted.
    """

    fit: np.ndarray
    val: np.ndarray
    hit: bool
    seconds: float
    path: Path | None


Extract = Callable[[np.ndarray], np.ndarray]


class FeatureCache:
    """Cached frozen-base features under ``root``; ``root=None`` computes without storing.

    Args:
        root: the cache folder, normally ``<run>/cache/features``.
        chunk: images per call to the extract function (bounds memory, not speed).
    """

    def __init__(self, root: str | Path | None, chunk: int = 256):
        self.root = Path(root) if root is not None else None
        self.chunk = chunk

    def entry_path(self, key: FeatureKey) -> Path | None:
        return None if self.root is None else self.root / key.digest()

    def load(self, key: FeatureKey, n_fit: int, n_val: int) -> Features | None:
        """The stored entry for ``key`` if there is a complete, matching one."""
        path = self.entry_path(key)
        if path is None or not (path / "meta.json").is_file():
            return None
        try:
            meta = json.loads((path / "meta.json").read_text())
            fit = np.load(path / "fit.npy", mmap_mode="r")
            val = np.load(path / "val.npy", mmap_mode="r")
        except (OSError, ValueError):
            return None  # unreadable: recomputed and replaced below
        if meta.get("key") != asdict(key) or fit.shape[:2] != (key.variants, n_fit) or len(val) != n_val:
            return None
        return Features(fit, val, True, float(meta.get("seconds", 0.0)), path)

    def get(self, key: FeatureKey, x_fit: np.ndarray, x_val: np.ndarray, extract: Extract) -> Features:
        """The features of ``key``: read if stored, else computed with ``extract`` and stored.

        Args:
            key: what the features depend on; ``key.pooling`` is the pooling wanted.
            x_fit, x_val: (N, S, S, 1) patches the key's ``data`` fingerprint describes.
            extract: (n, S, S, 1) patches -> (n, h, w, c) feature maps of the frozen base.

        Returns:
            The entry of ``key.pooling``. On a miss, the cheap poolings (avg, max) missing
            from the cache are computed in the same pass and stored too, so that trials
            with another pooling find them.
        """
        found = self.load(key, len(x_fit), len(x_val))
        if found is not None:
            return found
        wanted = [key.pooling] + [p for p in CHEAP_POOLINGS if p != key.pooling]
        keys = {p: _with_pooling(key, p) for p in wanted}
        keys = {p: k for p, k in keys.items()
                if p == key.pooling or self.load(k, len(x_fit), len(x_val)) is None}
        return self._compute(keys, x_fit, x_val, extract)[key.pooling]

    def _compute(self, keys: dict[str, FeatureKey], x_fit, x_val, extract: Extract) -> dict[str, Features]:
        variants = next(iter(keys.values())).variants
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            folders = {p: (stack.enter_context(atomic_dir(self.entry_path(k))) if self.root is not None else None)
                       for p, k in keys.items()}
            fit = _Sink(folders, "fit.npy", (variants, len(x_fit)))
            val = _Sink(folders, "val.npy", (len(x_val),))
            for v in range(variants):
                for lo in range(0, len(x_fit), self.chunk):
                    maps = np.asarray(extract(symmetry(x_fit[lo:lo + self.chunk], v)), dtype=np.float32)
                    fit.write((v, slice(lo, lo + len(maps))), maps)
            for lo in range(0, len(x_val), self.chunk):
                maps = np.asarray(extract(x_val[lo:lo + self.chunk]), dtype=np.float32)
                val.write((slice(lo, lo + len(maps)),), maps)
            seconds = time.perf_counter() - start
            out = {}
            for p, k in keys.items():
                fit_arr, val_arr = fit.close(p), val.close(p)
                if folders[p] is not None:
                    write_json(folders[p] / "meta.json", {
                        "format": FORMAT_VERSION, "key": asdict(k), "fit_shape": list(fit_arr.shape),
                        "val_shape": list(val_arr.shape), "dtype": "float32", "seconds": round(seconds, 3),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    })
                out[p] = (fit_arr, val_arr)
        result = {}
        for p, k in keys.items():
            # Persisted entries are handed out as read-only maps of their final files.
            stored = self.load(k, len(x_fit), len(x_val)) if self.root is not None else None
            fit_arr, val_arr = (stored.fit, stored.val) if stored is not None else out[p]
            result[p] = Features(fit_arr, val_arr, False, seconds, self.entry_path(k) if stored else None)
        return result


def _with_pooling(key: FeatureKey, pooling: str) -> FeatureKey:
    return FeatureKey(key.backbone, key.weights, key.image_size, key.data, pooling, key.variants)


class _Sink:
    """One array per pooling, filled chunk by chunk: a .npy memory map in each entry's
    temporary folder, or memory when nothing is persisted. Shapes are known from the first
    chunk, since the feature width depends on the backbone and the image size."""

    def __init__(self, folders: dict[str, Path | None], file_name: str, lead: tuple[int, ...]):
        self.folders, self.file_name, self.lead = folders, file_name, lead
        self.arrays: dict[str, np.ndarray] = {}

    def write(self, index: tuple, maps: np.ndarray) -> None:
        for p, folder in self.folders.items():
            pooled = pool(maps, p)
            if p not in self.arrays:
                shape = (*self.lead, pooled.shape[1])
                self.arrays[p] = (np.lib.format.open_memmap(folder / self.file_name, mode="w+",
                                                            dtype=np.float32, shape=shape)
                                  if folder is not None else np.empty(shape, np.float32))
            self.arrays[p][index] = pooled

    def close(self, pooling: str) -> np.ndarray:
        arr = self.arrays.get(pooling)
        if arr is None:  # no images at all: an empty entry of unknown width
            arr = np.zeros((*self.lead, 0), np.float32)
            if self.folders[pooling] is not None:
                np.save(self.folders[pooling] / self.file_name, arr)
        if isinstance(arr, np.memmap):
            arr.flush()
        return arr
