"""Baseline-fusion builders (siamese, two_channel, conv3d) and the baseline-aware tasks.

Everything runs at 32 px on a few patients for one epoch; the search runs are built once
per module.
"""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np
import pytest
from click.testing import CliRunner

from automammo import registry
from automammo.builders import BuildContext
from automammo.cli import cli
from automammo.dataset import Dataset
from automammo.errors import DataError
from automammo.layers import PairMerge, load_model
from automammo.preprocess import Preprocessing, TrialData
from automammo.runs import Run
from automammo.search import Reporter, SearchConfig, choose_builders, prepare_data, run_search
from automammo.tasks import get_task

SIZE = 32
PAIR_BUILDERS = ("siamese", "two_channel", "conv3d")


def make_pair_dataset(n_train: int = 12, n_test: int = 4, seed: int = 0) -> Dataset:
    """Two lesions per patient, each paired with a baseline cut from the same tissue.

    Every patient has one mass and one calcification, one benign and one malignant
    (labels 1 and 4, or 3 and 2), so any patient-grouped split holds every class of every
    task. Tissue brightness varies by patient: only the comparison with the patient's own
    baseline tells a bright lesion from bright tissue.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    blob = np.exp(-((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2) / (2 * (SIZE / 6) ** 2))
    x, label, pair, patient, split = [], [], [], [], []
    for p in range(n_train + n_test):
        tissue = rng.uniform(60, 140)
        for lab in ((1, 4) if p % 2 else (3, 2)):
            baseline = rng.normal(tissue, 12, (SIZE, SIZE))
            lesion = rng.normal(tissue, 12, (SIZE, SIZE))
            if lab in (2, 4):
                lesion += 70 * blob
            if lab in (3, 4):
                lesion[::4, ::4] += 90
            i = len(x)
            x += [lesion, baseline]
            label += [lab, 0]
            pair += [i + 1, i]
            patient += [f"P{p:02d}"] * 2
            split += ["train" if p < n_train else "test"] * 2
    return Dataset.create(np.clip(np.array(x), 0, 255).astype(np.uint8), np.array(label),
                          np.array(pair), np.array(patient), np.array(split), source="pairs")


@pytest.fixture(scope="module")
def pair_dataset() -> Dataset:
    return make_pair_dataset()


@pytest.fixture(scope="module")
def pair_dataset_path(tmp_path_factory, pair_dataset):
    return pair_dataset.save(tmp_path_factory.mktemp("fusion-data") / "pairs.npz")


@pytest.fixture(scope="module")
def trial_data(pair_dataset) -> TrialData:
    config = SearchConfig(task="benign-malignant", image_size=SIZE)
    return prepare_data(pair_dataset, get_task(config.task), config, "pairs", need_pairs=True).trial_data


def _context(**kw) -> BuildContext:
    return BuildContext(**{"image_size": SIZE, "n_classes": 2, "weights": "none", **kw})


def _hyperparameters(builder, **values) -> kt.HyperParameters:
    """A builder's space with some values set, as the oracle would set them."""
    hp = kt.HyperParameters()
    builder.build(hp)  # registers the model and training spaces at their defaults
    unknown = set(values) - {h.name for h in hp.space}
    assert not unknown, f"not in the {builder.name} space: {unknown}"
    hp.values.update(values)
    for h in hp.space:  # branches the new values switch off lose theirs; those switched on get defaults
        if not hp.is_active(h):
            hp.values.pop(h.name, None)
        elif h.name not in hp.values:
            hp.values[h.name] = h.default
    return hp


def _changed(before, after) -> bool:
    return any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def _pair(n=6, seed=1):
    rng = np.random.default_rng(seed)
    return {k: rng.uniform(0, 1, (n, SIZE, SIZE, 1)).astype("float32") for k in ("lesion", "baseline")}


# -- each builder ---------------------------------------------------------------------------

# Non-default corners of each space; the registry-wide test in test_builders.py covers the
# defaults.
VARIANTS = {
    "siamese": {"merge": "concat_diff_prod", "pooling": "flatten", "class_weight": "balanced"},
    "two_channel": {"difference_channel": True, "batch_norm": False},
    "conv3d": {"depth_kernel": 2, "pooling": "flatten", "conv_blocks": 2},
}


@pytest.mark.parametrize("name", PAIR_BUILDERS)
def test_fusion_builder_fits_on_pairs_saves_and_reloads(name, trial_data, tmp_path):
    cls = registry.get("builder", name)
    assert cls.inputs == "pair" and cls.description
    builder = cls(_context())
    hp = _hyperparameters(builder, **VARIANTS[name], batch_size=16)
    model = builder.build(hp)
    assert {t.name for t in model.inputs} == {"lesion", "baseline"}
    before = [w.copy() for w in model.get_weights()]
    history = builder.fit(hp, model, trial_data, epochs=1)  # the pair pipeline, augmented
    assert np.isfinite(history.history["loss"][0]) and np.isfinite(history.history["val_loss"][0])
    assert _changed(before, model.get_weights()), "training changes weights"

    val = trial_data.inputs("val", pair=True)
    p = model.predict(val, verbose=0)
    assert p.shape == (len(trial_data.y_val), 2) and p.dtype == np.float32
    path = tmp_path / f"{name}.keras"
    model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(again.predict(val, verbose=0), p, atol=1e-5)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in _all_layers(again))


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def test_siamese_encoder_weights_are_shared(tmp_path):
    builder = registry.get("builder", "siamese")(_context())
    model = builder.build(_hyperparameters(builder, merge="abs_diff"))
    encoder = model.get_layer("encoder")
    assert isinstance(encoder, keras.Model)
    # One set of encoder weights: the model holds no convolution outside the shared encoder.
    assert not any(isinstance(layer, keras.layers.Conv2D) for layer in model.layers)
    outside = sum(layer.count_params() for layer in model.layers if layer is not encoder)
    assert model.count_params() == encoder.count_params() + outside

    model.save(tmp_path / "siamese.keras")
    for m in (model, load_model(tmp_path / "siamese.keras", compile=False)):
        a = _pair(seed=2)
        swapped = {"lesion": a["baseline"], "baseline": a["lesion"]}
        # |f(a) - f(b)| with one f is symmetric, and zero whenever both patches are equal:
        # neither holds with two encoders.
        np.testing.assert_allclose(m.predict(a, verbose=0), m.predict(swapped, verbose=0), atol=1e-6)
        same = {"lesion": a["lesion"], "baseline": a["lesion"]}
        p = m.predict(same, verbose=0)
        np.testing.assert_allclose(p, np.repeat(p[:1], len(p), axis=0), atol=1e-6)


def test_siamese_concatenation_keeps_which_patch_is_the_lesion():
    builder = registry.get("builder", "siamese")(_context())
    model = builder.build(_hyperparameters(builder, merge="concat_diff_prod"))
    width = model.get_layer("encoder").output.shape[-1]
    assert model.get_layer("merge").output.shape[-1] == 4 * width
    a = _pair(seed=3)
    swapped = {"lesion": a["baseline"], "baseline": a["lesion"]}
    assert not np.allclose(model.predict(a, verbose=0), model.predict(swapped, verbose=0), atol=1e-6)


def test_siamese_offers_a_pretrained_encoder_only_with_pretrained_weights(monkeypatch):
    from automammo_plugins import fusion

    hp = kt.HyperParameters()
    registry.get("builder", "siamese")(_context(weights="none")).build(hp)
    assert {h.name: h for h in hp.space}["encoder"].values == ["scratch"]
    # No transfer plugin at all: the siamese family still runs on its scratch encoder.
    monkeypatch.setitem(__import__("sys").modules, "automammo_plugins.transfer", None)
    assert fusion.pretrained_backbones(_context(weights="imagenet")) == {}


def test_siamese_pretrained_encoder_is_frozen_shared_and_reloads(monkeypatch, tmp_path):
    transfer = pytest.importorskip("automammo_plugins.transfer")
    from automammo_plugins import fusion

    # Random weights stand in for ImageNet's: the structure is the same, and tests stay offline.
    monkeypatch.setattr(fusion, "pretrained_backbones",
                        lambda context: {"mobilenet_v3_small": transfer.MobileNetV3Small})
    builder = registry.get("builder", "siamese")(_context())
    hp = _hyperparameters(builder, encoder="pretrained", backbone="mobilenet_v3_small", merge="abs_diff")
    assert "conv_blocks" not in hp.values  # the scratch branch is off
    model = builder.build(hp)
    encoder = model.get_layer("encoder")
    assert encoder.get_layer("backbone_input").__class__ is transfer.BackboneInput
    assert not encoder.trainable_weights
    frozen = [w.copy() for w in encoder.get_weights()]
    head = [w.copy() for w in model.get_layer("probabilities").get_weights()]
    a = _pair(n=4, seed=4)
    # Eager: tracing a backbone's graph costs more than running it on four 32 px patches.
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=True)
    model.train_on_batch(a, np.array([0, 1, 0, 1]))
    assert not _changed(frozen, encoder.get_weights()), "the backbone stays frozen"
    assert _changed(head, model.get_layer("probabilities").get_weights()), "the head learns"

    model.save(tmp_path / "pretrained.keras")
    again = load_model(tmp_path / "pretrained.keras", compile=False)
    p = np.asarray(model(a, training=False))
    np.testing.assert_allclose(np.asarray(again(a, training=False)), p, atol=1e-5)
    swapped = {"lesion": a["baseline"], "baseline": a["lesion"]}
    np.testing.assert_allclose(np.asarray(again(swapped, training=False)), p, atol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
def test_conv3d_kernels_span_one_or_both_patches(depth):
    builder = registry.get("builder", "conv3d")(_context())
    model = builder.build(_hyperparameters(builder, depth_kernel=depth, conv_blocks=2))
    assert model.get_layer("stack_depth").output.shape[1:] == (2, SIZE, SIZE, 1)
    assert model.get_layer("conv3d_0").kernel.shape[:3] == (depth, 3, 3)
    # The learned merge brings the two slices down to one.
    assert model.get_layer("merge_pair").kernel.shape[:3] == (2, 1, 1)
    assert model.get_layer("merge_pair").output.shape[1] == 1


def test_two_channel_stacks_lesion_baseline_and_difference():
    builder = registry.get("builder", "two_channel")(_context())
    plain = builder.build(_hyperparameters(builder, difference_channel=False))
    assert plain.get_layer("stack_channels").output.shape[-1] == 2
    keras.backend.clear_session()
    with_diff = builder.build(_hyperparameters(builder, difference_channel=True))
    assert with_diff.get_layer("stack_channels").output.shape[-1] == 3


def test_pair_merge_layer_round_trips_its_config():
    layer = PairMerge("concat_diff_prod", name="m")
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer), safe_mode=True)
    assert isinstance(again, PairMerge) and again.mode == "concat_diff_prod" and again.name == "m"
    a, b = np.array([[1.0, -2.0]], "float32"), np.array([[3.0, 1.0]], "float32")
    np.testing.assert_allclose(PairMerge("abs_diff")([a, b]), [[2.0, 3.0]])
    np.testing.assert_allclose(again([a, b]), [[1, -2, 3, 1, -2, -3, 3, -2]])
    with pytest.raises(ValueError, match="abs_diff"):
        PairMerge("sum")


# -- the search ----------------------------------------------------------------------------


def test_default_builders_include_pair_builders_for_lesion_tasks():
    context = _context()
    chosen = choose_builders(SearchConfig(task="benign-malignant"), context, get_task("benign-malignant"),
                             has_pairs=True, reporter=Reporter())
    assert {"scratch_cnn", *PAIR_BUILDERS} <= set(chosen)

    class Messages(Reporter):
        def __init__(self):
            self.lines = []

        def message(self, text):
            self.lines.append(text)

    for task, has_pairs, why in (("abnormality", False, "classifies baselines"),
                                 ("benign-malignant", False, "without a baseline")):
        reporter = Messages()
        chosen = choose_builders(SearchConfig(task=task), context, get_task(task), has_pairs, reporter)
        assert "scratch_cnn" in chosen and not set(PAIR_BUILDERS) & set(chosen)
        skipped = [line for line in reporter.lines if why in line]
        assert {name for name in PAIR_BUILDERS if any(f"builder {name}:" in s for s in skipped)} == set(PAIR_BUILDERS)


def test_missing_partner_with_a_pair_builder_is_a_data_error(pair_dataset, tmp_path):
    pair = pair_dataset.pair.copy()
    lesion = int(np.flatnonzero((pair_dataset.label > 0) & (pair_dataset.split == "train"))[0])
    pair[pair[lesion]] = -1
    pair[lesion] = -1
    broken = Dataset.create(pair_dataset.x, pair_dataset.label, pair, pair_dataset.patient, pair_dataset.split)
    path = broken.save(tmp_path / "broken.npz")
    config = SearchConfig(data=str(path), task="benign-malignant", builders=["scratch_cnn", "siamese"],
                          trials=1, epochs=1, image_size=SIZE, tensorboard=False)
    with pytest.raises(DataError, match=r"1 of \d+ training lesions .* no baseline partner \(pair == -1\)"):
        run_search(config, tmp_path / "run")
    assert not (tmp_path / "run" / "trials.jsonl").exists()


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, pair_dataset_path):
    # With seed 4 the random oracle's four draws include single and pair builders (today
    # all four); which ones is the oracle's business, so the test asserts only the mix.
    config = SearchConfig(data=str(pair_dataset_path), task="benign-malignant", objective="auc",
                          builders=["scratch_cnn", *PAIR_BUILDERS], trials=4, epochs=1, image_size=SIZE,
                          seed=4, tensorboard=False)
    return run_search(config, tmp_path_factory.mktemp("fusion-runs") / "mixed")


def test_mixed_search_over_single_and_pair_builders(mixed_run, pair_dataset):
    run = Run(mixed_run.run_dir)
    trials = run.trials()
    assert len(trials) == 4
    assert all(t["status"] == "COMPLETED" for t in trials), [t.get("error") for t in trials]
    kinds = {registry.get("builder", t["builder"]).inputs for t in trials}
    assert kinds == {"single", "pair"}, f"builders drawn: {[t['builder'] for t in trials]}"
    prep = Preprocessing.from_dict(run.config()["preprocessing"])
    for t in trials:
        model = load_model(run.path / t["model"], compile=False)
        preds = run.load_preds(t["trial_id"])
        rows = preds["index"]
        lesion = prep.apply(pair_dataset.x[rows])
        if registry.get("builder", t["builder"]).inputs == "pair":
            # The saved predictions were made with each lesion's own baseline.
            inputs = {"lesion": lesion, "baseline": prep.apply(pair_dataset.x[pair_dataset.pair[rows]])}
        else:
            inputs = lesion
        np.testing.assert_allclose(model.predict(inputs, verbose=0), preds["y_prob"], atol=1e-5)


# -- tasks that classify the baseline itself ---------------------------------------------------


def test_balanced_class_weights_undo_the_baseline_imbalance(pair_dataset):
    for name in ("abnormality", "type-with-baseline"):
        task = get_task(name)
        config = SearchConfig(task=name, image_size=SIZE)
        data = prepare_data(pair_dataset, task, config, "pairs", need_pairs=False).trial_data
        assert not data.has_pairs  # the baselines are samples here, not inputs
        counts = np.bincount(data.y_fit, minlength=task.n_classes)
        weights = data.class_weight("balanced")
        # Each class then carries the same total weight: n / k.
        np.testing.assert_allclose([weights[c] * counts[c] for c in range(task.n_classes)],
                                   len(data.y_fit) / task.n_classes)
        if name == "type-with-baseline":
            assert counts[0] == counts[1] + counts[2]  # one baseline per lesion: 2:1:1
            assert weights[1] == pytest.approx(2 * weights[0])
    with pytest.raises(DataError, match="pair builders do not apply"):
        prepare_data(pair_dataset, get_task("abnormality"), SearchConfig(task="abnormality", image_size=SIZE),
                     "pairs", need_pairs=True)


def test_abnormality_search_runs_from_the_cli(pair_dataset_path, tmp_path):
    run_dir = tmp_path / "abnormality"
    result = CliRunner().invoke(cli, [
        "search", "--data", str(pair_dataset_path), "--task", "abnormality", "--objective", "f2",
        "--builder", "scratch_cnn", "--trials", "1", "--epochs", "1", "--image-size", str(SIZE),
        "--no-tensorboard", "--run", str(run_dir),
    ])
    assert result.exit_code == 0, result.output
    run = Run(run_dir)
    assert run.config()["task"]["classes"] == ["baseline", "lesion"]
    (trial,) = run.trials()
    assert trial["status"] == "COMPLETED" and trial["builder"] == "scratch_cnn"
    preds = run.load_preds(trial["trial_id"])
    assert set(np.unique(preds["y_true"])) == {0, 1}


def test_cli_refuses_a_pair_builder_for_a_task_that_classifies_baselines(pair_dataset_path, tmp_path):
    result = CliRunner().invoke(cli, [
        "search", "--data", str(pair_dataset_path), "--task", "abnormality", "--builder", "siamese",
        "--trials", "1", "--epochs", "1", "--image-size", str(SIZE), "--run", str(tmp_path / "r"),
    ])
    assert result.exit_code == 2, result.output
    assert "pair builders do not apply" in result.output
    assert not (tmp_path / "r" / "trials.jsonl").exists()
