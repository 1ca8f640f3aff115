"""automammo's tf.data fit pipeline against the seeds' Keras 2 ImageDataGenerator, patches/s.

The seed experiments fed Keras 2 models with ``ImageDataGenerator(rotation_range=...,
horizontal_flip=True, vertical_flip=True).flow(x, y)``: NumPy and SciPy, one image at a
time, in the training thread. automammo's ``TrialData.dataset("fit", ...)`` shuffles,
batches and augments in tf.data, in parallel and ahead of the model (prefetch). This
benchmark only draws batches (no model), so it measures the most each input path can
deliver:

- ``automammo (symmetries)``: the default augmentation, the 8 exact symmetries;
- ``automammo (symmetries + rotation)``: plus free rotation, like for like with the seeds';
- ``automammo (symmetries + rotation, shift, zoom)``: all of automammo's augmentation, one
  composed affine resampling per patch;
- ``ImageDataGenerator (rotation + flips)``: the seeds' approach, via the ``tf-keras``
  package (``pip install automammo[bench]``).

Usage::

    python benchmarks/input_pipeline.py                 # 2048 patches of 150 px, 2 epochs, 3 rounds
    python benchmarks/input_pipeline.py --patches 4096 --epochs 3
"""

from __future__ import annotations

import argparse
import sys
import time

sys.path.insert(0, __import__("os").path.dirname(__file__))
import _bench  # noqa: E402


def automammo_dataset(x, y, batch_size: int, seed: int, rotation: float = 0.0, shift: float = 0.0, zoom: float = 0.0):
    from automammo.preprocess import Augmentation, TrialData

    aug = Augmentation(symmetries=True, rotation=rotation, shift=shift, zoom=zoom)
    data = TrialData(x, y, x[:1], y[:1], 2, aug, seed=seed)
    return data.dataset("fit", batch_size)


def image_data_generator(x, y, batch_size: int, seed: int, rotation: float):
    try:
        from tf_keras.preprocessing.image import ImageDataGenerator
    except ImportError as exc:
        raise SystemExit("this benchmark needs tf-keras: pip install 'automammo[bench]'") from exc
    gen = ImageDataGenerator(rotation_range=rotation, horizontal_flip=True, vertical_flip=True,
                             fill_mode="reflect")
    return gen.flow(x, y, batch_size=batch_size, shuffle=True, seed=seed)


def rate(make, n: int, batch_size: int, epochs: int) -> float:
    """Patches per second drawn over ``epochs`` epochs, after one untimed warm-up epoch."""
    source = make()
    steps = -(-n // batch_size)
    keras_sequence = hasattr(source, "__getitem__") and not hasattr(source, "element_spec")

    def one_epoch():
        count = 0
        if keras_sequence:  # ImageDataGenerator's iterator never ends; take one epoch of it
            for _ in range(steps):
                bx, _ = next(source)
                count += len(bx)
        else:
            for bx, _ in source:
                count += int(bx.shape[0])
        return count

    one_epoch()
    start, drawn = time.perf_counter(), 0
    for _ in range(epochs):
        drawn += one_epoch()
    return drawn / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--patches", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rotation", type=float, default=20.0, help="rotation range in degrees")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every path once per round, in turn; report each path's median "
                             "(a shared machine's speed drifts within a run)")
    args = parser.parse_args(argv)

    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (args.patches, args.size, args.size, 1)).astype(np.float32)
    y = rng.integers(0, 2, args.patches)
    n, b, e, r = args.patches, args.batch, args.epochs, args.rotation
    paths = {
        "automammo (symmetries)": lambda: automammo_dataset(x, y, b, 0),
        "automammo (symmetries + rotation)": lambda: automammo_dataset(x, y, b, 0, r),
        "automammo (symmetries + rotation, shift 0.1, zoom 0.1)": lambda: automammo_dataset(x, y, b, 0, r, 0.1, 0.1),
        "ImageDataGenerator (rotation + flips)": lambda: image_data_generator(x, y, b, 0, r),
    }
    runs = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, make in paths.items():
            runs[name].append(rate(make, n, b, e))
    rates = {name: float(np.median(v)) for name, v in runs.items()}
    seeds = rates["ImageDataGenerator (rotation + flips)"]
    rows = [{"pipeline": name, "patches_per_s": v, "vs_image_data_generator": v / seeds,
             "rounds_patches_per_s": runs[name]} for name, v in rates.items()]
    print(f"{n} patches of {args.size} px, batch {b}, rotation range {r} degrees, "
          f"{e} timed epochs each (after a warm-up epoch), median of {args.rounds} rounds\n")
    print(_bench.table(["pipeline", "patches/s", "x ImageDataGenerator", "each round"],
                       [[row["pipeline"], row["patches_per_s"], row["vs_image_data_generator"],
                         " ".join(f"{v:,.0f}" for v in row["rounds_patches_per_s"])] for row in rows]))
    like_for_like = rates["automammo (symmetries + rotation)"] / seeds
    default = rates["automammo (symmetries)"] / seeds
    target = {"required": 3.0, "like_for_like": like_for_like, "default_augmentation": default,
              "met": like_for_like >= 3.0}
    print(f"\ntarget >= 3x ImageDataGenerator: like for like {like_for_like:.1f}x, default augmentation "
          f"{default:.1f}x -> {'met' if target['met'] else 'MISSED'}")
    path = _bench.save("input_pipeline", {"settings": vars(args), "rows": rows, "target": target})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
