"""Every registered builder: builds, trains a step, saves, reloads with safe_mode, predicts the same."""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np
import pytest

from automammo import registry
from automammo.builders import BuildContext, BuilderChoice, builder_hyperparameters

BUILDERS = sorted(registry.builders())


def _inputs(cls, size, n=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, size, size, 1)).astype("float32")
    if cls.inputs == "pair":
        return {"lesion": x, "baseline": rng.uniform(0, 1, (n, size, size, 1)).astype("float32")}
    return x


@pytest.mark.parametrize("name", BUILDERS)
def test_builder_trains_saves_and_reloads(name, tmp_path):
    cls = registry.builders()[name]
    assert cls.name == name and cls.description and cls.inputs in ("single", "pair")
    size = max(32, cls.min_image_size)
    builder = cls(BuildContext(image_size=size, n_classes=3, weights="none", cache_dir=tmp_path))
    model = builder.build(kt.HyperParameters())
    # Eager steps: tracing a large backbone's graph for one step costs more than the step.
    model.compile(optimizer=model.optimizer, loss=model.loss, run_eagerly=True)
    x = _inputs(cls, size)
    y = np.array([0, 1, 2, 1])
    before = [v.numpy().copy() for v in model.trainable_weights]
    model.train_on_batch(x, y)
    after = [v.numpy() for v in model.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), "a step changes weights"
    p = np.asarray(model(x, training=False))
    assert p.shape == (4, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    again = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(again(x, training=False)), p, atol=1e-5)


@pytest.mark.parametrize("name", BUILDERS)
def test_builder_refuses_too_small_images(name):
    cls = registry.builders()[name]
    with pytest.raises(Exception, match=f"at least {cls.min_image_size} px"):
        cls(BuildContext(image_size=cls.min_image_size - 1, n_classes=2, weights="none"))


def test_builder_choice_scopes_each_family():
    hm = BuilderChoice({"scratch_cnn": registry.builders()["scratch_cnn"](BuildContext(image_size=32, n_classes=2))})
    hp = kt.HyperParameters()
    hm.build(hp)
    name, own = builder_hyperparameters(hp.values)
    assert name == "scratch_cnn"
    assert {"conv_blocks", "learning_rate", "batch_size", "class_weight"} <= set(own)
    assert all(k.startswith("scratch_cnn/") or k == "builder" for k in hp.values)


def test_scratch_space_matches_the_seed_experiments():
    cls = registry.builders()["scratch_cnn"]
    hp = kt.HyperParameters()
    cls(BuildContext(image_size=128, n_classes=2)).build(hp)
    space = {h.name: h for h in hp.space}
    assert (space["conv_blocks"].min_value, space["conv_blocks"].max_value) == (2, 5)
    assert set(space["optimizer"].values) == {"adam", "rmsprop"}
    assert set(space["class_weight"].values) == {"none", "balanced"}
    assert max(space["dense_units_0"].values) == 512 and min(space["dense_units_0"].values) == 16


def test_predict_probabilities_matches_keras_predict():
    from automammo.builders import predict_probabilities

    lesion, baseline = keras.Input((8, 8, 1), name="lesion"), keras.Input((8, 8, 1), name="baseline")
    x = keras.layers.Concatenate()([lesion, baseline])
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x))
    model = keras.Model({"lesion": lesion, "baseline": baseline}, out)
    rng = np.random.default_rng(0)
    inputs = {"lesion": rng.uniform(size=(300, 8, 8, 1)).astype("float32"),
              "baseline": rng.uniform(size=(300, 8, 8, 1)).astype("float32")}
    # 300 = two full chunks of 128 and a partial one.
    np.testing.assert_allclose(predict_probabilities(model, inputs), model.predict(inputs, verbose=0), atol=1e-6)
    single = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    np.testing.assert_allclose(predict_probabilities(single, inputs["lesion"], 64),
                               single.predict(inputs["lesion"], verbose=0), atol=1e-6)
