"""The scratch CNN: the space the seed experiments walked by hand.

2-6 conv blocks of 32 -> 256 filters, optional batch norm, L2, dropout, 1-2 dense layers of
16-512 units; the base class adds Adam/RMSprop, learning rate, batch size and class weights.
"""

from __future__ import annotations

import keras

from automammo import hookimpl
from automammo.builders import Builder

# Keras' default 0.99 lets the moving statistics lag for hundreds of steps; a patch dataset
# gives a few dozen steps per epoch, so validation (inference-mode) outputs stayed at chance
# for most of a short trial. 0.9 tracks within an epoch or two.
BN_MOMENTUM = 0.9


class ScratchCNN(Builder):
    name = "scratch_cnn"
    inputs = "single"
    description = "CNN trained from scratch: 2-6 conv blocks, batch norm, L2, dropout, dense head"
    min_image_size = 16

    def max_blocks(self) -> int:
        # Each block halves the side; stop while at least 4 px remain.
        blocks, side = 0, self.context.image_size
        while side // 2 >= 4 and blocks < 6:
            side //= 2
            blocks += 1
        return max(2, blocks)

    def encoder(self, hp, x):
        """Conv blocks -> pooled features; reused by builders that need an encoder."""
        n_blocks = hp.Int("conv_blocks", 2, self.max_blocks(), default=min(3, self.max_blocks()))
        base = hp.Choice("filters", [32, 64], default=32)
        batch_norm = hp.Boolean("batch_norm", default=True)
        l2 = hp.Choice("l2", [0.0, 1e-4, 1e-3], default=1e-4)
        reg = keras.regularizers.L2(l2) if l2 else None
        for i in range(n_blocks):
            filters = min(256, base * 2**i)
            x = keras.layers.Conv2D(filters, 3, padding="same", kernel_regularizer=reg,
                                    use_bias=not batch_norm)(x)
            if batch_norm:
                x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
            x = keras.layers.Activation("relu")(x)
            x = keras.layers.MaxPooling2D()(x)
        if hp.Choice("pooling", ["avg", "flatten"], default="avg") == "avg":
            return keras.layers.GlobalAveragePooling2D()(x)
        return keras.layers.Flatten()(x)

    def head(self, hp, x):
        l2 = hp.get("l2") if "l2" in hp else 0.0
        reg = keras.regularizers.L2(l2) if l2 else None
        dropout = hp.Float("dropout", 0.0, 0.5, step=0.1, default=0.3)
        for i in range(hp.Int("dense_layers", 1, 2, default=1)):
            x = keras.layers.Dropout(dropout)(x)
            units = hp.Choice(f"dense_units_{i}", [16, 32, 64, 128, 256, 512], default=128)
            x = keras.layers.Dense(units, activation="relu", kernel_regularizer=reg)(x)
        return keras.layers.Dropout(dropout)(x)

    def build_model(self, hp):
        inputs, x = self.input_layers()
        x = self.encoder(hp, x)
        x = self.head(hp, x)
        return keras.Model(inputs, self.classifier(x), name=self.name)


@hookimpl
def automammo_register_builders():
    return [ScratchCNN]
