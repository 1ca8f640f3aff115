"""Custom Keras layers of the built-in model families, and the one way to load a saved model.

Saved models must load with ``keras.saving.load_model(path, safe_mode=True)``, which refuses
``Lambda`` layers (they carry pickled Python code). Any operation Keras does not ship as a
layer is therefore a class here, registered under the package name ``automammo`` with a
``get_config``, so that the ``.keras`` file names it and Keras can rebuild it from its
config alone.

Keras looks a registered class up by name when it loads a file, so this module must have
been imported before a model is loaded, and so must any plugin module that registers
layers of its own: ``load_model`` below does both. The module imports nothing but Keras at
import time, so it adds no cost to a process that loads models anyway.
"""

from __future__ import annotations

import os

import keras

PACKAGE = "automammo"


@keras.saving.register_keras_serializable(package=PACKAGE)
class PairMerge(keras.layers.Layer):
    """Combines a siamese network's two embeddings, f(a) and f(b), into one feature vector.

    Modes:
        ``abs_diff``: |f(a) - f(b)|, symmetric in a and b; the classic siamese comparison,
            which keeps only how the two patches differ.
        ``concat_diff_prod``: [f(a), f(b), f(a) - f(b), f(a) * f(b)], four times as wide;
            keeps the lesion's own features and both how and where the embeddings agree.

    Args:
        mode: one of ``MODES``.
        **kwargs: passed to ``keras.layers.Layer`` (name, dtype, ...).

    Call args:
        inputs: a list ``[a, b]`` of two tensors of the same shape ``(batch, features)``.
    """

    MODES = ("abs_diff", "concat_diff_prod")

    def __init__(self, mode: str = "abs_diff", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"PairMerge mode must be one of {', '.join(self.MODES)}; got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        a, b = inputs
        difference = keras.ops.subtract(a, b)
        if self.mode == "abs_diff":
            return keras.ops.abs(difference)
        return keras.ops.concatenate([a, b, difference, keras.ops.multiply(a, b)], axis=-1)

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape[0])
        if self.mode == "abs_diff" or shape[-1] is None:
            return shape
        return (*shape[:-1], 4 * shape[-1])

    def get_config(self):
        config = super().get_config()
        config["mode"] = self.mode
        return config


def load_model(path: str | os.PathLike, compile: bool = True) -> keras.Model:
    """Load a saved automammo model with ``safe_mode=True``, every known layer registered.

    The layers above are registered by this module's import; layers of plugins (built-in
    or third-party, e.g. the transfer family's ``BackboneInput``) when the plugin manager
    imports their modules, which this function makes sure of.

    Args:
        path: a ``.keras`` file written by ``model.save``.
        compile: restore the optimizer and loss too (False for prediction only).

    Returns:
        The model.
    """
    from automammo import registry  # here, not at the top: it imports every plugin

    registry.get_plugin_manager()
    return keras.saving.load_model(os.fspath(path), compile=compile, safe_mode=True)
