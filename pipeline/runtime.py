"""How TensorFlow computes here: one seed, deterministic ops, and the compute precision.

Used by every command that trains or scores a model, so that the same params and
data give the same numbers on the same CPU kind.
"""

from __future__ import annotations

import contextlib
import logging

from pipeline.machine import cpu_has_native_bfloat16

log = logging.getLogger(__name__)


def make_deterministic(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow, and make TensorFlow's ops deterministic.

    Op determinism alone is not enough on a multi-core CPU: when TensorFlow runs
    independent ops side by side (inter-op parallelism), they share the intra-op
    thread pool, and oneDNN's kernels then split and sum their work in an order that
    depends on scheduling. Two processes training the default sample for one epoch
    ended with losses 2.0828 and 2.0852; with one op at a time (each op still using
    every core) they agree to the last bit, for about 7% more time.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    if tf.config.threading.get_inter_op_parallelism_threads() != 1:
        try:
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            # TensorFlow was started earlier in this process (e.g. a notebook that
            # already ran a model), and its thread pools are fixed by then.
            log.warning(
                "TensorFlow already runs several ops at once in this process, so on a "
                "multi-core CPU the results may differ in the last digits from run to "
                "run; run the stage in a fresh process (python -m pipeline.train) for "
                "bit-identical results"
            )


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy for `train.precision`; `auto` picks the fastest safe one."""
    if precision != "auto":
        return precision
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_has_native_bfloat16() else "float32"


def distribution_scope(distribution: str) -> contextlib.AbstractContextManager:
    """Where `train.distribution` builds, compiles and fits the model: as it is for `none`;
    for `mirrored`, the scope of a `tf.distribute.MirroredStrategy` with one replica per
    GPU (per logical CPU device without one), each taking its share of every batch."""
    if distribution == "none":
        return contextlib.nullcontext()
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy()
    devices = strategy.extended.worker_devices
    log.info(
        "train.distribution=mirrored: %d replica%s, on %s",
        strategy.num_replicas_in_sync,
        "" if strategy.num_replicas_in_sync == 1 else "s",
        ", ".join(devices),
    )
    if strategy.num_replicas_in_sync == 1:
        log.warning(
            "train.distribution=mirrored found one device only (%s): it trains as with "
            "none, on that device",
            devices[0],
        )
    return strategy.scope()
