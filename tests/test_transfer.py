"""Transfer builders: every backbone, the two phases, the feature cache, the weights files.

All models use random weights (``weights="none"``) at each backbone's minimum image size:
nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import urllib.error

import keras
import keras_tuner as kt
import numpy as np
import pytest
import tensorflow as tf

from automammo import registry, weights
from automammo.builders import BuildContext
from automammo.errors import AutomammoError
from automammo.feature_cache import N_SYMMETRIES, FeatureCache, FeatureKey, fingerprint, pool, symmetry
from automammo.preprocess import Augmentation, TrialData
from automammo_plugins import transfer

BACKBONES = [cls.name for cls in transfer.BUILDERS]


def _builder(name, tmp_path=None, **kw):
    cls = registry.get("builder", name)
    context = dict(image_size=cls.min_image_size, n_classes=2, weights="none", cache_dir=tmp_path,
                   objective="auc", direction="max", patience=2)
    context.update(kw)
    return cls(BuildContext(**context))


def _hp(**values):
    hp = kt.HyperParameters()
    for name, value in values.items():
        hp.values[name] = value
    return hp


def _data(size, n_fit=24, n_val=8, seed=0, augmentation=Augmentation()):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n_fit + n_val, size, size, 1)).astype(np.float32)
    y = np.arange(n_fit + n_val) % 2
    x[y == 1, size // 4:size // 2, size // 4:size // 2] += 0.5  # something for the head to find
    x = np.clip(x, 0, 1)
    return TrialData(x[:n_fit], y[:n_fit], x[n_fit:], y[n_fit:], 2, augmentation, seed=seed)


@contextlib.contextmanager
def _counting_base_passes():
    """Counts calls of the one function through which the frozen base sees patches."""
    calls = []
    original = transfer.extract_features

    def counted(base, adapter, images):
        calls.append(len(images))
        return original(base, adapter, images)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transfer, "extract_features", counted)
        yield calls


# -- the registry and each backbone -------------------------------------------------------


def test_every_backbone_is_a_registered_builder():
    table = registry.builders()
    for name in ("vgg16", "vgg19", "resnet50", "inception_v3", "efficientnetv2_b0", "convnext_tiny",
                 "mobilenet_v3_small"):
        cls = table[name]
        assert issubclass(cls, transfer.TransferBuilder) and cls.inputs == "single" and cls.description
        assert name in weights.IMAGENET_FILES


def test_imagenet_file_table_matches_the_installed_keras():
    # The hashes and folders are copied from Keras' sources; a Keras that renames or
    # re-publishes a file must make this fail rather than the user's first search.
    for name, cls in zip(BACKBONES, transfer.BUILDERS):
        spec = weights.IMAGENET_FILES[name]
        module = importlib.import_module(f"keras.src.applications.{cls.backbone.module.replace('resnet50', 'resnet')}")
        source = inspect.getsource(module)
        assert spec.file_hash in source, name
        urls = [v for k, v in vars(module).items() if "PATH" in k and isinstance(v, str)]
        assert any(spec.url == u or (u.endswith("/") and spec.url.startswith(u)) for u in urls), (name, urls)
        assert spec.file_name.endswith(".h5") and ("notop" in spec.file_name or "no_top" in spec.file_name)


@pytest.mark.parametrize("name", BACKBONES)
def test_grayscale_becomes_the_backbones_own_input(name):
    x = np.random.default_rng(1).uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
    got = np.asarray(transfer.BackboneInput(name)(x))
    module = importlib.import_module(f"keras.applications.{transfer.BACKBONES[name].module}")
    expected = module.preprocess_input(np.repeat(x * 255.0, 3, axis=-1))
    assert got.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_too_small_images_are_refused_with_the_minimum():
    with pytest.raises(AutomammoError, match="vgg16 needs images of at least 32 px"):
        _builder("vgg16", image_size=31)
    with pytest.raises(AutomammoError, match="inception_v3 needs images of at least 75 px"):
        _builder("inception_v3", image_size=74)
    assert registry.get("builder", "inception_v3").min_image_size == 75


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_builds_and_fine_tunes_its_top_block(name):
    keras.backend.clear_session()
    builder = _builder(name)
    model = builder.build(_hp())
    base = transfer.base_of(model)
    grouped = transfer.blocks(base, builder.backbone)
    assert len(grouped) >= max(builder.backbone.unfreeze)
    assert base.trainable is False and model.get_layer("probabilities").trainable

    top = transfer.unfreeze_top(base, builder.backbone, 1)
    assert top == [grouped[-1][0]]
    # Eagerly: the same train step without minutes of graph tracing for seven backbones.
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=transfer.LOSS, run_eagerly=True)
    bn = [v for layer in base._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)
          for v in layer.non_trainable_weights]
    top_ids = {id(layer) for layer in grouped[-1][1]}
    in_top = [v for layer in base.layers if id(layer) in top_ids for v in layer.trainable_weights]
    below = [v for layer in base.layers if id(layer) not in top_ids for v in layer.weights]
    before = {id(v): np.array(v) for v in [*bn, *in_top, *below]}

    size = builder.context.image_size
    x = np.random.default_rng(0).uniform(0, 1, (4, size, size, 1)).astype(np.float32)
    model.train_on_batch(x, np.array([0, 1, 0, 1]))

    assert in_top and any(not np.array_equal(before[id(v)], np.array(v)) for v in in_top), "top block learns"
    assert all(np.array_equal(before[id(v)], np.array(v)) for v in below), "lower blocks stay frozen"
    # training=False keeps batch norm in inference mode: its statistics do not move.
    assert all(np.array_equal(before[id(v)], np.array(v)) for v in bn)
    p = np.asarray(model(x, training=False))
    assert p.shape == (4, 2) and np.allclose(p.sum(1), 1.0, atol=1e-5)


def test_flatten_is_offered_only_for_small_maps():
    keras.backend.clear_session()
    hp = kt.HyperParameters()
    _builder("vgg16").build(hp)  # 1 x 1 x 512 at 32 px
    assert "flatten" in _choices(hp, "pooling")
    hp = kt.HyperParameters()
    _builder("vgg16", image_size=256).build(hp)  # 8 x 8 x 512 > 7 x 7 x 512
    assert _choices(hp, "pooling") == ["avg", "max"]


def _choices(hp, name):
    return next(h.values for h in hp.space if h.name == name)


def test_epoch_budget_split():
    assert transfer.epoch_split(20, unfreeze=0) == (19, 1)
    assert transfer.epoch_split(20, unfreeze=2) == (10, 10)
    assert transfer.epoch_split(1, unfreeze=0) == (1, 1)
    assert transfer.epoch_split(1, unfreeze=1) == (1, 1)
    assert transfer.epoch_split(7, unfreeze=1, resumed=True) == (0, 7)
    assert transfer.epoch_split(7, unfreeze=0, resumed=True) == (6, 1)


# -- the two phases ---------------------------------------------------------------------------


def _tuner_callbacks(data, watch):
    """What automammo.search hands a builder's fit: objectives written into the logs from
    the full model's validation predictions, early stopping on them, then the save."""
    from automammo.objectives import make_callback

    return [make_callback([registry.get("objective", "auc")], lambda m: m.predict(data.x_val, verbose=0),
                          data.y_val, 1),
            keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=2, restore_best_weights=True),
            watch]


class _Watch(keras.callbacks.Callback):
    """Stands in for the tuner's callbacks: weights and flags when phase 2 starts and ends,
    and a save at the end, as automammo.search's _TrialEnd does."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_begin(self, logs=None):
        self.begin = [np.array(w) for w in self.model.weights]

    def on_train_end(self, logs=None):
        self.end = [np.array(w) for w in self.model.weights]
        self.trainable = {layer.name: layer.trainable for layer in self.model.layers}
        self.model.save(self.path)


@pytest.fixture(scope="module")
def vgg16_trials(tmp_path_factory):
    """Two head-only trials (unfreeze 0) of vgg16 sharing one run cache, then the features
    of changed data asked for by the second trial's builder. Returns what each saw."""
    tmp = tmp_path_factory.mktemp("vgg16")
    data = _data(32)
    out = []
    with _counting_base_passes() as calls:
        for i in range(2):
            keras.backend.clear_session()
            builder = _builder("vgg16", tmp)
            hp = _hp(unfreeze=0)
            model = builder.build(hp)
            watch = _Watch(tmp / f"trial{i}.keras")
            n_before = len(calls)
            history = builder.fit(hp, model, data, epochs=3, callbacks=_tuner_callbacks(data, watch))
            out.append({"model": model, "watch": watch, "history": history, "passes": calls[n_before:]})
        changed = TrialData(data.x_fit.copy(), data.y_fit, data.x_val, data.y_val, 2, data.augmentation)
        changed.x_fit[0, 0, 0, 0] = 1.0 - changed.x_fit[0, 0, 0, 0]
        n_before = len(calls)
        builder.features(model, changed)
        changed_passes = calls[n_before:]
    return {"trials": out, "data": data, "builder": builder, "cache": tmp / "features",
            "changed_passes": changed_passes}


def test_first_trial_fills_the_cache_with_8_variants(vgg16_trials):
    data = vgg16_trials["data"]
    assert sum(vgg16_trials["trials"][0]["passes"]) == N_SYMMETRIES * len(data.y_fit) + len(data.y_val)
    metas = [json.loads(m.read_text()) for m in vgg16_trials["cache"].glob("*/meta.json")]
    assert {m["key"]["pooling"] for m in metas} == {"avg", "max"}
    assert all(m["key"]["variants"] == N_SYMMETRIES and m["fit_shape"] == [8, 24, 512] for m in metas)


def test_second_trial_is_a_cache_hit_without_a_base_pass(vgg16_trials):
    assert vgg16_trials["trials"][1]["passes"] == []


def test_changed_data_invalidates_the_cache(vgg16_trials):
    data = vgg16_trials["data"]
    assert sum(vgg16_trials["changed_passes"]) == N_SYMMETRIES * len(data.y_fit) + len(data.y_val)


def test_cached_variants_equal_the_base_on_transformed_images(vgg16_trials):
    model, data = vgg16_trials["trials"][1]["model"], vgg16_trials["data"]
    features = vgg16_trials["builder"].features(model, data)
    assert features.hit and features.fit.shape == (N_SYMMETRIES, 24, 512)
    base, adapter = transfer.base_of(model), model.get_layer("backbone_input")
    for v in range(N_SYMMETRIES):
        img = tf.image.rot90(data.x_fit, v // 2)
        img = tf.image.flip_left_right(img) if v % 2 else img
        expected = keras.layers.GlobalAveragePooling2D()(base(adapter(img), training=False)).numpy()
        np.testing.assert_allclose(features.fit[v], expected, rtol=1e-4, atol=1e-5)
    # And the head sees, through the full model, exactly what it was trained on.
    head = transfer.head_model(model)
    np.testing.assert_allclose(head(np.asarray(features.val), training=False).numpy(),
                               model(data.x_val, training=False).numpy(), atol=1e-5)


def test_head_phase_early_stops_on_the_objective_and_phase_two_is_one_frozen_epoch(vgg16_trials):
    for trial in vgg16_trials["trials"]:
        head, history, watch = trial["history"].head_history, trial["history"], trial["watch"]
        assert len(head["val_auc"]) == 2  # 3 epochs: 2 for the head, 1 to evaluate
        assert len(history.history["val_auc"]) == 1
        # The evaluation epoch changes no weight, so its score is the head phase's best.
        assert all(np.array_equal(a, b) for a, b in zip(watch.begin, watch.end))
        assert history.history["val_auc"][0] == pytest.approx(max(head["val_auc"]), abs=1e-6)
        # Saved with its real flags: head trainable, base frozen.
        assert watch.trainable["probabilities"] and not watch.trainable["vgg16"]


def test_saved_model_reloads_safely_and_predicts_the_same(vgg16_trials):
    trial = vgg16_trials["trials"][0]
    again = keras.saving.load_model(trial["watch"].path, safe_mode=True)
    x = vgg16_trials["data"].x_val
    np.testing.assert_allclose(again.predict(x, verbose=0), trial["model"].predict(x, verbose=0), atol=1e-6)
    assert isinstance(again.get_layer("backbone_input"), transfer.BackboneInput)


def test_fine_tuning_phase_trains_the_top_block_with_the_tuners_callbacks(tmp_path):
    keras.backend.clear_session()
    builder = _builder("vgg16", tmp_path)
    hp = _hp(unfreeze=1, fine_tune_learning_rate=1e-4)
    model = builder.build(hp)
    watch, data = _Watch(tmp_path / "m.keras"), _data(32)
    history = builder.fit(hp, model, data, epochs=4, callbacks=_tuner_callbacks(data, watch))
    assert history.epoch == [2, 3]  # epochs 3-4 of 4, after 2 head epochs
    assert len(history.head_history["val_auc"]) == 2
    changed = {v.path.split("/")[-2] for v, a, b in zip(model.weights, watch.begin, watch.end)
               if not np.array_equal(a, b)}
    assert changed and all(name.startswith("block5_") or name.startswith("head_") or name == "probabilities"
                           for name in changed), changed


def test_free_rotation_trains_the_head_through_the_base(tmp_path):
    keras.backend.clear_session()
    builder = _builder("vgg16", tmp_path)
    hp = _hp(unfreeze=0)
    model = builder.build(hp)
    data = _data(32, augmentation=Augmentation(rotation=20.0))
    with _counting_base_passes() as calls:
        history = builder.fit(hp, model, data, epochs=2, callbacks=_tuner_callbacks(data, _Watch(tmp_path / "m.keras")))
    assert calls == [] and not (tmp_path / "features").exists()
    assert len(history.head_history["val_auc"]) == 1 and len(history.history["val_auc"]) == 1


# -- the feature cache ----------------------------------------------------------------------


def test_symmetries_are_the_image_pipelines_eight():
    x = np.random.default_rng(0).uniform(0, 1, (2, 5, 5, 1)).astype(np.float32)
    seen = set()
    for v in range(N_SYMMETRIES):
        img = tf.image.rot90(x, v // 2)
        img = tf.image.flip_left_right(img) if v % 2 else img
        np.testing.assert_array_equal(symmetry(x, v), img.numpy())
        seen.add(symmetry(x, v).tobytes())
    assert len(seen) == N_SYMMETRIES


def _fake_base(images):
    # Not equivariant, like a real CNN: a symmetric image set would hide a wrong variant.
    weights_ = np.arange(1, images.shape[1] + 1, dtype=np.float32)[None, :, None, None]
    return np.concatenate([images * weights_, images[:, ::-1] ** 2], axis=-1)


def test_feature_cache_stores_reuses_and_keys_on_everything(tmp_path):
    calls = []

    def extract(images):
        calls.append(len(images))
        return _fake_base(images)

    rng = np.random.default_rng(0)
    x_fit, x_val = rng.uniform(0, 1, (7, 4, 4, 1)), rng.uniform(0, 1, (3, 4, 4, 1))
    key = FeatureKey("fake", "w", 4, fingerprint(x_fit, x_val), "flatten", N_SYMMETRIES)
    cache = FeatureCache(tmp_path, chunk=3)
    first = cache.get(key, x_fit, x_val, extract)
    assert not first.hit and sum(calls) == 8 * 7 + 3
    for v in range(N_SYMMETRIES):
        np.testing.assert_allclose(first.fit[v], pool(_fake_base(symmetry(x_fit, v)), "flatten"), rtol=1e-6)
    np.testing.assert_allclose(first.val, pool(_fake_base(x_val), "flatten"), rtol=1e-6)

    calls.clear()
    again = cache.get(key, x_fit, x_val, extract)
    assert again.hit and calls == [] and isinstance(again.fit, np.memmap)
    np.testing.assert_array_equal(again.fit, first.fit)
    # avg and max were computed in the same pass as flatten.
    for p in ("avg", "max"):
        other = FeatureKey("fake", "w", 4, key.data, p, N_SYMMETRIES)
        got = cache.get(other, x_fit, x_val, extract)
        assert got.hit and calls == []
        np.testing.assert_allclose(got.fit[3], pool(_fake_base(symmetry(x_fit, 3)), p), rtol=1e-6)
    assert not list(tmp_path.glob(".*")), "no temporary folder is left behind"

    x_changed = x_fit.copy()
    x_changed[2, 1, 1, 0] += 0.5
    for changed in (FeatureKey("fake", "w2", 4, key.data, "flatten", 8),
                    FeatureKey("other", "w", 4, key.data, "flatten", 8),
                    FeatureKey("fake", "w", 4, fingerprint(x_changed, x_val), "flatten", 8),
                    FeatureKey("fake", "w", 4, key.data, "flatten", 1)):
        assert changed.digest() != key.digest()
        assert cache.load(changed, 7, 3) is None

    (cache.entry_path(key) / "val.npy").unlink()  # a damaged entry is recomputed, not trusted
    calls.clear()
    assert not cache.get(key, x_fit, x_val, extract).hit and sum(calls) == 8 * 7 + 3


def test_feature_cache_without_a_folder_computes_in_memory(tmp_path):
    calls = []

    def extract(images):
        calls.append(len(images))
        return _fake_base(images)

    x_fit, x_val = np.ones((3, 4, 4, 1)), np.zeros((2, 4, 4, 1))
    key = FeatureKey("fake", "w", 4, fingerprint(x_fit, x_val), "avg", 1)
    got = FeatureCache(None).get(key, x_fit, x_val, extract)
    assert not got.hit and got.path is None and got.fit.shape == (1, 3, 2) and sum(calls) == 5
    np.testing.assert_allclose(got.fit[0], pool(_fake_base(x_fit), "avg"))
    FeatureCache(None).get(key, x_fit, x_val, extract)
    assert sum(calls) == 10, "nothing is kept between calls without a folder"


def test_fingerprint_follows_content_not_identity():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert fingerprint(a) == fingerprint(a.copy())
    assert fingerprint(a) != fingerprint(a.reshape(4, 3)) != fingerprint(a.astype(np.float64))
    b = a.copy()
    b[0, 0] = -1
    assert fingerprint(a) != fingerprint(b)


def test_feature_batches_draw_each_variant_uniformly_and_every_patch_once_per_epoch():
    n = 40
    features = np.array([[[v * 1000 + i] for i in range(n)] for v in range(N_SYMMETRIES)], dtype=np.float32)
    y = np.arange(n) % 2
    batches = transfer.FeatureBatches(features, y, batch_size=16, class_weight={0: 1.0, 1: 3.0}, seed=0)
    assert len(batches) == 3
    variants = []
    for _ in range(50):
        seen = []
        for i in range(len(batches)):
            x, yb, w = batches[i]
            idx, var = x[:, 0].astype(int) % 1000, x[:, 0].astype(int) // 1000
            np.testing.assert_array_equal(yb, y[idx])
            np.testing.assert_array_equal(w, np.where(y[idx] == 1, 3.0, 1.0))
            seen += list(idx)
            variants += list(var)
        assert sorted(seen) == list(range(n))
        batches.on_epoch_end()
    counts = np.bincount(variants, minlength=N_SYMMETRIES)
    assert counts.sum() == 50 * n and counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


# -- weights ------------------------------------------------------------------------------------


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network, an empty Keras cache and an empty weights directory."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))

    def fail(spec):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(weights, "download", fail)
    monkeypatch.setattr(weights, "reachable", lambda url: "Name or service not known")
    return tmp_path


def test_imagenet_offline_is_one_clear_error_never_random_weights(offline):
    spec = weights.IMAGENET_FILES["vgg16"]
    builder = _builder("vgg16", weights="imagenet")
    with pytest.raises(AutomammoError) as caught:
        builder.build(_hp())
    message = str(caught.value)
    assert "\n" not in message
    for needed in (spec.file_name, spec.url, str(offline / "weights"), str(offline / "keras-home" / "models"),
                   "--weights none"):
        assert needed in message
    reason = type(builder).unavailable(builder.context)
    assert spec.file_name in reason and str(offline / "weights") in reason


def test_an_explicit_builder_without_weights_stops_the_search_before_it_starts(offline):
    from automammo.search import Reporter, SearchConfig, choose_builders
    from automammo.tasks import get_task

    task = get_task("benign-malignant")
    context = BuildContext(image_size=32, n_classes=2, weights="imagenet")
    with pytest.raises(AutomammoError, match="builder vgg16 cannot run: ImageNet weights for vgg16"):
        choose_builders(SearchConfig(builders=["vgg16"]), context, task, False, Reporter())
    skipped = []

    class Collect(Reporter):
        def message(self, text):
            skipped.append(text)

    chosen = choose_builders(SearchConfig(builders=[]), context, task, False, Collect())
    assert not set(chosen) & set(BACKBONES)
    assert any(m.startswith("skipping builder resnet50: ImageNet weights") for m in skipped)


def _save_legacy_h5(model, path):
    """Write weights in the legacy HDF5 layout of Keras' published ImageNet files."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


def test_imagenet_file_is_taken_from_the_weights_directory_and_checked(offline, monkeypatch):
    keras.backend.clear_session()
    donor = _builder("vgg16").base_model()
    spec = weights.IMAGENET_FILES["vgg16"]
    (offline / "weights").mkdir()
    path = offline / "weights" / spec.file_name
    _save_legacy_h5(donor, path)

    with pytest.raises(AutomammoError, match=f"{spec.file_name} is not the published vgg16 ImageNet file"):
        _builder("vgg16", weights="imagenet").base_model()

    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    monkeypatch.setitem(weights.IMAGENET_FILES, "vgg16", weights.WeightsFile(spec.file_name, spec.folder, md5))
    builder = _builder("vgg16", weights="imagenet", seed=99)  # another seed: random init would differ
    assert type(builder).unavailable(builder.context) is None
    loaded = builder.base_model()
    assert all(np.array_equal(a, b) for a, b in zip(donor.get_weights(), loaded.get_weights()))


def test_a_weights_file_path_loads_and_a_misfit_is_refused(tmp_path):
    keras.backend.clear_session()
    donor = _builder("vgg16").base_model()
    path = tmp_path / "mammo-pretrained.weights.h5"
    donor.save_weights(path)
    builder = _builder("vgg16", weights=str(path), seed=7)
    assert type(builder).unavailable(builder.context) is None
    loaded = builder.base_model()
    assert all(np.array_equal(a, b) for a, b in zip(donor.get_weights(), loaded.get_weights()))

    vgg19 = registry.get("builder", "vgg19")
    reason = vgg19.unavailable(BuildContext(image_size=32, n_classes=2, weights=str(path)))
    assert reason and "does not fit vgg19" in reason
    missing = vgg19.unavailable(BuildContext(image_size=32, n_classes=2, weights=str(tmp_path / "nope.h5")))
    assert missing and "no such file" in missing


def test_random_weights_are_fixed_per_search_seed():
    keras.backend.clear_session()
    a = _builder("vgg16", seed=3).base_model().get_weights()
    b = _builder("vgg16", seed=3).base_model().get_weights()
    c = _builder("vgg16", seed=4).base_model().get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


# -- a search ---------------------------------------------------------------------------------------


def test_a_search_with_two_transfer_trials_runs_end_to_end(tmp_path):
    from conftest import make_dataset

    from automammo.runs import Run
    from automammo.search import SearchConfig, run_search

    path = tmp_path / "data.npz"
    make_dataset(n_pairs=48, size=32, dtype=np.uint8).save(path)
    from automammo import registry

    # F2 has a warm-up (min(patience, epochs // 4) = 1 epoch) that the second phase, which
    # starts at a later absolute epoch, must not be charged twice for.
    config = SearchConfig(data=str(path), task="benign-malignant", objective="f2", builders=["vgg16"],
                          weights="none", image_size=32, trials=2, epochs=4, patience=1, tensorboard=False)
    result = run_search(config, tmp_path / "run")
    run = Run(result.run_dir)
    trials = run.trials()
    assert [t["status"] for t in trials] == ["COMPLETED", "COMPLETED"]
    f2 = registry.objectives()["f2"]
    for t in trials:
        assert t["builder"] == "vgg16" and {"unfreeze", "pooling", "dropout"} <= set(t["hyperparameters"])
        assert 1 <= t["epochs"] <= 4
        # The oracle's score is the kept model's: F2 at the best threshold of its saved predictions.
        p = run.load_preds(t["trial_id"])
        assert f2.best_threshold(p["y_true"], p["y_prob"].astype(np.float64), 1)[1] == pytest.approx(t["score"], abs=1e-6)
    assert list((run.cache_dir / "features").glob("*/meta.json"))
    best = keras.saving.load_model(run.best_model_path, safe_mode=True)
    preds = run.load_preds(result.best["trial_id"])
    import automammo.dataset as dataset_module
    from automammo.preprocess import Preprocessing

    ds = dataset_module.load(path)
    x = Preprocessing.from_dict(run.config()["preprocessing"]).apply(ds.x[preds["index"]])
    np.testing.assert_allclose(best.predict(x, verbose=0), preds["y_prob"], atol=1e-5)
