"""Strategy and precision options: they build and train on the CPU, and reach Keras Tuner's trials."""

from __future__ import annotations

import keras
import keras_tuner as kt
import numpy as np
import pytest
import tensorflow as tf

from automammo import accel, distributed
from automammo.builders import BuildContext
from automammo.errors import AutomammoError
from automammo.preprocess import Preprocessing, TrialData
from automammo.runs import Run
from automammo.search import Reporter, SearchConfig
from automammo_plugins.scratch_cnn import ScratchCNN


@pytest.fixture(autouse=True)
def _float32_after():
    # The precision policy is process-global: leave the next test the default.
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def trial_data(small_dataset):
    x = Preprocessing(32, 4095.0).apply(small_dataset.x)
    y = (small_dataset.label > 0).astype(int)
    return TrialData(x[:96], y[:96], x[96:128], y[96:128], 2)


def _build(strategy):
    builder = ScratchCNN(BuildContext(image_size=32, n_classes=2))
    hp = kt.HyperParameters()
    if strategy is None:
        return builder, hp, builder.build(hp)
    with strategy.scope():
        return builder, hp, builder.build(hp)


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(AutomammoError, match="unknown strategy 'tpu'; known: default, mirrored"):
        accel.configure("tpu", "float32")
    with pytest.raises(AutomammoError, match="unknown precision 'int8'; known: float32, mixed"):
        accel.configure("default", "int8")


def test_mixed_precision_builds_float16_layers_and_trains_a_step(trial_data):
    messages = []
    reporter = Reporter()
    reporter.message = messages.append
    assert accel.configure("default", "mixed", reporter) is None
    builder, hp, model = _build(None)
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert conv.compute_dtype == "float16" and conv.kernel.dtype == "float32", "float16 maths, float32 weights"
    assert model.get_layer("probabilities").compute_dtype == "float32", "the output layer stays float32"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer), "loss scaling against underflow"
    history = builder.fit(hp, model, trial_data, epochs=1)
    assert np.isfinite(history.history["loss"][0]) and np.isfinite(history.history["val_loss"][0])
    p = model.predict(trial_data.x_val, verbose=0)
    assert p.dtype == np.float32 and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    if not tf.config.list_physical_devices("GPU"):
        assert any("slower" in m for m in messages), "the user is told float16 on a CPU does not pay"


def test_float32_resets_a_mixed_policy():
    accel.configure("default", "mixed")
    accel.configure("default", "float32")
    assert keras.mixed_precision.global_policy().name == "float32"


def test_mirrored_strategy_replicates_variables_and_trains_a_step(trial_data):
    strategy = accel.configure("mirrored", "float32")
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    gpus = len(tf.config.list_physical_devices("GPU"))
    assert strategy.num_replicas_in_sync == max(1, gpus)
    builder, hp, model = _build(strategy)
    assert isinstance(model.weights[0].value, tf.distribute.DistributedValues), "variables live on every replica"
    weights = [w.numpy().copy() for w in model.trainable_weights]
    history = builder.fit(hp, model, trial_data, epochs=1)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.allclose(a, w.numpy()) for a, w in zip(weights, model.trainable_weights)), "it trained"


def test_strategy_and_precision_reach_a_keras_tuner_trial(tmp_path, small_dataset_path, small_dataset, monkeypatch):
    # A worker's tuner, run in this process: the strategy goes in as Keras Tuner's
    # distribution_strategy and the search's precision comes from its configuration.
    config = SearchConfig(data=str(small_dataset_path), task="benign-malignant", objective="auc",
                          builders=["scratch_cnn"], trials=1, epochs=1, image_size=32, tensorboard=False)
    stored = {"search": {**config.__dict__, "strategy": "mirrored", "precision": "mixed"},
              "data_fingerprint": small_dataset.fingerprint(), "builders": ["scratch_cnn"]}
    strategy = accel.configure(stored["search"]["strategy"], stored["search"]["precision"])
    seen = []
    build_model = ScratchCNN.build_model

    def spy(self, hp):
        seen.append(tf.distribute.get_strategy())
        return build_model(self, hp)

    monkeypatch.setattr(ScratchCNN, "build_model", spy)
    run = Run(tmp_path / "r")
    tuner, _ = distributed._worker_tuner(run, stored, Reporter(), strategy)
    tuner.search(epochs=1, verbose=0)
    assert seen and seen[-1] is strategy, "Keras Tuner built the trial's model inside the strategy"
    (record,) = run.trials()
    assert record["status"] == "COMPLETED" and np.isfinite(record["score"])
    # compile=False, as bundles load models: Keras cannot restore a LossScaleOptimizer's
    # state into the plain optimizer it recompiles (it warns), and predicting needs neither.
    model = keras.saving.load_model(run.model_path(record["trial_id"]), compile=False, safe_mode=True)
    assert model.get_layer("probabilities").dtype_policy.name == "float32"
    assert any(layer.dtype_policy.name == "mixed_float16" for layer in model.layers), "saved as it trained"
