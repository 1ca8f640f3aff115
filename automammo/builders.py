"""What a model builder is: a Keras Tuner HyperModel with a name, its inputs and a space.

A builder subclasses ``Builder``, sets ``name``, ``inputs`` ("single" or "pair") and
``description``, and implements ``build_model(hp)`` returning an uncompiled Keras model whose
output is a float32 softmax over the task's classes. Single models take one (S, S, 1)
input; pair models take a dict ``{"lesion": ..., "baseline": ...}`` of two such inputs.
The base class adds the training hyperparameters (optimizer, learning rate, batch size,
class weights), compiles, and fits on the ``TrialData`` pipelines; a builder with a
different schedule (e.g. frozen then fine-tuned) overrides ``fit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import keras
import keras_tuner as kt
import numpy as np

from automammo.errors import AutomammoError, UnknownNameError
from automammo.preprocess import TrialData


@dataclass(frozen=True)
class BuildContext:
    """What a builder needs to know about the search it serves.

    Attributes:
        image_size: side of the square input.
        n_classes: outputs of the softmax.
        task: task name.
        seed: the search seed.
        weights: pretrained weights for builders that use them: "imagenet", "none" or a path.
        weights_dir: directory holding downloaded Keras weight files.
        cache_dir: where a builder may cache expensive intermediate results for this run.
        objective: name of the objective the search optimises (``val_<name>`` in the logs).
        direction: ``"max"`` or ``"min"``, the objective's direction.
        patience: early-stopping patience, for builders that train in several phases.
        options: free options a third-party builder may read.
    """

    image_size: int
    n_classes: int
    task: str = ""
    seed: int = 0
    weights: str = "imagenet"
    weights_dir: str | None = None
    cache_dir: Path | None = None
    objective: str = "auc"
    direction: str = "max"
    patience: int = 4
    options: dict = field(default_factory=dict)


class Builder(kt.HyperModel):
    """Base class of every model family. Subclasses implement ``build_model``."""

    name: ClassVar[str] = ""
    inputs: ClassVar[str] = "single"
    description: ClassVar[str] = ""
    min_image_size: ClassVar[int] = 16

    def __init__(self, context: BuildContext):
        super().__init__(name=self.name)
        self.context = context
        if context.image_size < self.min_image_size:
            raise AutomammoError(
                f"builder {self.name} needs images of at least {self.min_image_size} px, "
                f"got --image-size {context.image_size}"
            )

    # -- what subclasses implement -------------------------------------------------
    def build_model(self, hp: kt.HyperParameters) -> keras.Model:
        raise NotImplementedError

    def training_space(self, hp: kt.HyperParameters) -> dict:
        """Training hyperparameters; override to change their ranges."""
        return {
            "optimizer": hp.Choice("optimizer", ["adam", "rmsprop"]),
            "learning_rate": hp.Float("learning_rate", 1e-4, 3e-3, sampling="log", default=1e-3),
            "batch_size": hp.Choice("batch_size", [16, 32, 64], default=32),
            "class_weight": hp.Choice("class_weight", ["none", "balanced"]),
        }

    # -- shared machinery ----------------------------------------------------------
    def input_layers(self):
        """(inputs, tensors): the Keras inputs this builder's ``inputs`` kind needs."""
        shape = (self.context.image_size, self.context.image_size, 1)
        if self.inputs == "pair":
            inputs = {"lesion": keras.Input(shape, name="lesion"),
                      "baseline": keras.Input(shape, name="baseline")}
            return inputs, inputs
        x = keras.Input(shape, name="lesion")
        return x, x

    def classifier(self, x):
        """The output layer: float32 softmax even under mixed precision."""
        return keras.layers.Dense(self.context.n_classes, activation="softmax", dtype="float32",
                                  name="probabilities")(x)

    def build(self, hp):
        model = self.build_model(hp)
        space = self.training_space(hp)
        model.compile(optimizer=make_optimizer(space["optimizer"], space["learning_rate"]),
                      loss="sparse_categorical_crossentropy")
        return model

    def fit(self, hp, model, data: TrialData, epochs: int = 10, callbacks=None, verbose=0, **kwargs):
        space = self.training_space(hp)
        pair = self.inputs == "pair"
        # In a search the objectives callback scores the validation set every epoch (and
        # logs val_loss); Keras' own validation pass would only repeat it.
        scored = any(getattr(c, "scores_validation", False) for c in callbacks or [])
        return model.fit(
            data.dataset("fit", space["batch_size"], pair),
            validation_data=None if scored else data.dataset("val", space["batch_size"], pair),
            epochs=epochs,
            initial_epoch=kwargs.get("initial_epoch", 0),
            callbacks=callbacks,
            class_weight=data.class_weight(space["class_weight"]),
            verbose=verbose,
            shuffle=False,  # the fit pipeline shuffles itself
        )


def predict_probabilities(model, inputs, batch_size: int = 128) -> np.ndarray:
    """``model.predict`` without its per-call set-up (a data adapter, an iterator and a
    progress bar each time: ~80 ms for a small validation set, paid every epoch): the
    model's compiled predict step on each chunk of the arrays."""
    n = len(next(iter(inputs.values())) if isinstance(inputs, dict) else inputs)
    parts = []
    for start in range(0, n, batch_size):
        chunk = ({k: v[start:start + batch_size] for k, v in inputs.items()} if isinstance(inputs, dict)
                 else inputs[start:start + batch_size])
        parts.append(np.asarray(model.predict_on_batch(chunk)))
    return np.concatenate(parts) if parts else np.zeros((0, model.output_shape[-1]), np.float32)


def make_optimizer(name: str, learning_rate: float):
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    raise UnknownNameError("optimizer", name, ["adam", "rmsprop", "sgd"])


class BuilderChoice(kt.HyperModel):
    """One HyperModel over several builders: ``builder`` is itself a hyperparameter.

    Each builder's hyperparameters live under its own name scope and are active only when
    it is chosen, so the oracle searches families and their spaces jointly.
    """

    def __init__(self, builders: dict[str, Builder]):
        super().__init__(name="automammo")
        self.builders = builders

    def _scoped(self, hp):
        name = hp.Choice("builder", list(self.builders))
        return name, self.builders[name]

    def build(self, hp):
        name, builder = self._scoped(hp)
        with hp.conditional_scope("builder", [name]), hp.name_scope(name):
            model = builder.build(hp)
        if "tuner/trial_id" in hp.values:
            # Hyperband continues this trial from an earlier one's checkpoint, which it
            # loads right after this build. Keras loads an optimizer's saved moments only
            # into an optimizer that has built its own; unbuilt, it skips them with a
            # warning and the continued trial restarts Adam or RMSprop from zero moments.
            optimizer = getattr(model, "optimizer", None)
            if optimizer is not None and not optimizer.built:
                optimizer.build(model.trainable_variables)
        return model

    def fit(self, hp, model, *args, **kwargs):
        name, builder = self._scoped(hp)
        with hp.conditional_scope("builder", [name]), hp.name_scope(name):
            return builder.fit(hp, model, *args, **kwargs)


def builder_hyperparameters(values: dict) -> tuple[str, dict]:
    """(builder name, its own hyperparameters without the scope prefix) from trial values."""
    name = values.get("builder", "")
    prefix = f"{name}/"
    own = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}
    tuner = {k: v for k, v in values.items() if k.startswith("tuner/")}
    own.update(tuner)
    return name, own
