"""Training throughput of the scratch CNN at 150 px, next to the work per patch and the ceiling.

The scratch CNN with its default hyperparameters (3 conv blocks of 32-64-128 filters, batch
norm, global average pooling, a dense layer of 128) trains on automammo's own fit pipeline
(shuffle, batch 32, the 8 symmetries). Each configuration trains ``--epochs`` epochs over
``--patches`` patches; the first epoch (tracing, XLA compilation) is not timed.

- patches/s: median over the timed epochs;
- GFLOP per patch: the multiply-adds of every Conv2D and Dense layer, x2, for the forward
  pass; a training step costs about 3x that (forward, gradient of the inputs, gradient of
  the weights);
- ceiling: the float32 matrix-multiply rate of this machine with every core
  (``tf.matmul`` of 2048 x 2048), the most the convolutions could reach, measured just
  before and after each configuration (on a shared machine it moves with the load).

Usage::

    python benchmarks/throughput.py                  # 150 px, 256 patches, 3 epochs
    python benchmarks/throughput.py --patches 2048   # steadier numbers on a quiet machine
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))
import _bench  # noqa: E402

CONFIGS = {
    "float32": dict(precision="float32", jit_compile="auto"),
    "float32 + XLA": dict(precision="float32", jit_compile=True),
    "mixed_float16": dict(precision="mixed", jit_compile="auto"),
}


def forward_flops(model) -> int:
    """FLOPs of one patch through the Conv2D and Dense layers (2 x multiply-adds)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            total += 2 * h * w * kh * kw * c_in * c_out
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total)


def measure(name: str, size: int, patches: int, epochs: int, batch: int) -> dict:
    import keras
    import keras_tuner as kt
    import numpy as np

    from automammo import accel
    from automammo.builders import BuildContext, make_optimizer
    from automammo.preprocess import TrialData
    from automammo_plugins.scratch_cnn import ScratchCNN

    settings = CONFIGS[name]
    keras.backend.clear_session()
    accel.configure("default", settings["precision"])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (patches, size, size, 1)).astype(np.float32)
    y = rng.integers(0, 2, patches)
    data = TrialData(x, y, x[:batch], y[:batch], 2, seed=0)
    hp = kt.HyperParameters()
    hp.Fixed("batch_size", batch)
    builder = ScratchCNN(BuildContext(image_size=size, n_classes=2))
    model = builder.build(hp)
    model.compile(optimizer=make_optimizer("adam", 1e-3), loss="sparse_categorical_crossentropy",
                  jit_compile=settings["jit_compile"])
    times: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(data.dataset("fit", batch), epochs=epochs, verbose=0, callbacks=[Clock()])
    timed = times[1:] or times
    flops = forward_flops(model)
    accel.configure("default", "float32")
    return {"config": name, "patches_per_s": patches / statistics.median(timed),
            "epoch_seconds": [round(t, 2) for t in times], "forward_gflop_per_patch": flops / 1e9,
            "train_gflop_per_patch": 3 * flops / 1e9, "parameters": int(model.count_params())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)

    rows = []
    for name in args.configs:
        # The ceiling is measured just before and after each configuration: on a shared
        # machine the cores this process gets change from minute to minute.
        before = _bench.matmul_gflops(seconds=2.0)
        row = measure(name, args.size, args.patches, args.epochs, args.batch)
        row["matmul_gflop_s"] = (before + _bench.matmul_gflops(seconds=2.0)) / 2
        row["achieved_gflop_s"] = row["patches_per_s"] * row["train_gflop_per_patch"]
        row["fraction_of_ceiling"] = row["achieved_gflop_s"] / row["matmul_gflop_s"]
        rows.append(row)
    print(f"scratch CNN (default hyperparameters) at {args.size} px, batch {args.batch}, "
          f"{args.patches} patches x {args.epochs} epochs\n")
    print(_bench.table(
        ["config", "patches/s", "GFLOP/patch (train)", "GFLOP/s achieved", "matmul ceiling GFLOP/s", "of ceiling"],
        [[r["config"], r["patches_per_s"], r["train_gflop_per_patch"], r["achieved_gflop_s"], r["matmul_gflop_s"],
          f"{100 * r['fraction_of_ceiling']:.0f}%"] for r in rows]))
    path = _bench.save("throughput", {"settings": vars(args), "rows": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
