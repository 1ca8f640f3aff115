"""Transfer learning from ImageNet backbones, trained frozen and then fine-tuned.

One builder per backbone: ``vgg16``, ``vgg19``, ``resnet50``, ``inception_v3``,
``efficientnetv2_b0``, ``convnext_tiny``, ``mobilenet_v3_small``. Each model is

    lesion (S, S, 1) in [0, 1]
      -> BackboneInput: x 255, grey -> 3 channels, the backbone's own ``preprocess_input``
      -> the keras.applications base without its top, called with ``training=False``
      -> pooling (global average, global max, or flatten when the map is small)
      -> 1-2 dense layers of 128-512 units with dropout -> softmax

One trial runs two phases on the budget of ``epochs``:

1. **Head** (base frozen). The base's output cannot change, so it is computed once per
   backbone, weights, image size and data (``automammo.feature_cache``, 8 symmetric copies
   of every fit patch so that the default augmentation stays exact) and the head trains on
   those features alone, with its own objective callback and early stopping on the
   search's objective. The head layers are the full model's own layer objects, so the full
   model holds the trained head when this phase ends: nothing is copied.
2. **Full model**, through ``model.fit`` with the tuner's callbacks, so that the trial's
   score, saved model, predictions and logs are those of the image model. With
   ``unfreeze = k > 0`` the top ``k`` blocks of the base become trainable (batch-norm layers
   excepted, and the base still runs with ``training=False``, so their statistics stay
   ImageNet's) and the model fine-tunes at ``fine_tune_learning_rate``. With
   ``unfreeze = 0`` nothing is left to learn: one evaluation epoch, with every weight frozen,
   scores and saves the model the head phase produced.

See docs/transfer.md for the epoch budget, the cache and the weights files.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import random
import re
import warnings
from dataclasses import dataclass
from typing import ClassVar

import keras
import numpy as np

from automammo import hookimpl, weights
from automammo.builders import Builder, make_optimizer, predict_probabilities
from automammo.errors import AutomammoError
from automammo.feature_cache import FeatureCache, FeatureKey, fingerprint, weights_fingerprint
from automammo.preprocess import TrialData

# Flatten is offered only up to the size of VGG16's classic 7 x 7 x 512 map at 224 px: a
# ResNet's 7 x 7 x 2048 would feed 100 000 inputs into every unit of a dense layer.
FLATTEN_LIMIT = 7 * 7 * 512
LOSS = "sparse_categorical_crossentropy"
# Phrases of the warnings Keras gives when it loads a weights file only in part.
_PARTIAL_LOAD = ("could not be loaded", "freshly-initialized", "Skipping")


@dataclass(frozen=True)
class Backbone:
    """How to build, feed and fine-tune one keras.applications network.

    Attributes:
        application: the constructor's name in ``keras.applications``.
        module: the ``keras.applications`` submodule whose ``preprocess_input`` applies.
        block: a regular expression whose group 1 names the block a layer belongs to;
            layers it does not match (stems, transitions, activations named by Keras'
            counter) join the next block, trailing ones the last block.
        unfreeze: the searched numbers of top blocks to fine-tune; 0 keeps the base frozen.
    """

    application: str
    module: str
    block: str
    unfreeze: tuple[int, ...]

    @property
    def preprocess_input(self):
        return importlib.import_module(f"keras.applications.{self.module}").preprocess_input


@keras.saving.register_keras_serializable(package="automammo")
class BackboneInput(keras.layers.Layer):
    """Grayscale patches in [0, 1] -> the input an ImageNet backbone was trained on.

    Scales to 0-255, repeats the one channel as R, G and B, and applies the backbone's own
    ``keras.applications.<module>.preprocess_input`` (caffe-style BGR mean subtraction for
    VGG and ResNet, [-1, 1] for Inception; EfficientNetV2, ConvNeXt and MobileNetV3 scale
    inside the network and their ``preprocess_input`` passes the 0-255 values through).

    Args:
        backbone: a builder name of this module (``vgg16``, ``resnet50``, ...).
        **kwargs: passed to ``keras.layers.Layer``.
    """

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(sorted(BACKBONES))}")
        self.backbone = backbone

    def call(self, x):
        x = keras.ops.multiply(keras.ops.cast(x, self.compute_dtype), 255.0)
        return BACKBONES[self.backbone].preprocess_input(keras.ops.concatenate([x, x, x], axis=-1))

    def compute_output_shape(self, input_shape):
        return (*tuple(input_shape)[:-1], 3)

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


def extract_features(base: keras.Model, adapter: keras.layers.Layer, images: np.ndarray) -> np.ndarray:
    """The frozen base's feature maps of (n, S, S, 1) patches: the one costly forward pass."""
    return base.predict(np.asarray(adapter(images)), batch_size=32, verbose=0)


class FeatureBatches(keras.utils.PyDataset):
    """Batches of cached features: each epoch a new order and, per patch, one of the cached
    symmetry variants drawn uniformly, as the image pipeline draws one symmetry per patch.

    Args:
        features: (variants, N, D) array (typically memory-mapped).
        y: (N,) class indices.
        batch_size: patches per batch.
        class_weight: class -> weight, applied as sample weights, or None.
        seed: seeds the order and the variant draws.
    """

    def __init__(self, features, y, batch_size: int, class_weight: dict | None = None, seed: int = 0):
        super().__init__()
        self.features, self.y, self.batch_size = features, np.asarray(y), int(batch_size)
        self.sample_weight = (None if class_weight is None else
                              np.array([class_weight[int(c)] for c in self.y], dtype=np.float32))
        self.rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def __len__(self):
        return math.ceil(len(self.y) / self.batch_size)

    def __getitem__(self, i):
        idx = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        x = np.asarray(self.features[self.variant[idx], idx], dtype=np.float32)
        if self.sample_weight is None:
            return x, self.y[idx]
        return x, self.y[idx], self.sample_weight[idx]

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.y))
        self.variant = self.rng.integers(0, len(self.features), len(self.y))


class TransferBuilder(Builder):
    """A keras.applications backbone with a searched head, frozen then fine-tuned."""

    inputs = "single"
    backbone: ClassVar[Backbone]

    # -- availability ------------------------------------------------------------------
    @classmethod
    def unavailable(cls, context) -> str | None:
        """Why this backbone cannot run with the search's weights (None when it can)."""
        reason = weights.unavailable(cls.name, context.weights, context.weights_dir)
        if reason is None and weights.weights_kind(context.weights) == "path":
            reason = _file_misfit(cls, str(context.weights), context.image_size)
        return reason

    # -- the space --------------------------------------------------------------------
    def training_space(self, hp):
        """The head phase's training hyperparameters; a head alone takes larger steps."""
        return {
            "optimizer": hp.Choice("optimizer", ["adam", "rmsprop"]),
            "learning_rate": hp.Float("learning_rate", 1e-4, 1e-2, sampling="log", default=1e-3),
            "batch_size": hp.Choice("batch_size", [16, 32, 64], default=32),
            "class_weight": hp.Choice("class_weight", ["none", "balanced"]),
        }

    def fine_tune_space(self, hp) -> tuple[int, float | None]:
        """(unfreeze, fine-tuning learning rate); the rate exists only when unfreeze > 0."""
        choices = list(self.backbone.unfreeze)
        unfreeze = hp.Choice("unfreeze", choices, ordered=True, default=min(1, max(choices)))
        with hp.conditional_scope("unfreeze", [c for c in choices if c > 0]):
            # Below the head's smallest rate (1e-4): pretrained filters move slowly.
            rate = hp.Float("fine_tune_learning_rate", 1e-6, 1e-4, sampling="log", default=1e-5)
        return int(unfreeze), (rate if unfreeze else None)

    # -- the model ----------------------------------------------------------------------
    def base_model(self) -> keras.Model:
        """The backbone without its top, with the context's weights, frozen."""
        size = self.context.image_size
        path = weights.resolve(self.name, self.context.weights, self.context.weights_dir)
        constructor = getattr(keras.applications, self.backbone.application)
        # Random weights are drawn from a seed of their own, so every trial of a search gets
        # the same base and shares its cached features; Keras' initialisers take their
        # seeds from Python's random module.
        seeded = _python_seed(f"{self.name}/{self.context.seed}") if path is None else contextlib.nullcontext()
        with seeded:
            base = constructor(include_top=False, weights=None, input_shape=(size, size, 3))
        if path is not None:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    base.load_weights(str(path))
            except Exception as exc:  # noqa: BLE001 - h5py, shape and layer-count errors alike
                raise AutomammoError(f"weights file {path} does not fit {self.name}: "
                                     f"{' '.join(str(exc).split())[:300]}") from None
            # Keras only warns when part of a file matches and the rest keeps its random
            # initialisation: for pretrained weights that is a failure, not a detail.
            partial = [str(w.message) for w in caught if any(k in str(w.message) for k in _PARTIAL_LOAD)]
            if partial:
                raise AutomammoError(f"weights file {path} does not fit {self.name}: "
                                     f"{' '.join(partial[0].split())[:300]}")
        base.trainable = False
        return base

    def build_model(self, hp):
        inputs, x = self.input_layers()
        x = BackboneInput(self.name, name="backbone_input")(x)
        base = self.base_model()
        x = base(x, training=False)  # batch norm in inference mode, in every phase
        h, w, c = base.output.shape[1:]
        poolings = ["avg", "max"] + (["flatten"] if h * w * c <= FLATTEN_LIMIT else [])
        pooling = hp.Choice("pooling", poolings, default="avg")
        x = POOLING_LAYERS[pooling](name="pooling")(x)
        dropout = hp.Float("dropout", 0.0, 0.5, step=0.1, default=0.3)
        for i in range(hp.Int("dense_layers", 1, 2, default=1)):
            x = keras.layers.Dropout(dropout, name=f"head_dropout_{i}")(x)
            units = hp.Choice(f"dense_units_{i}", [128, 256, 512], default=256)
            x = keras.layers.Dense(units, activation="relu", name=f"head_dense_{i}")(x)
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
        self.fine_tune_space(hp)  # registered here so that the oracle sees the whole space
        return keras.Model(inputs, self.classifier(x), name=self.name)

    # -- training --------------------------------------------------------------------------
    def fit(self, hp, model, data: TrialData, epochs: int = 10, callbacks=None, verbose=0, **kwargs):
        """Head phase on cached features, then the full model with the tuner's callbacks.

        Returns:
            The full-model phase's ``History`` (what the tuner scores); the head phase's
            per-epoch logs are attached as its ``head_history`` attribute.
        """
        space = self.training_space(hp)
        unfreeze, fine_tune_rate = self.fine_tune_space(hp)
        start = int(kwargs.get("initial_epoch", 0))
        head_epochs, model_epochs = epoch_split(max(1, epochs - start), unfreeze, resumed=start > 0)
        optimizer = make_optimizer(space["optimizer"], space["learning_rate"])
        head = self.fit_head(space, optimizer, model, data, head_epochs, verbose) if head_epochs else None
        callbacks = list(callbacks or [])
        if unfreeze:
            history = self.fine_tune(space, model, data, unfreeze, fine_tune_rate, epochs, model_epochs,
                                     callbacks, verbose)
        else:
            history = self.evaluation_epoch(space, optimizer, model, data, epochs, callbacks, verbose)
        history.head_history = head.history if head is not None else {}
        return history

    def fit_head(self, space: dict, optimizer, model: keras.Model, data: TrialData, epochs: int, verbose=0):
        """Phase 1: the head alone, base frozen, early-stopped on the search's objective.

        On cached features when the augmentation is the exact symmetries (or none); free
        rotations, shifts and zooms have no finite set of variants to cache, so then the
        patches go through the frozen base every epoch.
        """
        if data.augmentation.only_symmetries:
            return self.fit_head_on_cache(space, optimizer, model, data, epochs, verbose)
        return self.fit_head_through_base(space, optimizer, model, data, epochs, verbose)

    def fit_head_on_cache(self, space: dict, optimizer, model: keras.Model, data: TrialData, epochs: int,
                          verbose=0):
        features = self.features(model, data)
        head = head_model(model)
        head.compile(optimizer=optimizer, loss=LOSS)
        # Class weights travel as sample weights: Keras takes no class_weight with a PyDataset.
        train = FeatureBatches(features.fit, data.y_fit, space["batch_size"],
                               data.class_weight(space["class_weight"]), seed=data.seed)
        return head.fit(train, epochs=epochs, callbacks=self._head_callbacks(data, features.val),
                        verbose=verbose, shuffle=False)

    def fit_head_through_base(self, space: dict, optimizer, model: keras.Model, data: TrialData, epochs: int,
                              verbose=0):
        model.compile(optimizer=optimizer, loss=LOSS)
        return model.fit(data.dataset("fit", space["batch_size"]), epochs=epochs,
                         callbacks=self._head_callbacks(data, data.x_val),
                         class_weight=data.class_weight(space["class_weight"]), verbose=verbose, shuffle=False)

    def _head_callbacks(self, data: TrialData, val_inputs) -> list:
        """The search's objective on the validation set each epoch, and early stopping on it."""
        from automammo import registry
        from automammo.objectives import make_callback

        objective = registry.get("objective", self.context.objective)
        positive = _positive_class(self.context)
        return [
            make_callback([objective], lambda m: predict_probabilities(m, val_inputs, 256), data.y_val, positive),
            keras.callbacks.EarlyStopping(monitor=f"val_{objective.score_key(positive is not None)}",
                                          mode=self.context.direction,
                                          patience=self.context.patience, restore_best_weights=True),
        ]

    def features(self, model: keras.Model, data: TrialData):
        """The frozen base's pooled features of the fit (8 symmetries) and validation patches."""
        base, adapter = base_of(model), model.get_layer("backbone_input")
        key = FeatureKey(
            backbone=self.name, weights=weights_fingerprint(base.get_weights()),
            image_size=self.context.image_size, data=fingerprint(data.x_fit, data.x_val),
            pooling=POOLING_NAMES[type(model.get_layer("pooling"))],
            variants=8 if data.augmentation.symmetries else 1,
        )
        root = self.context.cache_dir / "features" if self.context.cache_dir is not None else None
        return FeatureCache(root).get(key, data.x_fit, data.x_val,
                                      lambda images: extract_features(base, adapter, images))

    def fine_tune(self, space, model, data: TrialData, unfreeze: int, rate: float, epochs: int, n: int,
                  callbacks, verbose=0):
        """Phase 2 with ``unfreeze > 0``: the top blocks and the head at the lower rate."""
        unfreeze_top(base_of(model), self.backbone, unfreeze)
        model.compile(optimizer=make_optimizer(space["optimizer"], rate), loss=LOSS)
        # No validation_data: the tuner's objectives callback scores the validation set
        # (val_loss included), and a second pass through the base would only repeat it.
        return model.fit(data.dataset("fit", space["batch_size"]), epochs=epochs, initial_epoch=epochs - n,
                         callbacks=callbacks, class_weight=data.class_weight(space["class_weight"]),
                         verbose=verbose, shuffle=False)

    def evaluation_epoch(self, space, optimizer, model, data: TrialData, epochs: int, callbacks, verbose=0):
        """Phase 2 with ``unfreeze = 0``: one epoch in which no weight can change.

        Its only purpose is to run the tuner's callbacks on the full image model, so one
        batch of fit patches is enough; the logged ``loss`` is that batch's. The model is
        compiled with the head phase's optimizer, whose state then belongs to the weights
        that are saved.
        """
        restore = _RestoreTrainable(model)
        model.compile(optimizer=optimizer, loss=LOSS)
        model.trainable = False
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The model does not have any trainable weights")
            return model.fit(data.dataset("fit", space["batch_size"]).take(1), epochs=epochs,
                             initial_epoch=epochs - 1, callbacks=[restore, *callbacks], verbose=verbose,
                             shuffle=False)


def epoch_split(budget: int, unfreeze: int, resumed: bool = False) -> tuple[int, int]:
    """(head epochs, full-model epochs) of a trial's budget.

    Without fine-tuning the head gets all but the one evaluation epoch. With it, the budget
    is halved: cached head epochs cost almost nothing but need enough room to converge
    before fine-tuning starts from them. A Hyperband trial resumed from a shorter one
    (``resumed``) whose base was already fine-tuned continues fine-tuning only, because
    cached features of the original base would no longer describe it.
    """
    if unfreeze and resumed:
        return 0, budget
    model_epochs = max(1, budget // 2) if unfreeze else 1
    return max(1, budget - model_epochs), model_epochs


def head_model(model: keras.Model) -> keras.Model:
    """A model from the pooled features to the output, sharing the full model's head layers."""
    layers = model.layers
    start = layers.index(model.get_layer("pooling")) + 1
    x = inputs = keras.Input(model.get_layer("pooling").output.shape[1:], name="features")
    for layer in layers[start:]:
        x = layer(x)
    return keras.Model(inputs, x, name=f"{model.name}_head")


def base_of(model: keras.Model) -> keras.Model:
    """The backbone inside a transfer model (its only nested model)."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def blocks(base: keras.Model, backbone: Backbone) -> list[tuple[str, list]]:
    """The base's layers grouped into named blocks, bottom to top."""
    pattern = re.compile(backbone.block)
    out: list[tuple[str, list]] = []
    pending: list = []
    for layer in base.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        match = pattern.search(layer.name)
        if match is None:
            pending.append(layer)
        elif out and out[-1][0] == match.group(1):
            out[-1][1].extend([*pending, layer])
            pending = []
        else:
            out.append((match.group(1), [*pending, layer]))
            pending = []
    if pending and out:
        out[-1][1].extend(pending)
    return out


def unfreeze_top(base: keras.Model, backbone: Backbone, k: int) -> list[str]:
    """Make the top ``k`` blocks trainable, batch norm excepted; returns their names."""
    grouped = blocks(base, backbone)
    top = grouped[len(grouped) - min(k, len(grouped)):] if k > 0 else []
    chosen = {id(layer) for _, members in top for layer in members}
    base.trainable = True
    for layer in base.layers:
        layer.trainable = id(layer) in chosen
    for layer in base._flatten_layers(include_self=False):
        # Fine-tuning a few hundred patches would pull gamma/beta away from the ImageNet
        # statistics that the inference-mode layers keep using.
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return [name for name, _ in top]


class _RestoreTrainable(keras.callbacks.Callback):
    """Puts every layer's ``trainable`` flag back at the end of training: listed first, it
    runs before the tuner's callbacks save the model, so the file is not saved frozen."""

    def __init__(self, model: keras.Model):
        super().__init__()
        # Parents before children, so that restoring a parent does not override a child.
        self.flags = [(layer, layer.trainable) for layer in model._flatten_layers(include_self=True)]

    def on_train_end(self, logs=None):
        for layer, flag in self.flags:
            layer.trainable = flag


@contextlib.contextmanager
def _python_seed(seed: str):
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


_misfits: dict[tuple, str | None] = {}


def _file_misfit(cls, path: str, image_size: int) -> str | None:
    """Why ``path`` cannot be loaded into ``cls``'s backbone (None if it can), memoised."""
    from pathlib import Path

    p = Path(path).expanduser()
    key = (cls.name, str(p.resolve()), p.stat().st_mtime_ns, image_size)
    if key not in _misfits:
        from automammo.builders import BuildContext

        try:
            cls(BuildContext(image_size=image_size, n_classes=2, weights=path)).base_model()
            _misfits[key] = None
        except AutomammoError as exc:
            _misfits[key] = str(exc)
    return _misfits[key]


def _positive_class(context) -> int | None:
    from automammo.tasks import get_task

    try:
        return get_task(context.task).positive
    except AutomammoError:  # a context built outside a search: no task name
        return 1 if context.n_classes == 2 else None


POOLING_LAYERS = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D,
                  "flatten": keras.layers.Flatten}
POOLING_NAMES = {layer: name for name, layer in POOLING_LAYERS.items()}


class VGG16(TransferBuilder):
    name = "vgg16"
    description = "VGG16 (ImageNet; 5 conv blocks, 15M parameters), new head, frozen then top blocks fine-tuned"
    min_image_size = 32
    backbone = Backbone("VGG16", "vgg16", r"^(block\d+)_", (0, 1, 2, 3))


class VGG19(TransferBuilder):
    name = "vgg19"
    description = "VGG19 (ImageNet; 5 conv blocks, 20M parameters), new head, frozen then top blocks fine-tuned"
    min_image_size = 32
    backbone = Backbone("VGG19", "vgg19", r"^(block\d+)_", (0, 1, 2, 3))


class ResNet50(TransferBuilder):
    name = "resnet50"
    description = "ResNet50 (ImageNet; 16 residual blocks, 24M parameters), new head, frozen then fine-tuned"
    min_image_size = 32
    # 3 = the whole last stage (conv5), 6 = half of conv4 as well.
    backbone = Backbone("ResNet50", "resnet50", r"^(conv\d_block\d+)_", (0, 1, 3, 6))


class InceptionV3(TransferBuilder):
    name = "inception_v3"
    description = "InceptionV3 (ImageNet; 11 inception blocks, 22M parameters), new head, frozen then fine-tuned"
    min_image_size = 75
    # Blocks end at the concatenations mixed0 ... mixed10; 2 is Keras' own fine-tuning example.
    backbone = Backbone("InceptionV3", "inception_v3", r"^(mixed\d+)$", (0, 1, 2, 3))


class EfficientNetV2B0(TransferBuilder):
    name = "efficientnetv2_b0"
    description = "EfficientNetV2-B0 (ImageNet; 6M parameters), new head, frozen then top MBConv blocks fine-tuned"
    min_image_size = 32
    # 8 = the whole last stage (blocks 6a-6h).
    backbone = Backbone("EfficientNetV2B0", "efficientnet_v2", r"^(block\d+[a-z])_", (0, 1, 4, 8))


class ConvNeXtTiny(TransferBuilder):
    name = "convnext_tiny"
    description = "ConvNeXt-Tiny (ImageNet; 18 blocks, 28M parameters), new head, frozen then top blocks fine-tuned"
    min_image_size = 32
    # 3 = the whole last stage.
    backbone = Backbone("ConvNeXtTiny", "convnext", r"_stage_(\d+_block_\d+)_", (0, 1, 2, 3))


class MobileNetV3Small(TransferBuilder):
    name = "mobilenet_v3_small"
    description = "MobileNetV3-Small (ImageNet; 11 blocks, 1M parameters), new head, frozen then fine-tuned; fastest"
    min_image_size = 32
    backbone = Backbone("MobileNetV3Small", "mobilenet_v3", r"^(expanded_conv(?:_\d+)?)_", (0, 1, 3, 5))


BUILDERS = (VGG16, VGG19, ResNet50, InceptionV3, EfficientNetV2B0, ConvNeXtTiny, MobileNetV3Small)
BACKBONES = {cls.name: cls.backbone for cls in BUILDERS}


@hookimpl
def automammo_register_builders():
    return list(BUILDERS)
