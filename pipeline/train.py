"""Stage `train`: fit the CNN on `data/processed` and save `models/model.h5`.

Writes the model summary, the per-epoch history and the training curves next
to it. Same params and data give the same weights on CPU: one seed drives the
initialisation, the shuffles and the augmentation, and TensorFlow runs its ops
deterministically.

Each training is one MLflow run (`pipeline.tracking`); its id goes to
`models/run.json`, where `evaluate` finds the run to add its metrics to.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import run_stage
from pipeline.logs import is_terminal
from pipeline.machine import cpu_has_native_bfloat16
from pipeline.params import Params, TrainParams
from pipeline.paths import Paths
from pipeline.tracking import TrackingError, train_tracked

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_epoch: int
    seconds: float
    train_images_per_second: float


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


def learning_rate_at(epoch: int, train: TrainParams) -> float:
    """The scheduled learning rate of a 0-based epoch for `cosine` and `onecycle`."""
    base, total, warmup = train.learning_rate, train.epochs, train.warmup_epochs
    if train.lr_schedule == "onecycle":
        peak = max(1, warmup or round(0.3 * total))
        if epoch < peak:
            return base * (0.1 + 0.9 * epoch / peak)
        progress = (epoch - peak) / max(1, total - peak)
        return base * (0.5 * (1 + math.cos(math.pi * progress)) * 0.999 + 0.001)
    if epoch < warmup:
        return base * (epoch + 1) / (warmup + 1)
    progress = (epoch - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(train: TrainParams):
    import keras

    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(
            learning_rate=train.learning_rate, weight_decay=train.weight_decay
        )
    return keras.optimizers.Adam(learning_rate=train.learning_rate)


def make_callbacks(train: TrainParams, model_path: Path) -> list:
    """The seed's callbacks, each value from params, plus the learning-rate schedule."""
    import keras

    callbacks: list = [
        keras.callbacks.ModelCheckpoint(
            str(model_path),
            monitor=train.checkpoint.monitor,
            save_best_only=train.checkpoint.save_best_only,
            verbose=1,
        )
    ]
    if train.early_stopping.enabled:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=train.early_stopping.monitor,
                patience=train.early_stopping.patience,
                restore_best_weights=train.early_stopping.restore_best_weights,
                verbose=1,
            )
        )
    if train.lr_schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=train.reduce_lr.monitor,
                factor=train.reduce_lr.factor,
                patience=train.reduce_lr.patience,
                min_delta=train.reduce_lr.min_delta,
                verbose=1,
            )
        )
    else:
        callbacks.append(
            keras.callbacks.LearningRateScheduler(lambda epoch: learning_rate_at(epoch, train))
        )
    return callbacks


def balanced_class_weight(labels, num_classes: int) -> dict[int, float]:
    """n / (k · count) per class, as scikit-learn's `balanced`."""
    import numpy as np

    counts = np.bincount(labels, minlength=num_classes)
    return {i: float(len(labels) / (num_classes * max(c, 1))) for i, c in enumerate(counts)}


def model_summary_text(model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda text, line_break=True: lines.append(text))
    return "\n".join(lines) + "\n"


def write_history(history: list[dict[str, float]], path: Path) -> None:
    from pipeline.atomic import write_text_atomic

    write_text_atomic(path, history_frame(history).to_csv(index=False, float_format="%.6g"))


def best_epoch(history: list[dict[str, float]], monitor: str) -> int:
    """The 1-based epoch ModelCheckpoint kept: the first with the best `monitor`."""
    mode_max = "acc" in monitor or monitor.startswith("val_f")
    values = [row[monitor] for row in history]
    best = max(values) if mode_max else min(values)
    return values.index(best) + 1


def run(params: Params, paths: Paths, extra_callbacks: list | None = None) -> TrainResult:
    """Train `model.arch` with `train.*` and write the model and the training reports."""
    import keras

    from pipeline import CLASSES
    from pipeline.atomic import write_text_atomic
    from pipeline.callbacks import RecalibrateBatchNorm
    from pipeline.dataset import evaluation_input, load_split, steps_per_epoch, training_input
    from pipeline.figures import plot_training_curves
    from pipeline.modelmeta import info_for, write_model_info
    from pipeline.models import build_model

    train = params.train
    make_deterministic(train.seed)
    policy = resolve_precision(train.precision)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        log.info("compute precision: %s (train.precision=%s)", policy, train.precision)
        size = params.preprocess.picture_size
        train_split = load_split(paths.processed / "train", size)
        val_split = load_split(paths.processed / "validation", size)
        log.info(
            "Found %d training and %d validation images belonging to %d classes",
            train_split.count,
            val_split.count,
            len(CLASSES),
        )
        model = build_model(params.model, (size, size, 1), len(CLASSES))
        model.compile(
            optimizer=make_optimizer(train),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing),
            metrics=["accuracy"],
        )
        paths.models.mkdir(parents=True, exist_ok=True)
        summary = model_summary_text(model)
        write_text_atomic(paths.model_summary, summary)

        rates: list[float] = []
        record_lr = keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: rates.append(
                float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
            )
        )
        # after the schedule, which sets each epoch's rate in its own on_epoch_begin
        callbacks = [*make_callbacks(train, paths.model), record_lr, *(extra_callbacks or [])]
        class_weight = (
            balanced_class_weight(train_split.labels, len(CLASSES))
            if train.class_weight == "balanced"
            else None
        )
        steps = steps_per_epoch(train_split.count, train.batch_size, train.steps_per_epoch)
        if train.bn_recalibration_batches:
            fixed_batches = (
                train_split.images.shuffle(
                    train_split.count, seed=train.seed, reshuffle_each_iteration=False
                )
                .map(lambda image, label: image)
                .batch(train.batch_size)
            )
            callbacks.append(
                RecalibrateBatchNorm(fixed_batches, train.bn_recalibration_batches, steps)
            )
        started = time.perf_counter()
        fit = model.fit(
            training_input(train_split, train.batch_size, train.seed, train.augmentation),
            steps_per_epoch=steps,
            epochs=train.epochs,
            validation_data=evaluation_input(val_split, train.batch_size),
            class_weight=class_weight,
            callbacks=callbacks,
            shuffle=False,  # the input shuffles itself, with the seed
            verbose=1 if is_terminal() else 2,
        )
        seconds = time.perf_counter() - started
        write_model_info(paths.model, info_for(params.preprocess, params.model.arch))
        epochs_run = len(fit.history["loss"])
        history = [
            {
                "epoch": epoch + 1,
                **{k: float(fit.history[k][epoch]) for k in HISTORY_COLUMNS[1:5]},
                "lr": rates[epoch],
            }
            for epoch in range(epochs_run)
        ]
        write_history(history, paths.history)
        plot_training_curves(
            history_frame(history), paths.training_curves, optimizer=train.optimizer.title()
        )
        result = TrainResult(
            history=history,
            best_epoch=best_epoch(history, train.checkpoint.monitor),
            seconds=seconds,
            train_images_per_second=epochs_run * steps * train.batch_size / seconds,
        )
        log.info(
            "trained %d epochs in %.0f s (%.0f images/s); best %s %.4f at epoch %d, saved to %s",
            epochs_run,
            seconds,
            result.train_images_per_second,
            train.checkpoint.monitor,
            history[result.best_epoch - 1][train.checkpoint.monitor],
            result.best_epoch,
            paths.model,
        )
        return result
    finally:
        # leave the process as it was: later models in it compute in their own precision
        keras.mixed_precision.set_global_policy(previous_policy)


def history_frame(history: list[dict[str, float]]):
    import pandas as pd

    return pd.DataFrame(history, columns=HISTORY_COLUMNS)


def main(argv: list[str] | None = None) -> int:
    return run_stage(
        argv,
        stage="train",
        description="Train the emotion CNN on data/processed (stage `train`).",
        work=train_tracked,
        errors=(FileNotFoundError, ValueError, TrackingError),
        tensorflow=True,
    )


if __name__ == "__main__":
    sys.exit(main())
