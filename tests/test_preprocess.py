"""Preprocessing and the tf.data pipelines: scaling, stretch, resize, exact augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from automammo.preprocess import Augmentation, Preprocessing, TrialData, bit_depth_scale


def _symmetries(img):
    out = []
    for k in range(4):
        r = np.rot90(img, k)
        out += [r, np.fliplr(r)]
    return out


@pytest.mark.parametrize("peak, dtype, expected", [
    (200, np.uint8, 255.0), (1000, np.uint16, 1023.0), (4095, np.uint16, 4095.0),
    (4096, np.uint16, 16383.0), (60000, np.uint16, 65535.0),
])
def test_bit_depth_scale(peak, dtype, expected):
    x = np.zeros((2, 8, 8), dtype)
    x[0, 0, 0] = peak
    assert bit_depth_scale(x) == expected


def test_apply_scales_resizes_and_keeps_range():
    x = np.linspace(0, 4095, 4 * 40 * 40).reshape(4, 40, 40).astype(np.uint16)
    out = Preprocessing(20, 4095.0).apply(x)
    assert out.shape == (4, 20, 20, 1) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out[0].mean() == pytest.approx(x[0].mean() / 4095.0, abs=0.01)


def test_contrast_stretch_maps_percentiles_to_full_range():
    rng = np.random.default_rng(0)
    x = (rng.uniform(1000, 1200, (3, 32, 32))).astype(np.uint16)
    out = Preprocessing(32, 4095.0, contrast_stretch=True).apply(x)[..., 0]
    for img in out:
        assert np.percentile(img, 2) == pytest.approx(0.0, abs=0.02)
        assert np.percentile(img, 98) == pytest.approx(1.0, abs=0.02)


def _data(n=16, size=8, pairs=True, aug=Augmentation(), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, size, size, 1)).astype("float32")
    b = rng.uniform(0, 1, (n, size, size, 1)).astype("float32")
    y = np.arange(n) % 2
    return TrialData(x, y, x[:4], y[:4], 2, aug, b if pairs else None, b[:4] if pairs else None, seed)


def test_symmetries_are_exact_and_change_between_epochs():
    data = _data()
    ds = data.dataset("fit", 16)
    epochs = [next(iter(ds)) for _ in range(2)]
    seen = []
    for xb, yb in epochs:
        xb, yb = xb.numpy()[..., 0], yb.numpy()
        for img in xb:
            # Each augmented patch is exactly one of the 8 symmetries of some original.
            matches = [i for i, orig in enumerate(data.x_fit[..., 0])
                       if any(np.array_equal(img, s) for s in _symmetries(orig))]
            assert len(matches) == 1
        seen.append(xb)
    assert not np.array_equal(seen[0], seen[1])


def test_same_seed_same_augmentation():
    a = next(iter(_data(seed=3).dataset("fit", 16)))[0].numpy()
    b = next(iter(_data(seed=3).dataset("fit", 16)))[0].numpy()
    np.testing.assert_array_equal(a, b)


def test_pair_gets_the_same_transform_on_both_patches():
    data = _data()
    inputs, _ = next(iter(data.dataset("fit", 16, pair=True)))
    for les, base in zip(inputs["lesion"].numpy()[..., 0], inputs["baseline"].numpy()[..., 0]):
        i = next(i for i, orig in enumerate(data.x_fit[..., 0]) if any(np.array_equal(les, s) for s in _symmetries(orig)))
        k = next(j for j, s in enumerate(_symmetries(data.x_fit[i, ..., 0])) if np.array_equal(les, s))
        np.testing.assert_array_equal(base, _symmetries(data.b_fit[i, ..., 0])[k])


def test_validation_is_never_augmented_or_shuffled():
    data = _data()
    xb, yb = next(iter(data.dataset("val", 4)))
    np.testing.assert_array_equal(xb.numpy(), data.x_val)


def test_free_rotation_shift_zoom_run():
    data = _data(aug=Augmentation(symmetries=False, rotation=20, shift=0.1, zoom=0.1))
    xb, _ = next(iter(data.dataset("fit", 16)))
    assert xb.shape == (16, 8, 8, 1)
    xb = xb.numpy()
    assert np.isfinite(xb).all() and xb.min() >= 0.0 and xb.max() <= 1.0
    # Resampled, so no patch is any exact symmetry of an original.
    assert not any(np.array_equal(img, s) for img in xb[..., 0]
                   for orig in data.x_fit[..., 0] for s in _symmetries(orig))
    again, _ = next(iter(_data(aug=Augmentation(symmetries=False, rotation=20, shift=0.1, zoom=0.1))
                         .dataset("fit", 16)))
    np.testing.assert_array_equal(xb, again.numpy())


def test_symmetries_fold_into_the_resampling():
    """With resampling on, the symmetries are composed into the affine map: at a rotation
    range of ~0 every patch is still one of the 8 symmetries of its original, all 8 occur,
    and a pair's two channels move together."""
    data = _data(n=64, aug=Augmentation(symmetries=True, rotation=1e-7))
    inputs, _ = next(iter(data.dataset("fit", 64, pair=True)))
    used = set()
    for les, base in zip(inputs["lesion"].numpy()[..., 0], inputs["baseline"].numpy()[..., 0]):
        hits = [(i, k) for i, orig in enumerate(data.x_fit[..., 0])
                for k, s in enumerate(_symmetries(orig)) if np.allclose(les, s, atol=1e-5)]
        assert len(hits) == 1
        i, k = hits[0]
        np.testing.assert_allclose(base, _symmetries(data.b_fit[i, ..., 0])[k], atol=1e-5)
        used.add(k)
    assert used == set(range(8))


def _transforms(n, h, w, angle=0.0, scale=1.0, dx=0.0, dy=0.0):
    import tensorflow as tf

    from automammo.preprocess import affine_transforms

    one = tf.ones([n])
    return affine_transforms(angle * one, scale * one, dx * one, dy * one, h, w).numpy()


def _resample(images, angle=0.0, scale=1.0, dx=0.0, dy=0.0):
    from automammo.preprocess import resample_affine

    return resample_affine(images, _transforms(*images.shape[:3], angle, scale, dx, dy))


def test_resampling_matches_tensorflows_kernel():
    """OpenCV's warpAffine samples exactly where TensorFlow's ImageProjectiveTransformV3
    (bilinear, reflected borders) does, borders included, for one and two channels."""
    import tensorflow as tf

    from automammo.preprocess import resample_affine

    rng = np.random.default_rng(1)
    for channels in (1, 2):
        img = rng.uniform(0, 1, (6, 24, 24, channels)).astype(np.float32)
        t = np.concatenate([_transforms(3, 24, 24, 0.35, 1.1, 2.5, -3.0),
                            _transforms(3, 24, 24, -0.3, 0.9, -1.25, 4.0)])
        ours = resample_affine(img, t)
        reference = tf.raw_ops.ImageProjectiveTransformV3(
            images=tf.constant(img), transforms=tf.constant(t), output_shape=[24, 24], fill_value=0.0,
            interpolation="BILINEAR", fill_mode="REFLECT").numpy()
        assert ours.shape == img.shape
        np.testing.assert_allclose(ours, reference, atol=1e-4)
        assert not np.allclose(ours, img, atol=0.05)  # it did move the pixels


def test_affine_transform_geometry():
    """The composed map rotates about the centre, scales about it and shifts by pixels."""
    img = np.random.default_rng(0).uniform(0, 1, (2, 9, 9, 1)).astype(np.float32)
    np.testing.assert_allclose(_resample(img), img, atol=1e-6)
    quarter = _resample(img, angle=np.pi / 2)
    assert any(np.allclose(quarter[0, ..., 0], np.rot90(img[0, ..., 0], k), atol=1e-5) for k in (1, 3))
    # Scale 2 about the centre samples every other pixel around it: the centre pixel stays.
    np.testing.assert_allclose(_resample(img, scale=2.0)[:, 4, 4], img[:, 4, 4], atol=1e-6)
    np.testing.assert_allclose(_resample(img, scale=2.0)[:, 3, 3], img[:, 2, 2], atol=1e-6)
    shifted = _resample(img, dx=2.0)
    np.testing.assert_allclose(shifted[:, :, :7], img[:, :, 2:], atol=1e-6)
    # Reflected border ("d c b a | a b c d"): the sample past the right edge is the edge itself.
    np.testing.assert_allclose(shifted[:, :, 7], img[:, :, 8], atol=1e-6)


def test_balanced_class_weight_matches_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 10 + [1] * 30)
    data = TrialData(np.zeros((40, 8, 8, 1), "float32"), y, None, None, 2)
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    assert data.class_weight("balanced") == pytest.approx(dict(enumerate(expected)))
    assert data.class_weight("none") is None


def test_pairs_missing_is_a_clear_error():
    from automammo.errors import DataError

    with pytest.raises(DataError, match="no baseline partners"):
        _data(pairs=False).inputs("val", pair=True)
