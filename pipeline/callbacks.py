"""Keras callbacks of the pipeline's own."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


def _now() -> float:
    return time.monotonic()


class _AtEachEpochsLastStep:
    """Calls `at_last_step` after the last training batch of each epoch (`steps_per_epoch`
    batches), before validation and `on_epoch_end`."""

    steps_per_epoch: int

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        if batch == self.steps_per_epoch - 1:
            self.at_last_step()

    def at_last_step(self) -> None:
        raise NotImplementedError


class RecalibrateBatchNorm(_AtEachEpochsLastStep, keras.callbacks.Callback):
    """Recompute BatchNormalization statistics before each validation ("precise BN").

    Keras keeps BatchNorm means and variances as running averages with momentum
    0.99, which need a few hundred steps to forget their initial values. On a
    small dataset (the embedded sample has ~30 steps an epoch) validation then
    runs with statistics that do not match the weights, and its accuracy says
    little about the model. After the last training batch of each epoch, this
    callback replaces them by the exact average over `batches` fixed training
    batches. Weights are untouched; on a large dataset the statistics barely
    change.
    """

    def __init__(self, images: tf.data.Dataset, batches: int, steps_per_epoch: int):
        super().__init__()
        self.images = images
        self.batches = batches
        self.steps_per_epoch = steps_per_epoch

    def _norm_layers(self) -> list[keras.layers.BatchNormalization]:
        found, todo = [], list(self.model.layers)
        while todo:
            layer = todo.pop(0)
            if isinstance(layer, keras.layers.BatchNormalization):
                found.append(layer)
            todo.extend(getattr(layer, "layers", []))
        return found

    def recalibrate(self) -> None:
        layers = self._norm_layers()
        if not layers:
            return
        momenta = [layer.momentum for layer in layers]
        try:
            for index, batch in enumerate(self.images.take(self.batches)):
                # a cumulative average: the k-th batch gets weight 1/(k+1)
                for layer in layers:
                    layer.momentum = index / (index + 1)
                self.model(batch, training=True)
        finally:
            for layer, momentum in zip(layers, momenta, strict=True):
                layer.momentum = momentum

    def at_last_step(self) -> None:
        self.recalibrate()


class ValidateTheAverage(_AtEachEpochsLastStep, keras.callbacks.SwapEMAWeights):
    """`train.ema_mode: swap`: the optimizer's moving average of the weights stands in for
    the weights from each epoch's last step to the end of the epoch.

    Keras' `SwapEMAWeights` swaps the average in for validation only, or for the whole of
    `on_epoch_end` and the next epoch's start (`swap_on_epoch`); neither lets BatchNorm
    statistics be recomputed for the average before validation. Here the average comes
    in after the last training batch, `recalibrate` (when given) recomputes BatchNorm's
    statistics for it, validation and the callbacks before this one in `on_epoch_end`
    (the checkpoint, early stopping) see it, and this callback, last in the list, swaps the
    weights back: training goes on from its own weights, the average untouched. The
    optimizer (`use_ema=True`, `ema_overwrite_frequency=None`) then puts the average in
    place once, when `fit` ends.
    """

    def __init__(self, steps_per_epoch: int, recalibrate=None):
        super().__init__(swap_on_epoch=False)
        self.steps_per_epoch = steps_per_epoch
        self.recalibrate = recalibrate

    def at_last_step(self) -> None:
        super().on_test_begin()  # swaps the average in
        if self.recalibrate is not None:
            self.recalibrate()

    def on_test_begin(self, logs=None) -> None:
        """Validation inside `fit` runs on the average already swapped in."""

    def on_test_end(self, logs=None) -> None:
        """It stays in until this callback's `on_epoch_end`."""

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        super().on_test_end()  # swaps the weights back


class KeepSnapshots(keras.callbacks.Callback):
    """`train.snapshots`: a copy of the weights at the end of every `cycle`-th epoch, as
    they were validated (after BatchNorm recalibration), in `snapshots`."""

    def __init__(self, cycle: int):
        super().__init__()
        self.cycle = cycle
        self.snapshots: list[list] = []
        self.epochs: list[int] = []

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if (epoch + 1) % self.cycle == 0:
            self.snapshots.append(self.model.get_weights())
            self.epochs.append(epoch + 1)


class TimeBudget(keras.callbacks.Callback):
    """`train.time_budget_minutes`: as many of `epochs` as fit in `minutes`, with the
    learning-rate schedule laid over them (`planned`, which the schedule reads).

    The first `fix_after` epochs train at rates that do not depend on the schedule's
    length (the warm-up; without one, the first epoch). Once they are done, their pace
    fixes `planned`: the epochs done plus as many more as the time left holds at the
    mean time of an epoch, the first one left out of the mean when there are others (it
    also builds the graph). So a run that is not slowed down later trains exactly as
    `train.epochs: <planned>` without a budget would. After each later epoch the plan is
    made again from the pace of all the epochs so far: shorter when the rest no longer
    fits, longer again (never beyond `epochs`) when a slow spell has passed, the schedule
    with it. Before the plan is fixed, training stops only when not even one more epoch
    fits; with `fix_after=None` (a schedule that does not depend on its length, as
    `plateau`) the plan is never fixed, and that is the only stop.
    """

    def __init__(
        self,
        minutes: float,
        epochs: int,
        fix_after: int | None,
        clock: Callable[[], float] | None = None,
    ):
        super().__init__()
        self.seconds = 60.0 * minutes
        self.epochs = epochs
        self.planned = epochs
        self.fix_after = None if fix_after is None else max(1, fix_after)
        self.fixed_at: int | None = None  # the epoch after which the plan was fixed
        self.replanned = False  # whether a later epoch changed the fixed plan
        self.clock = clock or _now

    def on_train_begin(self, logs=None) -> None:
        self.started = self.last = self.clock()
        self.durations: list[float] = []

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        now = self.clock()
        self.durations.append(now - self.last)
        self.last = now
        done = epoch + 1
        timed = self.durations[1:] or self.durations
        pace = sum(timed) / len(timed)
        fits = done + max(0, int((self.seconds - (now - self.started)) // pace))
        target = min(self.epochs, fits)
        if self.fix_after is None or done < self.fix_after:
            if fits == done:
                self._plan(done, done, pace, "ended: not one more epoch fits")
        elif self.fixed_at is None:
            self.fixed_at = done
            self._plan(target, done, pace, "fixed")
        elif target != self.planned:
            self.replanned = True
            if target > self.planned:
                why = "lengthened, as the epochs sped up"
            else:
                why = "shortened, as the epochs slowed down"
            self._plan(target, done, pace, why)
        if done >= self.planned:
            self.model.stop_training = True

    def _plan(self, planned: int, done: int, pace: float, why: str) -> None:
        self.planned = planned
        log.info(
            "time budget %.4g min, after epoch %d: %.0f s an epoch, so %d of train.epochs %d "
            "fit (plan %s)",
            self.seconds / 60,
            done,
            pace,
            planned,
            self.epochs,
            why,
        )
