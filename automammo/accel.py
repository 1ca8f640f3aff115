"""Accelerators: a tf.distribute strategy for Keras Tuner, mixed precision, GPU memory.

``configure(strategy, precision)`` is called once per training process (the in-process
search, or each distributed worker) before any model is built, and returns what Keras Tuner
takes as ``distribution_strategy``; ``with_precision(hypermodel, precision)`` wraps the
search's hypermodel so that every trial's model is built under the precision policy:

- ``strategy="default"``: None, Keras' default placement (one GPU if there is one, else the
  CPU).
- ``strategy="mirrored"``: ``tf.distribute.MirroredStrategy`` over every visible GPU: each
  trial's model is replicated and each batch split across them. The batch-size
  hyperparameter is the global batch, so each GPU sees ``batch_size / n_gpus`` samples.
- ``precision="mixed"``: the Keras ``mixed_float16`` policy: float16 compute, float32
  variables, dynamic loss scaling (Keras wraps the optimizer when the model compiles). Every
  builder's output layer is float32, so probabilities and the loss stay in float32. It pays
  on GPUs with tensor cores (compute capability 7.0 and newer); on a CPU it is slower.

XLA needs no switch here: Keras 3 compiles with ``jit_compile="auto"``, which turns XLA on
when a GPU is visible (and no tf.distribute strategy is in use) and off on CPU-only
machines, where ``benchmarks/throughput.py`` measured it at half the scratch CNN's rate
(see docs/scaling.md).
"""

from __future__ import annotations

import keras_tuner as kt

from automammo.errors import AutomammoError

STRATEGIES = ("default", "mirrored")
PRECISIONS = ("float32", "mixed")

_POLICY = {"float32": "float32", "mixed": "mixed_float16"}


def check(strategy: str, precision: str) -> None:
    """Refuse an unknown strategy or precision, naming the known ones.

    Raises:
        AutomammoError: either name is unknown.
    """
    if strategy not in STRATEGIES:
        raise AutomammoError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if precision not in PRECISIONS:
        raise AutomammoError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")


def configure(strategy: str = "default", precision: str = "float32", reporter=None):
    """Set this process up to train: GPU memory growth, precision policy, strategy.

    Call before any model is built (the precision policy applies to layers created after
    it) and before TensorFlow first touches a GPU (memory growth cannot be set later).

    Args:
        strategy: ``"default"`` or ``"mirrored"``.
        precision: ``"float32"`` or ``"mixed"``.
        reporter: optional object with a ``message(text)`` method, told when a choice will
            not do what the user hopes on this machine (mixed precision without a GPU, a
            mirrored strategy over a single device).

    Returns:
        A ``tf.distribute.Strategy`` to pass to Keras Tuner as ``distribution_strategy``,
        or None for the default placement.

    Raises:
        AutomammoError: an unknown strategy or precision.
    """
    check(strategy, precision)
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    _grow_gpu_memory(gpus)
    say = getattr(reporter, "message", None) or (lambda text: None)

    # Set every time, float32 included: the policy is process-global, and a previous search
    # in the same process may have left mixed_float16 behind.
    keras.mixed_precision.set_global_policy(_POLICY[precision])
    if precision == "mixed" and not gpus:
        say("--precision mixed on a machine without a GPU: float16 is emulated on the CPU and "
            "trains slower than float32")

    if strategy == "default":
        return None
    devices = [f"/gpu:{i}" for i in range(len(gpus))] or ["/cpu:0"]
    if len(devices) == 1:
        say(f"--strategy mirrored over one device ({devices[0]}): no speed-up; the strategy's own "
            "reductions change the last digits, so scores can differ slightly from the default's")
    return tf.distribute.MirroredStrategy(devices)


def with_precision(hypermodel, precision: str):
    """``hypermodel``, building every trial's model under the ``precision`` policy.

    Keras keeps the policy in its global state, which ``keras.backend.clear_session()``
    resets, and Keras Tuner clears the session right before it builds each trial's model:
    a policy set once before the search would be gone by the first trial. So it is set
    again inside each build.

    Args:
        hypermodel: the search's ``kt.HyperModel``.
        precision: ``"float32"`` (the hypermodel is returned as it is) or ``"mixed"``.
    """
    check("default", precision)
    if precision == "float32":
        return hypermodel
    return _PolicyHyperModel(hypermodel, _POLICY[precision])


class _PolicyHyperModel(kt.HyperModel):
    def __init__(self, hypermodel, policy: str):
        super().__init__(name=hypermodel.name, tunable=hypermodel.tunable)
        self.hypermodel, self.policy = hypermodel, policy

    def declare_hyperparameters(self, hp):
        self.hypermodel.declare_hyperparameters(hp)

    def build(self, hp):
        import keras

        keras.mixed_precision.set_global_policy(self.policy)
        return self.hypermodel.build(hp)

    def fit(self, hp, model, *args, **kwargs):
        return self.hypermodel.fit(hp, model, *args, **kwargs)


def hide_accelerators() -> None:
    """Keep this process off every GPU: for a distributed chief, which trains nothing.

    Without it the chief, which imports TensorFlow and resizes images, would take GPU
    memory that its local workers need. Call before TensorFlow first touches a GPU.
    """
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        # The GPUs were already initialised in this process (a library touched them
        # first); the chief then holds some memory, which memory growth keeps small.
        _grow_gpu_memory(tf.config.list_physical_devices("GPU"))


def _grow_gpu_memory(gpus) -> None:
    """Allocate GPU memory as needed instead of all at once, so processes can share a GPU."""
    import tensorflow as tf

    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):
            # Already initialised (memory growth is then whatever it was) or a virtual
            # device configuration forbids it; neither is worth stopping a search for.
            pass
