"""Turning stored patches into model inputs, and the tf.data pipelines that feed a trial.

Deterministic steps (scale by bit depth, optional contrast stretch, resize) run once per
search; the random ones (augmentation) run in tf.data on fit data only, every epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from automammo.errors import DataError


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to turn raw pixels into a model input the same way at predict time.

    Attributes:
        image_size: side of the square model input, in pixels.
        scale_max: raw value that maps to 1.0 (255 for 8-bit, 4095 for 12-bit data, ...).
        contrast_stretch: stretch each patch's 2nd-98th percentile to [0, 1].
    """

    image_size: int
    scale_max: float
    contrast_stretch: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["image_size"]), float(d["scale_max"]), bool(d.get("contrast_stretch", False)))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, H, W) raw patches -> (N, S, S, 1) float32 in [0, 1]."""
        x = np.asarray(x)
        if x.ndim == 2:
            x = x[None]
        if x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]
        if x.ndim != 3:
            raise DataError(f"expected patches of shape (N, H, W), got {x.shape}")
        out = np.clip(x.astype(np.float32) / np.float32(self.scale_max), 0.0, 1.0)
        if self.contrast_stretch:
            out = contrast_stretch(out)
        return resize(out, self.image_size)[..., None]


def bit_depth_scale(x: np.ndarray) -> float:
    """The full-scale value of the data's bit depth: 16-bit files often hold 10-14 bits."""
    if x.dtype == np.uint8:
        return 255.0
    peak = int(x.max()) if x.size else 0
    for bits in (8, 10, 12, 14, 16):
        if peak < 2**bits:
            return float(2**bits - 1)
    return float(np.iinfo(x.dtype).max)


def contrast_stretch(x: np.ndarray, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """Per-patch percentile stretch to [0, 1] (scikit-image's ``rescale_intensity``)."""
    from skimage.exposure import rescale_intensity

    out = np.empty_like(x, dtype=np.float32)
    for i, img in enumerate(x):
        lo, hi = np.percentile(img, (low, high))
        if hi <= lo:
            out[i] = img
        else:
            out[i] = rescale_intensity(img, in_range=(lo, hi), out_range=(0.0, 1.0))
    return out


def resize(x: np.ndarray, size: int, batch: int = 512) -> np.ndarray:
    """(N, H, W) float32 -> (N, size, size), area-aware bilinear; a no-op at native size."""
    if x.shape[1:3] == (size, size):
        return x.astype(np.float32, copy=False)
    import tensorflow as tf

    parts = []
    for start in range(0, len(x), batch):
        chunk = tf.convert_to_tensor(x[start:start + batch, ..., None])
        parts.append(tf.image.resize(chunk, (size, size), antialias=True).numpy()[..., 0])
    return np.clip(np.concatenate(parts), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Augmentation:
    """Random changes applied to fit data only.

    Attributes:
        symmetries: the 8 exact symmetries of the square (rot90 x flip); no interpolation,
            so no texture is invented.
        rotation: free rotation range in degrees (0 = off).
        shift: translation range as a fraction of the side (0 = off).
        zoom: zoom range as a fraction (0 = off).
    """

    symmetries: bool = True
    rotation: float = 0.0
    shift: float = 0.0
    zoom: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def only_symmetries(self) -> bool:
        return not (self.rotation or self.shift or self.zoom)


def augment_fn(aug: Augmentation, seed: int):
    """A batched tf function ((B, S, S, C), seed[2]) -> (B, S, S, C); channels move together.

    The symmetries use stateless random ops fed by a seeded stream, so the same search seed
    gives the same augmentation in every trial, whatever ran before it in the process.
    """
    import keras
    import tensorflow as tf

    layers = []
    if aug.rotation:
        layers.append(keras.layers.RandomRotation(aug.rotation / 360.0, fill_mode="reflect", seed=seed))
    if aug.shift:
        layers.append(keras.layers.RandomTranslation(aug.shift, aug.shift, fill_mode="reflect", seed=seed + 1))
    if aug.zoom:
        layers.append(keras.layers.RandomZoom(aug.zoom, fill_mode="reflect", seed=seed + 2))

    def symmetry(args):
        img, k, flip = args
        img = tf.image.rot90(img, k)
        return tf.cond(flip, lambda: tf.image.flip_left_right(img), lambda: img)

    def apply(batch, op_seed):
        if aug.symmetries:
            n = tf.shape(batch)[0]
            k = tf.random.stateless_uniform([n], op_seed, minval=0, maxval=4, dtype=tf.int32)
            flip = tf.random.stateless_uniform([n], op_seed + 1) < 0.5
            batch = tf.map_fn(symmetry, (batch, k, flip), fn_output_signature=batch.dtype)
        for layer in layers:
            batch = layer(batch, training=True)
        return batch

    return apply


class TrialData:
    """Fit and validation arrays of one search, and the tf.data pipelines built from them.

    Args:
        x_fit, x_val: (N, S, S, 1) float32 preprocessed lesion (or single) patches.
        y_fit, y_val: (N,) int class indices of the task.
        b_fit, b_val: (N, S, S, 1) baseline partners aligned with x, or None when the task
            or data has none (pair builders then cannot run).
        n_classes: classes of the task.
        augmentation: what to apply to fit batches.
        seed: shuffling and augmentation seed.
    """

    def __init__(self, x_fit, y_fit, x_val, y_val, n_classes, augmentation=Augmentation(),
                 b_fit=None, b_val=None, seed=0):
        self.x_fit, self.y_fit, self.x_val, self.y_val = x_fit, y_fit, x_val, y_val
        self.b_fit, self.b_val = b_fit, b_val
        self.n_classes = n_classes
        self.augmentation = augmentation
        self.seed = seed
        self._stacked: dict[str, np.ndarray] = {}

    @property
    def has_pairs(self) -> bool:
        return self.b_fit is not None and self.b_val is not None

    def inputs(self, part: str, pair: bool):
        """The model inputs of ``part`` ('fit' or 'val') as numpy arrays."""
        x = self.x_fit if part == "fit" else self.x_val
        if not pair:
            return x
        if not self.has_pairs:
            raise DataError("this task or dataset has no baseline partners; pair builders cannot run")
        b = self.b_fit if part == "fit" else self.b_val
        return {"lesion": x, "baseline": b}

    def dataset(self, part: str, batch_size: int, pair: bool = False, training: bool | None = None):
        """A batched, prefetched tf.data pipeline; shuffled and augmented when training."""
        import tensorflow as tf

        training = (part == "fit") if training is None else training
        x = self.x_fit if part == "fit" else self.x_val
        y = self.y_fit if part == "fit" else self.y_val
        if pair:
            if part not in self._stacked:
                # Lesion and baseline as two channels, so one transform moves both; built
                # once per part, not once per trial.
                inputs = self.inputs(part, True)
                self._stacked[part] = np.concatenate([inputs["lesion"], inputs["baseline"]], axis=-1)
            ds = tf.data.Dataset.from_tensor_slices((self._stacked[part], y))
        else:
            ds = tf.data.Dataset.from_tensor_slices((x, y))
        if training:
            ds = ds.shuffle(len(y), seed=self.seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size)
        if training and (self.augmentation.symmetries or not self.augmentation.only_symmetries):
            aug = augment_fn(self.augmentation, self.seed)
            seeds = tf.data.Dataset.random(seed=self.seed, rerandomize_each_iteration=True).batch(2)
            ds = tf.data.Dataset.zip((ds, seeds)).map(lambda ab, s: (aug(ab[0], s), ab[1]),
                                                      num_parallel_calls=tf.data.AUTOTUNE)
        if pair:
            ds = ds.map(lambda a, b: ({"lesion": a[..., :1], "baseline": a[..., 1:]}, b))
        return ds.prefetch(tf.data.AUTOTUNE)

    def class_weight(self, mode: str) -> dict[int, float] | None:
        """``balanced``: n / (k * count) per class, as scikit-learn defines it."""
        if mode in (None, "none"):
            return None
        counts = np.bincount(self.y_fit, minlength=self.n_classes).astype(float)
        weights = len(self.y_fit) / (self.n_classes * np.maximum(counts, 1.0))
        return {i: float(w) for i, w in enumerate(weights)}
