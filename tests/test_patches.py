"""Patch geometry, pixel-value rules, collection and hold-out shared by the importers."""

import numpy as np
import pytest

from automammo.errors import DataError
from automammo.patches import (
    Box,
    PatchCollector,
    TissueMask,
    circle_bbox,
    crop,
    holdout_split,
    lesion_box,
    mask_bbox,
    place_baseline,
    resize_patch,
    to_canonical_dtype,
)


def film(rows=400, cols=300, seed=0, edge_strip=False):
    """A 16-bit film: dark background, a half-ellipse of textured tissue on the left."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[:rows, :cols]
    breast = ((r - rows / 2) / (rows * 0.48)) ** 2 + (c / (cols * 0.8)) ** 2 <= 1
    img = rng.normal(800, 50, (rows, cols))
    img[breast] = rng.normal(20000, 1500, breast.sum())
    if edge_strip:
        img[-4:, :] = 30000  # the bright unexposed edge of a scanned film
        img[:, -3:] = 30000
    return np.clip(img, 0, 65535).astype(np.uint16), breast


# --------------------------------------------------------------------------- boxes


def test_box_overlap_excludes_touching_edges():
    a = Box(10, 10, 20, 20)
    assert a.overlaps(Box(29, 29, 5, 5))
    assert not a.overlaps(Box(30, 10, 20, 20))  # directly below: shares an edge only
    assert not a.overlaps(Box(10, 30, 20, 20))
    assert a.contains(Box(12, 12, 3, 3)) and not a.contains(Box(25, 25, 10, 10))
    assert a.inside((30, 30)) and not a.inside((29, 30)) and not Box(-1, 0, 2, 2).inside((9, 9))


def test_mask_bbox_and_circle_bbox():
    m = np.zeros((50, 60), bool)
    m[10:15, 20:31] = True
    assert mask_bbox(m) == Box(10, 20, 5, 11)
    assert mask_bbox(np.zeros((5, 5))) is None
    b = circle_bbox(100, 50, 10)
    assert b.top <= 90 and b.bottom >= 110 and b.left <= 40 and b.right >= 60
    assert b.height <= 22 and b.width <= 22


def test_lesion_box_is_square_with_margin_and_contains_the_lesion():
    lesion = Box(100, 80, 30, 50)
    box = lesion_box(lesion, (400, 300), margin=0.2)
    assert box.height == box.width == 70  # 50 * (1 + 2 * 0.2)
    assert box.contains(lesion)
    c_lesion, c_box = lesion.center, box.center
    assert abs(c_lesion[0] - c_box[0]) <= 1 and abs(c_lesion[1] - c_box[1]) <= 1


def test_lesion_box_floor_and_border_shift():
    tiny = Box(2, 295, 3, 3)  # in the top right corner
    box = lesion_box(tiny, (400, 300), margin=0.2, min_side=48)
    assert box.height == 48 and box.inside((400, 300)) and box.contains(tiny)
    huge = Box(0, 0, 390, 290)
    box = lesion_box(huge, (400, 300), margin=0.5)
    assert box.height == box.width == 300 and box.inside((400, 300))


def test_crop_refuses_a_box_outside_the_image():
    img = np.zeros((20, 20), np.uint16)
    assert crop(img, Box(5, 5, 10, 10)).shape == (10, 10)
    with pytest.raises(ValueError):
        crop(img, Box(15, 15, 10, 10))


# --------------------------------------------------------------------------- resize


def test_resize_keeps_16_bit_values_and_dtype():
    patch = np.full((300, 300), 61234, np.uint16)
    patch[:150] = 1000
    out = resize_patch(patch, 50)
    assert out.dtype == np.uint16 and out.shape == (50, 50)
    assert out.max() == 61234 and out.min() == 1000  # no rescale, no 8-bit squeeze
    checker = np.kron(np.array([[0, 65535], [65535, 0]], np.uint16), np.ones((4, 4), np.uint16))
    up = resize_patch(checker, 32)  # upsampling: interpolated values stay within the range
    assert up.dtype == np.uint16 and up.max() == 65535 and up.min() == 0


def test_resize_uint8_and_identity():
    patch = (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)
    assert resize_patch(patch, 32).dtype == np.uint8
    same = resize_patch(patch, 64)
    assert np.array_equal(same, patch) and same is not patch


# --------------------------------------------------------------------------- tissue


def test_tissue_mask_finds_the_breast_and_ignores_film_edges():
    img, breast = film(edge_strip=True)
    tissue = TissueMask.from_image(img, max_side=128)
    full = tissue.full()
    assert full.shape == img.shape
    agree = (full == breast).mean()
    assert agree > 0.95
    assert not full[-2, 250]  # the bright edge strip is not breast
    assert tissue.fraction(Box(180, 10, 40, 40)) > 0.95  # deep in the breast
    assert tissue.fraction(Box(180, 255, 40, 40)) < 0.05  # background
    assert tissue.fraction(Box(-50, -50, 10, 10)) == 0.0


def test_tissue_mask_on_a_flat_image_is_all_tissue():
    tissue = TissueMask.from_image(np.full((64, 64), 7, np.uint8))
    assert tissue.fraction(Box(0, 0, 64, 64)) == 1.0


# --------------------------------------------------------------------------- baseline


def test_baseline_is_adjacent_in_tissue_and_off_every_lesion():
    img, _ = film()
    tissue = TissueMask.from_image(img)
    lesion = Box(180, 60, 20, 20)
    patch = lesion_box(lesion, img.shape, margin=0.2, min_side=40)
    other = Box(175, 105, 30, 30)  # another lesion directly right of the patch
    box, where = place_baseline(patch, img.shape, [lesion, other], tissue)
    assert where != "right"
    assert box.height == patch.height and box.width == patch.width
    assert not box.overlaps(patch) and not box.overlaps(other) and not box.overlaps(lesion)
    assert tissue.fraction(box) >= 0.9
    # Adjacent: shares a full edge with the lesion patch.
    assert (box.right == patch.left or box.left == patch.right) and box.top == patch.top or (
        (box.bottom == patch.top or box.top == patch.bottom) and box.left == patch.left
    )


def test_baseline_none_when_no_room():
    img, _ = film()
    tissue = TissueMask.from_image(img)
    patch = Box(100, 0, 200, 200)  # left edge, too big for a neighbour above/below/right in tissue
    assert place_baseline(patch, img.shape, [], tissue) is None
    # Without the tissue condition the space below exists.
    assert place_baseline(Box(0, 0, 100, 100), (400, 300), [Box(100, 0, 5, 5), Box(0, 100, 5, 5)]) is None
    assert place_baseline(Box(0, 0, 100, 100), (400, 300), [Box(100, 0, 5, 5)])[1] == "right"


def test_baseline_property_over_random_lesions():
    img, _ = film(seed=3)
    tissue = TissueMask.from_image(img)
    rng = np.random.default_rng(7)
    placed = 0
    for _ in range(200):
        lesions = [Box(int(rng.integers(0, 380)), int(rng.integers(0, 280)), int(rng.integers(3, 20)),
                       int(rng.integers(3, 20))) for _ in range(3)]
        patch = lesion_box(lesions[0], img.shape, margin=0.2, min_side=32)
        got = place_baseline(patch, img.shape, lesions, tissue, min_tissue=0.9)
        if got is None:
            continue
        placed += 1
        box, _ = got
        assert box.inside(img.shape)
        assert not any(box.overlaps(les) for les in lesions)
        assert not box.overlaps(patch)
        assert tissue.fraction(box) >= 0.9
    assert placed > 50


# --------------------------------------------------------------------------- values


def test_canonical_dtype_rules():
    u16 = np.array([[0, 65535]], np.uint16)
    assert to_canonical_dtype(u16, "f") is u16
    f01 = np.array([[0.0, 0.5, 1.0]], np.float32)
    out = to_canonical_dtype(f01, "f")
    assert out.dtype == np.uint16 and out.tolist() == [[0, 32768, 65535]]
    f255 = np.array([[0.0, 17.0, 255.0]])
    out = to_canonical_dtype(f255, "f")
    assert out.dtype == np.uint8 and out.tolist() == [[0, 17, 255]]
    frac = np.array([[0.0, 127.5, 255.0]])
    out = to_canonical_dtype(frac, "f")
    assert out.dtype == np.uint16 and out.tolist() == [[0, 32768, 65535]]
    whole16 = np.array([[0.0, 4095.0, 60000.0]])
    assert to_canonical_dtype(whole16, "f").tolist() == [[0, 4095, 60000]]
    assert to_canonical_dtype(np.array([[1, 200]], np.int64), "f").dtype == np.uint8
    assert to_canonical_dtype(np.array([[1, 4000]], np.int32), "f").dtype == np.uint16


@pytest.mark.parametrize(
    "arr, words",
    [
        (np.array([[0.0, np.nan]]), "NaN"),
        (np.array([[0.0, np.inf]]), "NaN/infinite"),
        (np.array([[-1.0, 0.5]]), "negative"),
        (np.array([[0.0, 300.5]]), "min-max"),
        (np.array([[-3, 4]], np.int16), "negative"),
        (np.array([[0, 70000]], np.int64), "16 bits"),
        (np.array([[True, False]]), "mask"),
    ],
)
def test_canonical_dtype_refusals_name_the_file(arr, words):
    with pytest.raises(DataError, match="images.npy") as exc:
        to_canonical_dtype(arr, "images.npy")
    assert words in str(exc.value)


# --------------------------------------------------------------------------- collector


def test_collector_pairs_in_course_order_and_widens_mixed_dtypes():
    c = PatchCollector()
    a8 = np.full((16, 16), 255, np.uint8)
    b16 = np.full((16, 16), 40000, np.uint16)
    c.add_pair(b16, b16 // 2, 2, "p1", "train", {"k": "lesion"}, {"k": "base"})
    c.add_single(a8, 3, "p2", "test", {"k": "single"})
    c.skip("no room for a baseline", example="row 3")
    ds = c.build("out.npz")
    assert ds.label.tolist() == [0, 2, 3]
    assert ds.pair.tolist() == [1, 0, -1]
    assert ds.x.dtype == np.uint16 and ds.x[2].max() == 65535 and ds.x[1].max() == 40000
    assert ds.meta["k"].tolist() == ["base", "lesion", "single"]
    text = "\n".join(c.summary(ds, "out.npz"))
    assert "no room for a baseline: 1" in text and "row 3" in text and "widened" in text
    with pytest.raises(ValueError):
        c.add_single(a8, 1, "p", "train", {"other": 1})


def test_collector_empty_is_a_data_error_with_reasons():
    c = PatchCollector()
    c.skip("film not found", example="mdb007.pgm")
    with pytest.raises(DataError, match="nothing usable.*film not found: 1.*mdb007"):
        c.build("out.npz")


# --------------------------------------------------------------------------- hold-out


def test_holdout_split_is_grouped_stratified_and_deterministic():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(60)], 4)
    label = np.tile([0, 1, 0, 3], 60)
    label[rng.random(240) < 0.2] = 0
    label[1::8] = 4
    split = holdout_split(patients, label, 0.25, seed=1)
    assert np.array_equal(split, holdout_split(patients, label, 0.25, seed=1))
    assert not np.array_equal(split, holdout_split(patients, label, 0.25, seed=2))
    for p in np.unique(patients):
        assert len(set(split[patients == p])) == 1
    for cls in (1, 3, 4):
        share = np.mean(split[label == cls] == "test")
        assert 0.15 <= share <= 0.35, (cls, share)


def test_holdout_split_refusals():
    with pytest.raises(DataError, match="at least 2 patients"):
        holdout_split(np.array(["a", "a"]), np.array([0, 1]), 0.5, 0)
    with pytest.raises(DataError, match="between 0 and 1"):
        holdout_split(np.array(["a", "b"]), np.array([0, 1]), 1.5, 0)


def test_collector_refuses_reserved_metadata_names():
    c = PatchCollector()
    with pytest.raises(ValueError, match="reserved"):
        c.add_single(np.zeros((8, 8), np.uint8), 1, "p", "train", {"file": "a.png"})
