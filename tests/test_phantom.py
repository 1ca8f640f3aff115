"""The digital phantom: structure of the dataset, the synth command, and the image
properties a radiologist expects (power-law background, BI-RADS morphology)."""

from __future__ import annotations

import numpy as np
import pluggy
import pytest
from click.testing import CliRunner
from scipy import ndimage
from skimage import feature, measure

from automammo import hookspecs
from automammo.dataset import load
from automammo.errors import DataError
from automammo.phantom import BETA_RANGE, power_law_field, synthesize


@pytest.fixture(scope="module")
def mixed():
    return synthesize(n_lesions=60, size=48, difficulty=0.5, seed=11)


@pytest.fixture(scope="module")
def easy_masses():
    return synthesize(n_lesions=60, size=64, difficulty=0.0, seed=5, calc_fraction=0.0)


@pytest.fixture(scope="module")
def easy_calcifications():
    return synthesize(n_lesions=80, size=64, difficulty=0.0, seed=5, calc_fraction=1.0)


# --------------------------------------------------------------------------- helpers


def spectral_beta(image: np.ndarray) -> float:
    """Slope of the radially averaged power spectrum, over the band below the detector blur
    and the quantum noise (2 to size/8 cycles per patch); a Hann window stops the patch
    edges from leaking power that would flatten the spectrum towards 1/f**2."""
    n = image.shape[0]
    centred = image.astype(float) - image.mean()
    power = np.abs(np.fft.fft2(centred * np.outer(np.hanning(n), np.hanning(n)))) ** 2
    freq = np.fft.fftfreq(n) * n
    ring = np.rint(np.hypot(freq[:, None], freq[None, :])).astype(int)
    ks = np.arange(2, n // 8 + 1)
    profile = np.array([power[ring == k].mean() for k in ks])
    return -np.polyfit(np.log(ks), np.log(profile), 1)[0]


def central_region(image: np.ndarray):
    """The connected region at the patch centre brighter than half the lesion's contrast
    over a plane fitted to the patch border (the local background)."""
    n = image.shape[0]
    smooth = ndimage.gaussian_filter(image.astype(float), 1.0)
    yy, xx = np.mgrid[0:n, 0:n]
    border = np.ones((n, n), bool)
    border[4:-4, 4:-4] = False
    design = np.c_[np.ones(border.sum()), yy[border], xx[border]]
    coef = np.linalg.lstsq(design, smooth[border], rcond=None)[0]
    excess = smooth - (coef[0] + coef[1] * yy + coef[2] * xx)
    centre = np.median(excess[n // 2 - 3:n // 2 + 4, n // 2 - 3:n // 2 + 4])
    regions = measure.label(excess > 0.5 * centre)
    if regions[n // 2, n // 2] == 0:
        return None
    return measure.regionprops((regions == regions[n // 2, n // 2]).astype(int))[0]


def specks(ds, i, k=5.0):
    """Bright specks in patch ``i``: (number of peaks, median area of the bright regions).

    A narrow difference of Gaussians keeps speck-sized detail and drops the smooth tissue
    texture; the threshold is ``k`` robust standard deviations of the same filter on the
    paired baseline (same breast, no lesion), so it adapts to each breast's noise.
    """
    def dog(image):
        image = image.astype(float)
        return ndimage.gaussian_filter(image, 0.5) - ndimage.gaussian_filter(image, 1.5)

    reference = dog(ds.x[ds.pair[i]])
    threshold = k * 1.4826 * np.median(np.abs(reference - np.median(reference)))
    response = dog(ds.x[i])
    peaks = feature.peak_local_max(response, min_distance=1, threshold_abs=threshold, exclude_border=False)
    regions = measure.regionprops(measure.label(response > threshold))
    return len(peaks), (np.median([r.area for r in regions]) if regions else np.nan)


# --------------------------------------------------------------------------- the dataset


def test_same_seed_same_arrays_other_seed_differs():
    a = synthesize(n_lesions=12, size=32, seed=3)
    b = synthesize(n_lesions=12, size=32, seed=3)
    c = synthesize(n_lesions=12, size=32, seed=4)
    assert a.fingerprint() == b.fingerprint()
    for name in ("x", "label", "pair", "patient", "split"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.x, c.x)


def test_saved_file_loads_and_validates(tmp_path, mixed):
    path = mixed.save(tmp_path / "phantom.npz")
    back = load(path)
    assert back.fingerprint() == mixed.fingerprint()
    assert back.x.dtype == np.uint16 and back.x.shape == (120, 48, 48)
    assert back.x.max() <= 4095 and back.x.max() > 2000  # 12-bit values, using the range
    assert set(back.meta) >= {"source", "lesion_size", "breast_density", "beta", "suspicion",
                              "morphology", "n_specks"}
    assert set(back.meta["source"]) == {"phantom"}


def test_eight_bit_output():
    ds = synthesize(n_lesions=4, size=32, seed=1, bits=8)
    assert ds.x.dtype == np.uint8 and ds.x.max() > 100


def test_every_lesion_is_paired_with_a_baseline_of_its_breast(mixed):
    lesion = mixed.label > 0
    assert lesion.sum() == 60 and (~lesion).sum() == 60
    partner = mixed.pair
    assert np.all(partner >= 0)
    np.testing.assert_array_equal(partner[partner], np.arange(len(mixed)))
    assert np.all(lesion != lesion[partner])
    np.testing.assert_array_equal(mixed.patient, mixed.patient[partner])
    np.testing.assert_array_equal(mixed.split, mixed.split[partner])
    np.testing.assert_array_equal(mixed.meta["beta"], mixed.meta["beta"][partner])
    assert np.all(mixed.meta["lesion_size"][lesion] > 0)
    assert np.all(mixed.meta["lesion_size"][~lesion] == 0)
    assert set(mixed.meta["morphology"][~lesion]) == {"normal"}


def test_baseline_comes_from_the_same_breast(mixed):
    # Neighbouring crops of one breast share its density and exposure, so a lesion patch's
    # brightness should track its own baseline's far better than another breast's.
    lesions = np.flatnonzero(mixed.label > 0)
    lesion_mean = mixed.x[lesions].mean(axis=(1, 2))
    baseline_mean = mixed.x[mixed.pair[lesions]].mean(axis=(1, 2))
    assert np.corrcoef(lesion_mean, baseline_mean)[0, 1] > 0.6


def test_patients_hold_one_to_three_lesions_and_never_straddle_the_split():
    ds = synthesize(n_lesions=150, size=32, seed=2)
    lesions = ds.label > 0
    _, per_patient = np.unique(ds.patient[lesions], return_counts=True)
    assert per_patient.min() == 1 and per_patient.max() == 3
    assert np.mean(per_patient > 1) > 0.2  # several lesions per patient do happen
    train = set(ds.patient[ds.split == "train"])
    test = set(ds.patient[ds.split == "test"])
    assert train and test and not train & test
    assert 0.15 <= np.mean(ds.split[lesions] == "test") <= 0.25
    # The test split carries every lesion class, so every task can be evaluated.
    assert set(ds.label[lesions & (ds.split == "test")]) == {1, 2, 3, 4}


def test_no_test_split_when_asked():
    ds = synthesize(n_lesions=10, size=32, seed=2, test_fraction=0.0)
    assert set(ds.split) == {"train"}


@pytest.mark.parametrize("calc_fraction, malignant_fraction", [(0.5, 0.5), (0.3, 0.7), (1.0, 0.2)])
def test_class_balance_follows_the_fractions(calc_fraction, malignant_fraction):
    ds = synthesize(n_lesions=100, size=32, seed=0, calc_fraction=calc_fraction,
                    malignant_fraction=malignant_fraction)
    counts = np.bincount(ds.label, minlength=5)
    assert counts[0] == 100
    assert abs((counts[3] + counts[4]) / 100 - calc_fraction) <= 0.01
    for benign, malignant in ((1, 2), (3, 4)):
        if counts[benign] + counts[malignant]:
            share = counts[malignant] / (counts[benign] + counts[malignant])
            assert abs(share - malignant_fraction) <= 0.02


@pytest.mark.parametrize("kwargs, words", [
    ({"n_lesions": 0}, "n_lesions"),
    ({"size": 8}, "size"),
    ({"difficulty": 1.5}, "difficulty"),
    ({"difficulty": float("nan")}, "difficulty"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"calc_fraction": -0.1}, "calc_fraction"),
    ({"seed": -1}, "seed"),
    ({"bits": 20}, "bits"),
    ({"size": 32.5}, "size"),
])
def test_out_of_range_arguments_are_refused(kwargs, words):
    with pytest.raises(DataError, match=words):
        synthesize(**{"n_lesions": 4, "size": 32, **kwargs})


# --------------------------------------------------------------------------- the images


def test_power_law_field_has_the_requested_exponent():
    rng = np.random.default_rng(0)
    for beta in (2.0, 3.0):
        field = power_law_field(rng, (256, 256), beta)
        assert field.dtype == np.float32
        assert abs(field.mean()) < 1e-4 and abs(field.std() - 1) < 1e-3
        estimates = [spectral_beta(field[i:i + 128, j:j + 128]) for i in (0, 128) for j in (0, 128)]
        assert abs(np.median(estimates) - beta) < 0.4


def test_baseline_background_has_a_power_law_spectrum_near_three(mixed):
    baselines = mixed.x[mixed.label == 0]
    estimates = np.array([spectral_beta(patch) for patch in baselines])
    assert 2.3 <= np.median(estimates) <= 3.7
    drawn = mixed.meta["beta"]
    assert drawn.min() >= BETA_RANGE[0] and drawn.max() <= BETA_RANGE[1]


def test_malignant_masses_have_more_irregular_margins(easy_masses):
    def shape_of(label):
        found = [central_region(easy_masses.x[i]) for i in np.flatnonzero(easy_masses.label == label)]
        found = [r for r in found if r is not None]
        assert len(found) >= 20
        solidity = np.median([r.solidity for r in found])
        compactness = np.median([4 * np.pi * r.area / r.perimeter**2 for r in found])
        return solidity, compactness

    benign_solidity, benign_compactness = shape_of(1)
    malignant_solidity, malignant_compactness = shape_of(2)
    assert benign_solidity > 0.8
    assert benign_solidity - malignant_solidity > 0.07
    assert benign_compactness > 1.4 * malignant_compactness
    margins = easy_masses.meta["morphology"]
    assert np.mean(np.char.endswith(margins[easy_masses.label == 2], "spiculated")) > 0.8
    assert np.mean(np.char.endswith(margins[easy_masses.label == 1], "circumscribed")) > 0.8


def test_malignant_calcifications_are_more_numerous_and_finer(easy_calcifications):
    ds = easy_calcifications

    def summary(label):
        found = np.array([specks(ds, i) for i in np.flatnonzero(ds.label == label)])
        return np.median(found[:, 0]), np.nanmedian(found[:, 1])

    benign_count, benign_area = summary(3)
    malignant_count, malignant_area = summary(4)
    assert benign_count >= 1
    assert malignant_count >= 1.5 * benign_count
    assert malignant_area <= 0.75 * benign_area
    # The same detector finds nothing in healthy tissue.
    assert np.median([specks(ds, ds.pair[i])[0] for i in np.flatnonzero(ds.label > 0)]) == 0


def test_difficulty_lowers_lesion_conspicuity():
    def contrast(difficulty):
        ds = synthesize(n_lesions=40, size=48, difficulty=difficulty, seed=9, calc_fraction=0.0)
        lesions = np.flatnonzero(ds.label > 0)
        centre = ds.x[lesions, 20:28, 20:28].astype(float).mean(axis=(1, 2))
        surround = ds.x[lesions].astype(float).mean(axis=(1, 2))
        return np.median(centre - surround)

    assert contrast(0.0) > 1.3 * contrast(1.0) > 0


# --------------------------------------------------------------------------- the plugin


def test_plugin_registers_the_synth_importer():
    import automammo_plugins.phantom as plugin

    pm = pluggy.PluginManager("automammo")
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    pm.check_pending()
    importers = [i for batch in pm.hook.automammo_register_importers() for i in batch]
    assert [i.name for i in importers] == ["synth"]
    assert importers[0].command.name == "synth" and importers[0].description


def test_synth_command_writes_a_valid_dataset(tmp_path):
    from automammo_plugins.phantom import synth

    out = tmp_path / "sub" / "phantom.npz"
    result = CliRunner().invoke(synth, [str(out), "--lesions", "10", "--size", "32", "--seed", "1",
                                       "--difficulty", "0.3", "--test-fraction", "0.3"])
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) == 1 and "20 patches" in result.output
    ds = load(out)
    assert len(ds) == 20 and ds.image_shape == (32, 32)
    assert ds.fingerprint() == synthesize(n_lesions=10, size=32, seed=1, difficulty=0.3,
                                          test_fraction=0.3).fingerprint()
    assert not [p for p in out.parent.iterdir() if p.name != "phantom.npz"]  # no temporaries


@pytest.mark.parametrize("args, words", [
    (["--difficulty", "2"], "difficulty"),
    (["--size", "4"], "size"),
    (["--lesions", "0"], "lesions"),
    (["--test-fraction", "1"], "test-fraction"),
    (["--lesions", "many"], "lesions"),
])
def test_synth_command_rejects_bad_values(tmp_path, args, words):
    from automammo_plugins.phantom import synth

    out = tmp_path / "phantom.npz"
    result = CliRunner().invoke(synth, [str(out), *args])
    assert result.exit_code != 0
    assert words in result.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_synth_command_wants_an_npz_name(tmp_path):
    from automammo_plugins.phantom import synth

    result = CliRunner().invoke(synth, [str(tmp_path / "phantom.txt"), "--lesions", "2"])
    assert result.exit_code == 2 and ".npz" in result.output
    assert not list(tmp_path.iterdir())
