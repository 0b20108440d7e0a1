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

from pipeline import CLASSES, tracking
from pipeline.atomic import replacing, write_text_atomic
from pipeline.cli import run_stage
from pipeline.figures import plot_training_curves
from pipeline.logs import is_terminal
from pipeline.metrics import best_epoch
from pipeline.modelmeta import info_for, write_model_info
from pipeline.params import Params, TrainParams
from pipeline.paths import Paths
from pipeline.runtime import distribution_scope, make_deterministic, resolve_precision
from pipeline.tracking import TrackingError

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_epoch: int
    seconds: float
    train_images_per_second: float
    temperature: float
    # with train.snapshots: the validation accuracy of their average, which model.h5 holds
    ensemble_val_accuracy: float | None = None


def learning_rate_at(epoch: int, train: TrainParams, total: int | None = None) -> float:
    """The scheduled learning rate of a 0-based epoch for `cosine` and `onecycle`; with
    `train.snapshots` cycles, each cycle runs the whole schedule over its epochs. `total`
    (the epochs a time budget planned) stands for `train.epochs`."""
    base, warmup = train.learning_rate, train.warmup_epochs
    total = total or train.cycle_epochs
    epoch %= total
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


def make_optimizer(train: TrainParams, steps_per_epoch: int):
    """`train.optimizer`; with `train.ema_momentum`, one that keeps an exponential moving
    average of the weights. With `train.ema_mode: overwrite` it puts the average in place
    of the weights after each epoch's last step, so that BatchNorm recalibration,
    validation and the checkpoint all see it; with `swap`, only when `fit` ends
    (`ValidateTheAverage` lends it to each epoch's end)."""
    import keras

    ema = (
        {
            "use_ema": True,
            "ema_momentum": train.ema_momentum,
            "ema_overwrite_frequency": steps_per_epoch if train.ema_mode == "overwrite" else None,
        }
        if train.ema_momentum
        else {}
    )
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(
            learning_rate=train.learning_rate, weight_decay=train.weight_decay, **ema
        )
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(
            learning_rate=train.learning_rate,
            momentum=0.9,
            nesterov=True,
            weight_decay=train.weight_decay or None,
            **ema,
        )
    return keras.optimizers.Adam(learning_rate=train.learning_rate, **ema)


def make_callbacks(train: TrainParams, model_path: Path, budget=None) -> list:
    """The seed's callbacks, each value from params, plus the learning-rate schedule (over
    the epochs `budget`, a `TimeBudget`, plans, when given)."""
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
            keras.callbacks.LearningRateScheduler(
                lambda epoch: learning_rate_at(epoch, train, budget and budget.planned)
            )
        )
    return callbacks


def fitted_temperature(model_path: Path, split, batch_size: int) -> float:
    """The temperature that calibrates the saved checkpoint on `split` (validation)."""
    from pipeline.calibration import apply_temperature, fit_temperature
    from pipeline.inference import load_model, predict_probabilities
    from pipeline.metrics import compute_metrics

    probabilities = predict_probabilities(load_model(model_path), split.array(), batch_size)
    temperature = fit_temperature(split.labels, probabilities)
    before = compute_metrics(split.labels, probabilities)[0]["loss"]
    after = compute_metrics(split.labels, apply_temperature(probabilities, temperature))[0]
    log.info(
        "temperature %.4g fitted on %d validation images: log-loss %.4f -> %.4f",
        temperature,
        split.count,
        before,
        after["loss"],
    )
    return temperature


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
    write_text_atomic(path, history_frame(history).to_csv(index=False, float_format="%.6g"))


def fit_model(
    params: Params, paths: Paths, train_split, val_split, steps: int, extra_callbacks: list
):
    """Build, compile and fit `model.arch` (in the caller's distribution scope); Keras'
    history and the seconds `model.fit` took."""
    import keras  # as in `run`: once the params are good

    from pipeline.callbacks import (
        KeepSnapshots,
        RecalibrateBatchNorm,
        TimeBudget,
        ValidateTheAverage,
    )
    from pipeline.dataset import evaluation_input, training_input
    from pipeline.models import build_model, whiten_stem

    train = params.train
    size = params.preprocess.picture_size
    model = build_model(params.model, (size, size, 1), len(CLASSES))
    if params.model.stem == "whitened":
        started = time.perf_counter()
        whiten_stem(
            model,
            (batch.numpy() for batch in train_split.images.map(lambda i, _: i).batch(1024)),
        )
        log.info(
            "whitened the stem's 3×3 filters on the %d training images in %.1f s",
            train_split.count,
            time.perf_counter() - started,
        )
    model.compile(
        optimizer=make_optimizer(train, steps),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing),
        metrics=["accuracy"],
    )
    paths.models.mkdir(parents=True, exist_ok=True)
    summary = model_summary_text(model)
    write_text_atomic(paths.model_summary, summary)

    # the schedule's callback logs each epoch's rate as `learning_rate`, before the
    # extra callbacks (MLflow's) read the logs
    budget = None
    if train.time_budget_minutes is not None:
        # the rates of the warm-up's epochs (without one, the first's) do not depend on
        # the schedule's length: the plan is fixed once they are done; plateau's never do
        fix_after = None if train.lr_schedule == "plateau" else train.warmup_epochs
        budget = TimeBudget(train.time_budget_minutes, train.epochs, fix_after)
    callbacks = [*make_callbacks(train, paths.model, budget), *extra_callbacks]
    class_weight = (
        balanced_class_weight(train_split.labels, len(CLASSES))
        if train.class_weight == "balanced"
        else None
    )
    recalibration = None
    if train.bn_recalibration_batches:
        fixed_batches = (
            train_split.images.shuffle(
                train_split.count, seed=train.seed, reshuffle_each_iteration=False
            )
            .map(lambda image, label: image)
            .batch(train.batch_size)
        )
        recalibration = RecalibrateBatchNorm(fixed_batches, train.bn_recalibration_batches, steps)
    if train.ema_momentum and train.ema_mode == "swap":
        # last, so that the checkpoint's on_epoch_end still sees the average; it
        # recalibrates BatchNorm itself, once the average is in
        if recalibration is not None:
            recalibration.set_model(model)
        callbacks.append(
            ValidateTheAverage(steps, recalibration.recalibrate if recalibration else None)
        )
    elif recalibration is not None:
        callbacks.append(recalibration)
    keeper = None
    if train.snapshots > 1:  # last: it keeps the weights as they were validated
        keeper = KeepSnapshots(train.cycle_epochs)
        callbacks.append(keeper)
    if budget is not None:  # last, so that an epoch's time includes all its callbacks
        callbacks.append(budget)
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
    return fit, time.perf_counter() - started, keeper, budget


def log_budget_outcome(budget, epochs_run: int) -> None:
    """What `train.time_budget_minutes` let train, and how to train the same without it."""
    given = f"train.time_budget_minutes {budget.seconds / 60:.4g}"
    if budget.replanned:
        log.warning(
            "%s: trained %d of train.epochs %d; the plan changed after it was fixed (the "
            "epochs' pace changed), so no train.epochs alone trains the same schedule",
            given,
            epochs_run,
            budget.epochs,
        )
    else:
        log.info(
            "%s: trained %d of train.epochs %d; -S train.epochs=%d -S "
            "train.time_budget_minutes=null trains the same",
            given,
            epochs_run,
            budget.epochs,
            budget.planned,
        )


def save_snapshot_ensemble(model, keeper, val_split, paths: Paths, batch_size: int) -> float:
    """Replace the checkpoint `model.h5` by the average of the snapshots `keeper` kept
    (written beside it, then renamed over it: an interruption leaves the checkpoint);
    the average's validation accuracy."""
    import numpy as np

    from pipeline.inference import predict_probabilities
    from pipeline.models import snapshot_ensemble

    ensemble = snapshot_ensemble(model, keeper.snapshots)
    probabilities = predict_probabilities(ensemble, val_split.array(), batch_size)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == val_split.labels))
    with replacing(paths.model) as scratch:
        ensemble.save(scratch)
    return accuracy


def run(params: Params, paths: Paths, extra_callbacks: list | None = None) -> TrainResult:
    """Train `model.arch` with `train.*` and write the model and the training reports."""
    # Keras and TensorFlow, here and in these modules: imported once the params are good
    import keras

    from pipeline.dataset import load_split, steps_per_epoch

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
        steps = steps_per_epoch(train_split.count, train.batch_size, train.steps_per_epoch)
        # the model's, the optimizer's and the metrics' variables are made in the scope
        with distribution_scope(train.distribution):
            fit, seconds, keeper, budget = fit_model(
                params, paths, train_split, val_split, steps, extra_callbacks or []
            )
        if budget is not None:
            log_budget_outcome(budget, len(fit.history["loss"]))
        ensemble_accuracy = None
        if keeper is not None:
            ensemble_accuracy = save_snapshot_ensemble(
                fit.model, keeper, val_split, paths, train.batch_size
            )
            log.info(
                "saved the average of %d snapshots (epochs %s) to %s: val_accuracy %.4f "
                "(the snapshots alone: %s)",
                len(keeper.snapshots),
                ", ".join(map(str, keeper.epochs)),
                paths.model,
                ensemble_accuracy,
                ", ".join(f"{fit.history['val_accuracy'][e - 1]:.4f}" for e in keeper.epochs),
            )
        temperature = 1.0
        if train.temperature_scaling:
            temperature = fitted_temperature(paths.model, val_split, train.batch_size)
        write_model_info(paths.model, info_for(params.preprocess, params.model.arch, temperature))
        epochs_run = len(fit.history["loss"])
        history = [
            {
                "epoch": epoch + 1,
                **{k: float(fit.history[k][epoch]) for k in HISTORY_COLUMNS[1:5]},
                "lr": float(fit.history["learning_rate"][epoch]),
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
            temperature=temperature,
            ensemble_val_accuracy=ensemble_accuracy,
        )
        log.info(
            "trained %d epochs in %.0f s (%.0f images/s); best %s %.4f at epoch %d, %s",
            epochs_run,
            seconds,
            result.train_images_per_second,
            train.checkpoint.monitor,
            history[result.best_epoch - 1][train.checkpoint.monitor],
            result.best_epoch,
            f"saved to {paths.model}" if keeper is None else "a single epoch, not saved",
        )
        return result
    finally:
        # leave the process as it was: later models in it compute in their own precision
        keras.mixed_precision.set_global_policy(previous_policy)


def history_frame(history: list[dict[str, float]]):
    import pandas as pd

    return pd.DataFrame(history, columns=HISTORY_COLUMNS)


def run_tracked(params: Params, paths: Paths) -> TrainResult:
    """`run` inside a new MLflow run that records its params, curves, reports and model."""
    with tracking.training_run(params, paths) as callbacks:
        result = run(params, paths, extra_callbacks=callbacks)
        tracking.log_training_summary(
            result.seconds,
            result.train_images_per_second,
            result.temperature,
            result.ensemble_val_accuracy,
        )
        return result


def main(argv: list[str] | None = None) -> int:
    return run_stage(
        argv,
        stage="train",
        description="Train the emotion CNN on data/processed (stage `train`).",
        work=run_tracked,
        errors=(FileNotFoundError, ValueError, TrackingError),
        tensorflow=True,
    )


if __name__ == "__main__":
    sys.exit(main())
