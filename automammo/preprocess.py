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


def affine_transforms(angles, scales, shifts_x, shifts_y, height: int, width: int):
    """(B, 8) projective transforms for ``ImageProjectiveTransformV3``: rotate by ``angles``
    (radians) and scale by ``scales`` about the image centre, then shift by ``shifts_*``
    pixels. Each row maps an output pixel (x, y) to the input point it samples.
    """
    import tensorflow as tf

    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    c, s = scales * tf.cos(angles), scales * tf.sin(angles)
    zero = tf.zeros_like(c)
    return tf.stack([c, -s, cx + shifts_x - c * cx + s * cy,
                     s, c, cy + shifts_y - s * cx - c * cy, zero, zero], axis=1)


def apply_symmetries(images: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Each patch of ``images`` (B, S, S, C) transposed, flipped up-down and flipped
    left-right where ``bits`` (3, B) says so: 2 x 2 x 2 = the 8 symmetries of the square,
    exact (no interpolation). One strided copy per patch (10x TensorFlow's whole-batch
    selects, which compute every branch for every patch)."""
    out = np.empty_like(images)
    for i, (transpose, flip_ud, flip_lr) in enumerate(np.asarray(bits).T):
        view = images[i].transpose(1, 0, 2) if transpose else images[i]
        if flip_ud:
            view = view[::-1]
        if flip_lr:
            view = view[:, ::-1]
        out[i] = view
    return out


def compose_symmetries(bits, transforms, height: int, width: int):
    """(B, 8) transforms that first apply the symmetries chosen by ``bits`` (3, B) bool --
    transpose, then flip up-down, then flip left-right, as the symmetry-only pipeline does --
    and then ``transforms``. Square patches only (the transpose keeps the shape).

    Each map takes an output pixel to the input point it samples, so the image-order
    ``transforms(flips(transpose(image)))`` samples through ``T @ F_ud @ F_lr @ A``.
    """
    import tensorflow as tf

    if height != width:
        raise ValueError(f"symmetries need square patches, got {height}x{width}")
    n = tf.shape(transforms)[0]
    one, zero = tf.ones([n]), tf.zeros([n])

    def matrices(rows):
        return tf.reshape(tf.stack(rows, axis=1), [-1, 3, 3])

    t, ud, lr = (tf.cast(b, tf.float32) for b in tf.unstack(bits))
    transpose = matrices([1 - t, t, zero, t, 1 - t, zero, zero, zero, one])
    flip_ud = matrices([one, zero, zero, zero, 1 - 2 * ud, ud * (height - 1), zero, zero, one])
    flip_lr = matrices([1 - 2 * lr, zero, lr * (width - 1), zero, one, zero, zero, zero, one])
    affine = matrices(tf.unstack(transforms, axis=1) + [one])
    composed = transpose @ flip_ud @ flip_lr @ affine
    return tf.reshape(composed, [-1, 9])[:, :8]


def resample_affine(images: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """Resample each patch of ``images`` (B, H, W, C) float32 through its row of
    ``transforms`` (B, 8, from ``affine_transforms``): bilinear, reflected borders
    ("d c b a | a b c d"), every channel through the same map.

    The same sampling as TensorFlow's ``ImageProjectiveTransformV3`` (BILINEAR, REFLECT)
    for affine maps, done by OpenCV's ``warpAffine``: SIMD code that drew twice the patches
    per second on one core that TensorFlow's kernel drew on two. It releases the GIL, so
    tf.data's parallel calls run it on every core.
    """
    import cv2

    # One plane at a time: OpenCV samples single-channel float images at exact positions,
    # but several channels at 1/32-pixel steps (up to 0.02 off on a 0-1 patch).
    planes = np.ascontiguousarray(np.moveaxis(np.asarray(images, dtype=np.float32), -1, 1))
    out = np.empty_like(planes)
    h, w = planes.shape[2:]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP  # each row maps output pixels to inputs
    for i in range(len(planes)):
        matrix = np.asarray(transforms[i, :6], dtype=np.float64).reshape(2, 3)
        for c in range(planes.shape[1]):
            cv2.warpAffine(planes[i, c], matrix, (w, h), dst=out[i, c], flags=flags, borderMode=cv2.BORDER_REFLECT)
    return np.ascontiguousarray(np.moveaxis(out, 1, -1))


def augment_fn(aug: Augmentation, seed: int):
    """A batched tf function ((B, S, S, C), seed[2]) -> (B, S, S, C); channels move together.

    Every draw is a stateless random op fed by ``seed`` (a seeded stream in the pipeline),
    so the same search seed gives the same augmentation in every trial, whatever ran before
    it in the process. The symmetries alone are one strided copy per patch
    (``apply_symmetries``); with rotation, shift or zoom, the symmetry, rotation, shift and
    zoom are composed into one affine map per patch and resampled once (bilinear, reflected
    borders, ``resample_affine``), not once per transform. Both run as NumPy/OpenCV code
    inside tf.data's parallel map, which releases the GIL for the pixel work.
    """
    import math

    import tensorflow as tf

    del seed  # the per-batch seeds come from the pipeline's seeded stream
    resample = bool(aug.rotation or aug.shift or aug.zoom)

    def apply(batch, op_seed):
        n = tf.shape(batch)[0]
        h, w = batch.shape[1], batch.shape[2]
        if aug.symmetries:
            bits = tf.random.stateless_uniform([3, n], op_seed) < 0.5
        shape = batch.shape
        if not resample:
            batch = tf.numpy_function(apply_symmetries, [batch, bits], tf.float32, stateful=False)
            batch.set_shape(shape)
            return batch
        u = tf.random.stateless_uniform([4, n], op_seed + 1, minval=-1.0, maxval=1.0)
        transforms = affine_transforms(u[0] * math.radians(aug.rotation), 1.0 + u[1] * aug.zoom,
                                       u[2] * aug.shift * w, u[3] * aug.shift * h, h, w)
        if aug.symmetries:
            # The symmetry is one more affine map: fold it into the resampling (one pass
            # over the pixels).
            transforms = compose_symmetries(bits, transforms, h, w)
        batch = tf.numpy_function(resample_affine, [batch, transforms], tf.float32, stateful=False)
        batch.set_shape(shape)
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
        """A batched, prefetched tf.data pipeline; shuffled and augmented when training.

        The pipeline shuffles indices, not patches, and gathers each batch in one op from
        the arrays held once in memory (a shuffle buffer of patches would be a second copy
        of the fit set); augmentation then runs on whole batches, in parallel, ahead of
        the model.
        """
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
            x = self._stacked[part]
        images, labels = tf.constant(x), tf.constant(y)
        order = tf.data.Dataset.range(len(y))
        if training:
            order = order.shuffle(len(y), seed=self.seed, reshuffle_each_iteration=True)
        order = order.batch(batch_size)
        augment = training and (self.augmentation.symmetries or not self.augmentation.only_symmetries)
        if augment:
            aug = augment_fn(self.augmentation, self.seed)
            seeds = tf.data.Dataset.random(seed=self.seed, rerandomize_each_iteration=True).batch(2)

            def load(index, op_seed):
                return aug(tf.gather(images, index), op_seed), tf.gather(labels, index)

            ds = tf.data.Dataset.zip((order, seeds)).map(load, num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = order.map(lambda index: (tf.gather(images, index), tf.gather(labels, index)),
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
