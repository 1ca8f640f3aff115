"""Baseline-fusion builders: each lesion patch read next to the patient's own healthy tissue.

A radiologist judges a density against the breast it sits in: the same texture can be
normal parenchyma in a dense breast and a mass in a fatty one. Every lesion patch of the
dataset has a ``pair`` partner cut from healthy tissue of the same breast, and these
builders let the search decide whether, and how, that comparison helps:

- ``siamese``: one shared encoder f applied to both patches (the scratch CNN's conv
  blocks, or a frozen pretrained backbone of the transfer family), merged by
  |f(a) - f(b)| or [f(a), f(b), f(a) - f(b), f(a) * f(b)], then a dense head;
- ``two_channel``: the pair stacked as channels of one 2-D CNN (pixel-level fusion);
- ``conv3d``: the pair as a depth-2 volume for Conv3D, kernels spanning depth 1 or 2.

All take ``{"lesion", "baseline"}`` inputs, so they run on lesion-only tasks whose lesions
all have a partner; the search skips them elsewhere. The pipeline applies the same random
augmentation to both patches of a pair (``TrialData.dataset(..., pair=True)``).
"""

from __future__ import annotations

import keras

from automammo import hookimpl
from automammo.builders import Builder
from automammo.layers import PairMerge
from automammo_plugins.scratch_cnn import BN_MOMENTUM, ScratchCNN


class _PairBuilder(Builder):
    """Shared parts: pair inputs, and the scratch CNN's spaces for encoders and heads."""

    inputs = "pair"
    min_image_size = 16

    def __init__(self, context):
        super().__init__(context)
        # Composition rather than inheritance: the pair builders reuse the scratch CNN's
        # conv-block and dense-head spaces without becoming single-input builders.
        self.scratch = ScratchCNN(context)


class Siamese(_PairBuilder):
    """One encoder, shared by both patches, then a merge of the two embeddings and a head."""

    name = "siamese"
    description = ("siamese pair: one shared encoder (scratch or frozen pretrained) on lesion and baseline, "
                   "|f(a)-f(b)| or [a,b,a-b,a*b], dense head")

    def build_model(self, hp):
        inputs, _ = self.input_layers()
        backbones = self.backbones()
        kind = hp.Choice("encoder", ["scratch", "pretrained"] if backbones else ["scratch"], default="scratch")
        with hp.conditional_scope("encoder", ["scratch"]):
            if kind == "scratch":
                encoder = self.scratch_encoder(hp)
        if backbones:
            with hp.conditional_scope("encoder", ["pretrained"]):
                backbone = hp.Choice("backbone", sorted(backbones))
                pooling = hp.Choice("backbone_pooling", ["avg", "max"], default="avg")
                if kind == "pretrained":
                    encoder = self.pretrained_encoder(backbones[backbone], pooling)
        merge = hp.Choice("merge", list(PairMerge.MODES), default="abs_diff")
        # Calling one sub-model on both inputs is what makes the weights shared: the
        # baseline is embedded in exactly the space the lesion is.
        lesion = encoder(inputs["lesion"])
        baseline = encoder(inputs["baseline"])
        x = PairMerge(merge, name="merge")([lesion, baseline])
        x = self.scratch.head(hp, x)
        return keras.Model(inputs, self.classifier(x), name=self.name)

    def backbones(self) -> dict[str, type]:
        """The pretrained backbones this search can use as encoder, checked once per builder."""
        if not hasattr(self, "_backbones"):
            self._backbones = pretrained_backbones(self.context)
        return self._backbones

    def scratch_encoder(self, hp) -> keras.Model:
        """The scratch CNN's conv blocks as a sub-model from one patch to its embedding."""
        patch = keras.Input((self.context.image_size, self.context.image_size, 1), name="patch")
        return keras.Model(patch, self.scratch.encoder(hp, patch), name="encoder")

    def pretrained_encoder(self, backbone_cls, pooling: str) -> keras.Model:
        """A transfer-family backbone, frozen, as a sub-model from one patch to its embedding.

        The backbone stays frozen and runs in inference mode (batch norm keeps its ImageNet
        statistics): a siamese trial learns only the comparison and the head on top of the
        pretrained features, which a small dataset can afford.
        """
        from automammo_plugins.transfer import BackboneInput

        base = backbone_cls(self.context).base_model()
        patch = keras.Input((self.context.image_size, self.context.image_size, 1), name="patch")
        x = BackboneInput(backbone_cls.name, name="backbone_input")(patch)
        x = base(x, training=False)
        pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
        return keras.Model(patch, pool(name="backbone_pooling")(x), name="encoder")


def pretrained_backbones(context) -> dict[str, type]:
    """Transfer-family backbones usable as a frozen siamese encoder: name -> builder class.

    Empty when the transfer plugin is absent or broken, when the search uses random weights
    (``--weights none``: a frozen random encoder has nothing to offer that the trainable
    scratch encoder does not), or when no backbone fits the image size or can get its
    weights. Never raises: the siamese family must run whatever the transfer family's state.
    """
    if str(context.weights).strip().lower() == "none":
        return {}
    try:
        from automammo_plugins import transfer

        candidates = [cls for cls in transfer.BUILDERS if context.image_size >= cls.min_image_size]
    except Exception:  # noqa: BLE001 - a missing or broken plugin only removes an option
        return {}
    usable = {}
    for cls in candidates:
        try:
            if cls.unavailable(context) is None:
                usable[cls.name] = cls
        except Exception:  # noqa: BLE001
            continue
    return usable


class TwoChannel(_PairBuilder):
    """Lesion and baseline as channels of one image, so the first convolution compares them."""

    name = "two_channel"
    description = "two-channel pair: lesion and baseline (optionally their difference) as channels of one 2-D CNN"

    def build_model(self, hp):
        inputs, _ = self.input_layers()
        channels = [inputs["lesion"], inputs["baseline"]]
        # The pixel difference is what a reader does when comparing with a prior; giving it
        # as a channel saves the network from having to learn an exact subtraction.
        if hp.Boolean("difference_channel", default=False):
            channels.append(keras.layers.Subtract(name="difference")(channels))
        x = keras.layers.Concatenate(axis=-1, name="stack_channels")(channels)
        x = self.scratch.encoder(hp, x)
        x = self.scratch.head(hp, x)
        return keras.Model(inputs, self.classifier(x), name=self.name)


class PairConv3D(_PairBuilder):
    """The pair as a depth-2 volume; Conv3D kernels span one slice or both.

    Depth stays 2 through the conv blocks ("same" padding, pooling in-plane only):

    - depth kernel 1: each slice is encoded by the same 2-D kernels, apart (late fusion);
    - depth kernel 2: at every block the lesion slice also sees the baseline slice (the
      even kernel is padded after, so slice 0 mixes lesion and baseline while slice 1 keeps
      a baseline-only stream).

    A final (2, 1, 1) convolution then merges the two slices with learned weights per
    feature, so in both cases the network learns how to combine them.
    """

    name = "conv3d"
    description = "3-D pair: lesion and baseline as depth 2 for Conv3D, kernels spanning 1 or 2 slices, learned merge"

    def build_model(self, hp):
        inputs, _ = self.input_layers()
        s = self.context.image_size
        slices = [keras.layers.Reshape((1, s, s, 1), name=f"{key}_slice")(inputs[key])
                  for key in ("lesion", "baseline")]
        x = keras.layers.Concatenate(axis=1, name="stack_depth")(slices)

        max_blocks = self.scratch.max_blocks()
        n_blocks = hp.Int("conv_blocks", 2, max_blocks, default=min(3, max_blocks))
        depth = hp.Choice("depth_kernel", [1, 2])
        # 3-D convolutions cost 2-4x their 2-D counterpart: start narrower than the scratch CNN.
        base = hp.Choice("filters", [16, 32], default=32)
        batch_norm = hp.Boolean("batch_norm", default=True)
        l2 = hp.Choice("l2", [0.0, 1e-4, 1e-3], default=1e-4)
        reg = keras.regularizers.L2(l2) if l2 else None

        def conv(x, filters, kernel, padding, name):
            x = keras.layers.Conv3D(filters, kernel, padding=padding, kernel_regularizer=reg,
                                    use_bias=not batch_norm, name=name)(x)
            if batch_norm:
                x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
            return keras.layers.Activation("relu")(x)

        for i in range(n_blocks):
            filters = min(256, base * 2**i)
            x = conv(x, filters, (depth, 3, 3), "same", f"conv3d_{i}")
            x = keras.layers.MaxPooling3D(pool_size=(1, 2, 2))(x)
        x = conv(x, filters, (2, 1, 1), "valid", "merge_pair")
        if hp.Choice("pooling", ["avg", "flatten"], default="avg") == "avg":
            x = keras.layers.GlobalAveragePooling3D()(x)
        else:
            x = keras.layers.Flatten()(x)
        x = self.scratch.head(hp, x)
        return keras.Model(inputs, self.classifier(x), name=self.name)


@hookimpl
def automammo_register_builders():
    return [Siamese, TwoChannel, PairConv3D]
