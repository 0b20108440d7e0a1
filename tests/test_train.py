"""The train stage: callbacks and schedules from params, seeded input and augmentation,
BatchNorm recalibration, and short real trainings on the tiny sample (its outputs, and
the same weights from the same seed)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import tiny_params
from PIL import Image

import pipeline
from pipeline import CLASSES, metrics, runtime, train
from pipeline import callbacks as pipeline_callbacks
from pipeline.callbacks import (
    KeepSnapshots,
    RecalibrateBatchNorm,
    TimeBudget,
    ValidateTheAverage,
)
from pipeline.dataset import (
    Split,
    augment_batch,
    evaluation_input,
    load_split,
    mix_batch,
    steps_per_epoch,
    training_input,
)
from pipeline.explain import feature_layer
from pipeline.modelmeta import read_model_info
from pipeline.models import build_model, snapshot_ensemble, whitening_filters
from pipeline.params import AugmentationParams, ModelParams, TrainParams
from pipeline.paths import Paths

# two epochs of ~4 steps, BatchNorm recalibrated from 2 batches: seconds, not minutes
SHORT = {
    "train.epochs": 2,
    "train.batch_size": 16,
    "train.bn_recalibration_batches": 2,
}
NO_AUGMENTATION = AugmentationParams(
    horizontal_flip=False,
    rotation=0.0,
    zoom=0.0,
    translation=0.0,
    random_erasing=0.0,
    mixup=0.0,
)


pytestmark = pytest.mark.usefixtures("float32_policy")


def train_params(**overrides: object) -> TrainParams:
    return tiny_params(**{f"train.{key}": value for key, value in overrides.items()}).train


def train_into(root: Path, tiny_data: Paths, **overrides: object):
    """Train on the tiny sample (linked into `root/data`) with `SHORT` and `overrides`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").symlink_to(tiny_data.root / "data", target_is_directory=True)
    paths = Paths(root)
    params = tiny_params(**{**SHORT, **overrides})
    try:
        result = train.run(params, paths)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return params, paths, result


def validation_images(paths: Paths) -> np.ndarray:
    split = load_split(paths.processed / "validation", 48)
    return np.stack([image.numpy() for image, _ in split.images])


def assert_scores_what_was_logged(paths: Paths, probabilities, result, loss=False) -> None:
    """`probabilities`, model.h5's for the validation faces, give the val_accuracy (and
    with `loss`, the val_loss: no label smoothing) logged at the best epoch: the file is
    the checkpoint of that epoch, as it was validated."""
    labels = load_split(paths.processed / "validation", 48).labels
    logged = result.history[result.best_epoch - 1]
    accuracy = float(np.mean(probabilities.argmax(axis=1) == labels))
    assert accuracy == pytest.approx(logged["val_accuracy"], abs=1e-6)
    if loss:
        chosen = probabilities[np.arange(len(labels)), labels]
        assert float(np.mean(-np.log(chosen))) == pytest.approx(logged["val_loss"], rel=1e-4)


def faces(count: int, seed: int = 0) -> np.ndarray:
    """A float batch in [0, 255] whose left and right halves differ (so a mirror shows)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, 48, dtype=np.float32)[None, None, :, None]
    noise = rng.integers(0, 56, (count, 48, 48, 1)).astype(np.float32)
    return ramp + noise


def augment(images: np.ndarray, seed: tuple[int, int], **parts: object) -> np.ndarray:
    params = NO_AUGMENTATION.model_copy(update=parts)
    out = augment_batch(tf.constant(images), tf.constant(seed, tf.int64), params)
    return out.numpy()


# ---------------------------------------------------------------- callbacks from params


CALLBACK_CHOICES = [
    {  # the values params.yaml has
        "checkpoint.monitor": "val_accuracy",
        "checkpoint.save_best_only": True,
        "early_stopping.monitor": "val_loss",
        "early_stopping.patience": 3,
        "early_stopping.restore_best_weights": True,
        "reduce_lr.monitor": "val_loss",
        "reduce_lr.factor": 0.2,
        "reduce_lr.patience": 3,
        "reduce_lr.min_delta": 0.0001,
    },
    {  # every value changed
        "checkpoint.monitor": "val_loss",
        "checkpoint.save_best_only": False,
        "early_stopping.monitor": "val_accuracy",
        "early_stopping.patience": 7,
        "early_stopping.restore_best_weights": False,
        "reduce_lr.monitor": "loss",
        "reduce_lr.factor": 0.5,
        "reduce_lr.patience": 2,
        "reduce_lr.min_delta": 0.01,
    },
]


@pytest.mark.parametrize("choice", CALLBACK_CHOICES, ids=["params.yaml", "changed"])
def test_plateau_callbacks_take_every_value_from_params(choice: dict, tmp_path: Path) -> None:
    params = train_params(lr_schedule="plateau", **choice)
    model_path = tmp_path / "models" / "model.h5"

    checkpoint, stopping, plateau = train.make_callbacks(params, model_path)

    assert isinstance(checkpoint, keras.callbacks.ModelCheckpoint)
    assert checkpoint.filepath == str(model_path)
    assert checkpoint.monitor == choice["checkpoint.monitor"]
    assert checkpoint.save_best_only is choice["checkpoint.save_best_only"]
    assert isinstance(stopping, keras.callbacks.EarlyStopping)
    assert stopping.monitor == choice["early_stopping.monitor"]
    assert stopping.patience == choice["early_stopping.patience"]
    assert stopping.restore_best_weights is choice["early_stopping.restore_best_weights"]
    assert isinstance(plateau, keras.callbacks.ReduceLROnPlateau)
    assert plateau.monitor == choice["reduce_lr.monitor"]
    assert plateau.factor == choice["reduce_lr.factor"]
    assert plateau.patience == choice["reduce_lr.patience"]
    assert plateau.min_delta == choice["reduce_lr.min_delta"]


def test_no_early_stopping_when_disabled(tmp_path: Path) -> None:
    params = train_params(**{"early_stopping.enabled": False})
    kinds = [type(c) for c in train.make_callbacks(params, tmp_path / "model.h5")]
    assert kinds == [keras.callbacks.ModelCheckpoint, keras.callbacks.ReduceLROnPlateau]


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_cosine_and_onecycle_set_each_epochs_rate_instead_of_plateau(
    schedule: str, tmp_path: Path
) -> None:
    params = train_params(lr_schedule=schedule, epochs=6, warmup_epochs=2, learning_rate=0.01)
    callbacks = train.make_callbacks(params, tmp_path / "model.h5")
    assert [type(c) for c in callbacks] == [
        keras.callbacks.ModelCheckpoint,
        keras.callbacks.EarlyStopping,
        keras.callbacks.LearningRateScheduler,
    ]
    scheduler = callbacks[-1]
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=train.make_optimizer(params, 10), loss="mse")
    scheduler.set_model(model)
    rates = []
    for epoch in range(params.epochs):
        scheduler.on_epoch_begin(epoch)
        rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
    expected = [train.learning_rate_at(epoch, params) for epoch in range(params.epochs)]
    assert rates == pytest.approx(expected, rel=1e-6)
    assert len(set(np.round(rates, 8))) == params.epochs  # the rate moves every epoch


# ---------------------------------------------------------------- schedules and small helpers


def test_cosine_warms_up_linearly_then_decays_to_zero() -> None:
    params = train_params(lr_schedule="cosine", epochs=10, warmup_epochs=2, learning_rate=0.01)
    rates = [train.learning_rate_at(epoch, params) for epoch in range(10)]

    assert rates[:3] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01])  # (e+1)/(warmup+1), then top
    assert rates[6] == pytest.approx(0.005)  # half-way through the decay: cos(pi/2)
    assert all(a > b for a, b in itertools.pairwise(rates[2:]))
    assert rates[-1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert rates[-1] < 0.0005
    # without warm-up it starts at the full rate
    plain = train_params(lr_schedule="cosine", epochs=10, warmup_epochs=0, learning_rate=0.01)
    assert train.learning_rate_at(0, plain) == pytest.approx(0.01)
    assert train.learning_rate_at(5, plain) == pytest.approx(0.005)


@pytest.mark.parametrize(("warmup", "peak"), [(0, 3), (5, 5)])  # 0: 30 % of 10 epochs
def test_onecycle_rises_to_the_rate_then_falls(warmup: int, peak: int) -> None:
    params = train_params(
        lr_schedule="onecycle", epochs=10, warmup_epochs=warmup, learning_rate=0.01
    )
    rates = [train.learning_rate_at(epoch, params) for epoch in range(10)]

    assert rates[0] == pytest.approx(0.001)  # starts at a tenth
    assert rates[1] == pytest.approx(0.01 * (0.1 + 0.9 / peak))
    assert max(rates) == pytest.approx(0.01)
    assert rates.index(max(rates)) == peak
    assert all(a < b for a, b in itertools.pairwise(rates[: peak + 1]))
    assert all(a > b for a, b in itertools.pairwise(rates[peak:]))
    assert rates[-1] < 0.1 * 0.01


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_snapshots_restart_the_whole_schedule_each_cycle(schedule: str) -> None:
    one = train_params(lr_schedule=schedule, epochs=4, warmup_epochs=1, learning_rate=0.01)
    three = one.model_copy(update={"epochs": 12, "snapshots": 3})
    rates = [train.learning_rate_at(epoch, three) for epoch in range(12)]
    cycle = [train.learning_rate_at(epoch, one) for epoch in range(4)]
    assert rates == pytest.approx(cycle * 3)
    assert max(rates[4:8]) == pytest.approx(0.01)  # back up to the peak
    assert rates[3] < 0.01


def test_keep_snapshots_copies_the_weights_at_each_cycles_end() -> None:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    keeper = KeepSnapshots(cycle=2)
    keeper.set_model(model)
    for epoch in range(6):
        model.layers[0].bias.assign([float(epoch)])
        keeper.on_epoch_end(epoch)
    assert keeper.epochs == [2, 4, 6]
    assert [float(weights[1][0]) for weights in keeper.snapshots] == [1.0, 3.0, 5.0]


def test_snapshot_ensemble_averages_the_networks_softmax() -> None:
    net = build_model(ModelParams(arch="seed", dropout=0.25), (48, 48, 1), len(CLASSES))
    first = net.get_weights()
    second = [
        w + 0.05 * np.random.default_rng(1).standard_normal(w.shape).astype(w.dtype) for w in first
    ]
    ensemble = snapshot_ensemble(net, [first, second])
    assert [layer.name for layer in ensemble.layers] == [
        "image",
        "snapshot_1",
        "snapshot_2",
        "snapshot_average",
    ]
    images = faces(4)
    alone = []
    for weights in (first, second):
        net.set_weights(weights)
        alone.append(net.predict(images, verbose=0))
    assert not np.allclose(alone[0], alone[1], atol=1e-3)  # two different networks
    np.testing.assert_allclose(
        ensemble.predict(images, verbose=0), (alone[0] + alone[1]) / 2, atol=1e-6
    )
    named = r"averages 2 networks \(snapshot_1, snapshot_2: train\.snapshots\)"
    with pytest.raises(ValueError, match=named):
        feature_layer(ensemble)


def test_sgd_is_nesterov_momentum_with_the_weight_decay() -> None:
    optimizer = train.make_optimizer(train_params(optimizer="sgd", weight_decay=5e-4), 10)
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert (optimizer.momentum, optimizer.nesterov, optimizer.weight_decay) == (0.9, True, 5e-4)
    assert not optimizer.use_ema


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_ema_puts_the_averaged_weights_in_place_after_each_epoch(name: str) -> None:
    params = train_params(optimizer=name, ema_momentum=0.9, learning_rate=0.1)
    optimizer = train.make_optimizer(params, steps_per_epoch=3)
    assert (optimizer.use_ema, optimizer.ema_momentum) == (True, 0.9)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    x, y = np.ones((6, 2), np.float32), np.full((6, 1), 3.0, np.float32)
    seen = []

    class Watch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            weights = keras.ops.convert_to_numpy(model.layers[0].kernel).copy()
            average = keras.ops.convert_to_numpy(optimizer._model_variables_moving_average[0])
            seen.append((batch, weights, average.copy()))

    model.fit(x, y, batch_size=2, epochs=2, shuffle=False, verbose=0, callbacks=[Watch()])

    assert [batch for batch, _, _ in seen] == [0, 1, 2, 0, 1, 2]
    for step, (batch, weights, average) in enumerate(seen):
        if batch == 2:  # an epoch's last step: the weights are the average
            np.testing.assert_array_equal(weights, average)
        elif step:  # (the first step starts the average at the weights)
            assert not np.allclose(weights, average)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_ema_swap_validates_and_checkpoints_the_average_and_trains_on_from_the_weights(
    name: str,
) -> None:
    params = train_params(optimizer=name, ema_momentum=0.9, ema_mode="swap", learning_rate=0.1)
    optimizer = train.make_optimizer(params, steps_per_epoch=3)
    assert (optimizer.use_ema, optimizer.ema_overwrite_frequency) == (True, None)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    x = np.array([[1, 0], [0, 1], [1, 1], [2, 1], [1, 2], [0, 0]], np.float32)
    y = np.full((6, 1), 3.0, np.float32)

    def weights():
        return [keras.ops.convert_to_numpy(v).copy() for v in model.trainable_variables]

    def average():
        moving = optimizer._model_variables_moving_average
        return [keras.ops.convert_to_numpy(v).copy() for v in moving]

    seen: dict[str, list] = {"last step": [], "recalibrated": [], "checkpoint": [], "after": []}

    class Before(keras.callbacks.Callback):  # where the checkpoint and early stopping sit
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                seen["last step"].append((weights(), average()))

        def on_epoch_end(self, epoch, logs=None):
            seen["checkpoint"].append((weights(), logs["val_loss"]))

    class After(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen["after"].append((weights(), average()))

    swap = ValidateTheAverage(3, recalibrate=lambda: seen["recalibrated"].append(weights()))
    model.fit(
        x,
        y,
        batch_size=2,
        epochs=2,
        shuffle=False,
        verbose=0,
        validation_data=(x, y),
        callbacks=[Before(), swap, After()],
    )

    def same(got, want):  # Keras swaps by adding and subtracting: equal to a float's last bit
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)

    for epoch in range(2):
        trained, averaged = seen["last step"][epoch]
        assert not np.allclose(trained[0], averaged[0])
        # BatchNorm is recalibrated, validated and checkpointed with the average ...
        for got, want in zip(seen["recalibrated"][epoch], averaged, strict=True):
            same(got, want)
        checkpointed, val_loss = seen["checkpoint"][epoch]
        for got, want in zip(checkpointed, averaged, strict=True):
            same(got, want)
        kernel, bias = averaged
        assert val_loss == pytest.approx(float(np.mean((x @ kernel + bias - y) ** 2)), rel=1e-5)
        # ... and training goes on from its own weights, the average kept
        back, kept = seen["after"][epoch]
        for got, want in zip([*back, *kept], [*trained, *averaged], strict=True):
            same(got, want)
    # when fit ends, the model holds the last average
    for got, want in zip(weights(), seen["last step"][1][1], strict=True):
        same(got, want)


def test_ema_swap_trains_the_pipeline_with_batchnorm_recalibrated(
    tmp_path: Path, tiny_data: Paths
) -> None:
    _, paths, result = train_into(
        tmp_path, tiny_data, **{"train.ema_momentum": 0.9, "train.ema_mode": "swap"}
    )

    # model.h5 is the average that was validated, BatchNorm statistics included
    model = keras.models.load_model(paths.model, compile=False)
    probabilities = model.predict(validation_images(paths), batch_size=16, verbose=0)
    assert_scores_what_was_logged(paths, probabilities, result, loss=True)


def test_whitened_stem_is_set_from_every_training_face_before_the_first_epoch(
    tmp_path: Path, tiny_data: Paths
) -> None:
    _, paths, _ = train_into(
        tmp_path, tiny_data, **{"model.arch": "resnet", "model.stem": "whitened"}
    )

    # model.h5 holds the filters of all 70 training faces, unchanged by two epochs
    faces = load_split(paths.processed / "train", 48).array()
    saved = keras.models.load_model(paths.model, compile=False).get_layer("stem_conv")
    np.testing.assert_allclose(saved.kernel.numpy(), whitening_filters([faces / 255.0]), rtol=1e-4)


class Clock:
    """A clock for `TimeBudget` whose epochs take the seconds of `durations` in turn (the
    first call starts the training); the last one repeats."""

    def __init__(self, *durations: float):
        self.durations = list(durations)
        self.now = 0.0
        self.calls = 0

    def __call__(self) -> float:
        if self.calls:
            self.now += self.durations[min(self.calls, len(self.durations)) - 1]
        self.calls += 1
        return self.now


def run_budget(budget: TimeBudget, epochs: int) -> list[int]:
    """Epochs through `budget` as `fit` would, until it stops them; the plan after each."""
    budget.set_model(SimpleNamespace(stop_training=False))
    budget.on_train_begin()
    plans = []
    for epoch in range(epochs):
        budget.on_epoch_end(epoch)
        plans.append(budget.planned)
        if budget.model.stop_training:
            break
    return plans


def test_time_budget_fixes_the_plan_from_the_warm_ups_pace_leaving_the_first_epoch_out():
    # the first epoch builds the graph (100 s), then 60 s each: 10 min hold 100 + 8 × 60
    budget = TimeBudget(10, epochs=40, fix_after=3, clock=Clock(100, 60))
    plans = run_budget(budget, 40)

    assert plans == [40, 40] + [9] * 7  # fixed after the warm-up's third epoch
    assert budget.fixed_at == 3 and not budget.replanned
    assert len(plans) == 9  # stopped when the plan was done: 100 + 8 × 60 = 580 s


def test_time_budget_never_plans_more_than_train_epochs() -> None:
    budget = TimeBudget(60, epochs=5, fix_after=1, clock=Clock(10))
    assert run_budget(budget, 5) == [5] * 5


def test_time_budget_shortens_the_plan_when_the_epochs_slow_down() -> None:
    # 60 s epochs plan 10 epochs in 10 min; from the fourth on they take 120 s
    budget = TimeBudget(10, epochs=40, fix_after=2, clock=Clock(60, 60, 60, 120))
    plans = run_budget(budget, 40)

    assert plans[:3] == [40, 10, 10]
    assert budget.replanned
    assert plans == [40, 10, 10, 7, 7, 6]  # 80 s, then 96 s an epoch: 6 in 540 s
    assert budget.last - budget.started <= 600


def test_time_budget_lengthens_the_plan_again_when_a_slow_spell_passes(caplog) -> None:
    # one 120 s epoch among 60 s ones: the plan of 10 drops to 7, and grows back to the 8
    # that the mean pace of all the epochs then holds
    budget = TimeBudget(10, epochs=40, fix_after=2, clock=Clock(60, 60, 60, 120, 60))
    plans = run_budget(budget, 40)

    assert plans == [40, 10, 10, 7, 8, 8, 8, 8]
    assert budget.replanned
    assert budget.last - budget.started == 540
    with caplog.at_level("INFO", logger="pipeline"):
        train.log_budget_outcome(budget, len(plans))
    assert [r.levelname for r in caplog.records if "time_budget" in r.getMessage()] == ["WARNING"]
    assert (
        "train.time_budget_minutes 10: trained 8 of train.epochs 40; the plan changed after "
        "it was fixed (the epochs' pace changed), so no train.epochs alone trains the same "
        "schedule" in caplog.text
    )


def test_time_budget_stops_in_the_warm_up_when_not_one_more_epoch_fits() -> None:
    budget = TimeBudget(2.5, epochs=40, fix_after=5, clock=Clock(60))
    assert run_budget(budget, 40) == [40, 2]  # after 120 s, a third 60 s epoch would not fit
    assert budget.fixed_at is None


def test_time_budget_without_a_plan_stops_only_when_not_one_more_epoch_fits() -> None:
    # plateau's rates do not depend on the length: the pace of every epoch so far counts
    # (the first's 100 s left out), and training stops when the next would not fit in 5 min
    budget = TimeBudget(5, epochs=40, fix_after=None, clock=Clock(100, 60))
    assert run_budget(budget, 40) == [40, 40, 40, 4]  # 100 + 3 × 60 = 280 s; 340 would not
    assert budget.fixed_at is None and not budget.replanned


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_the_schedule_runs_over_the_epochs_the_budget_planned(schedule: str, tmp_path) -> None:
    params = train_params(lr_schedule=schedule, epochs=40, warmup_epochs=3, learning_rate=0.01)
    budget = TimeBudget(10, epochs=40, fix_after=3, clock=Clock(60))
    scheduler = train.make_callbacks(params, tmp_path / "model.h5", budget)[-1]
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=train.make_optimizer(params, 10), loss="mse")
    scheduler.set_model(model)
    budget.set_model(model)
    budget.on_train_begin()
    rates = []
    for epoch in range(40):
        scheduler.on_epoch_begin(epoch)
        rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
        budget.on_epoch_end(epoch)
        if model.stop_training:
            break

    planned = params.model_copy(update={"epochs": 10})
    assert rates == pytest.approx([train.learning_rate_at(e, planned) for e in range(10)])
    assert rates[-1] < 0.1 * 0.01  # the schedule ends within the budget, not at epoch 40


@pytest.mark.slow
def test_a_budgeted_training_is_the_fixed_training_of_the_epochs_it_planned(
    tmp_path: Path, tiny_data: Paths, monkeypatch, caplog
) -> None:
    # epochs of 60 s on the budget's clock: 3.5 min hold 3 of the 10
    monkeypatch.setattr(pipeline_callbacks, "_now", Clock(60))
    schedule = {
        "train.epochs": 10,
        "train.lr_schedule": "onecycle",
        "train.warmup_epochs": 1,
        "train.early_stopping.enabled": False,
    }
    with caplog.at_level("INFO", logger="pipeline"):
        _, budgeted_paths, budgeted = train_into(
            tmp_path / "budgeted", tiny_data, **schedule, **{"train.time_budget_minutes": 3.5}
        )
    _, fixed_paths, fixed = train_into(
        tmp_path / "fixed", tiny_data, **{**schedule, "train.epochs": 3}
    )

    assert len(budgeted.history) == 3
    assert budgeted.history == fixed.history
    assert budgeted_paths.history.read_bytes() == fixed_paths.history.read_bytes()
    images = validation_images(fixed_paths)
    predictions = [
        keras.models.load_model(p.model, compile=False).predict(images, verbose=0)
        for p in (budgeted_paths, fixed_paths)
    ]
    np.testing.assert_array_equal(predictions[0], predictions[1])
    assert (
        "train.time_budget_minutes 3.5: trained 3 of train.epochs 10; -S train.epochs=3 "
        "-S train.time_budget_minutes=null trains the same" in caplog.text
    )


def test_balanced_class_weight_is_n_over_k_times_count() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 0])  # 5, 2, 1, and none of class 3
    weights = train.balanced_class_weight(labels, 4)
    assert weights == pytest.approx({0: 8 / (4 * 5), 1: 8 / (4 * 2), 2: 8 / (4 * 1), 3: 8 / 4})
    # each present class then weighs the same in the loss
    per_class = {c: weights[c] * np.sum(labels == c) for c in (0, 1, 2)}
    assert len({round(v, 9) for v in per_class.values()}) == 1


@pytest.mark.parametrize(
    ("count", "batch", "mode", "steps"),
    [
        (70, 16, "floor", 4),  # 64 of 70 images an epoch, as the seed did
        (70, 16, "all", 5),
        (64, 16, "floor", 4),
        (64, 16, "all", 4),
        (10, 16, "floor", 1),  # fewer images than a batch still trains
        (10, 16, "all", 1),
    ],
)
def test_steps_per_epoch(count: int, batch: int, mode: str, steps: int) -> None:
    assert steps_per_epoch(count, batch, mode) == steps


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_explicit_precision_passes_through(policy: str, monkeypatch) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bfloat16", lambda: True)
    assert runtime.resolve_precision(policy) == policy


@pytest.mark.parametrize(
    ("bf16", "gpus", "policy"),
    [
        (False, [], "float32"),
        (True, [], "mixed_bfloat16"),
        (True, ["GPU:0"], "mixed_float16"),
        (False, ["GPU:0"], "mixed_float16"),
    ],
)
def test_auto_precision_follows_the_hardware(bf16: bool, gpus: list, policy: str, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bfloat16", lambda: bf16)
    monkeypatch.setattr(
        tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else []
    )
    assert runtime.resolve_precision("auto") == policy


def test_best_epoch_is_the_first_best_of_the_monitor() -> None:
    history = [
        {"val_accuracy": 0.2, "val_loss": 1.5},
        {"val_accuracy": 0.4, "val_loss": 1.2},
        {"val_accuracy": 0.4, "val_loss": 1.1},
        {"val_accuracy": 0.3, "val_loss": 1.3},
    ]
    assert metrics.best_epoch(history, "val_accuracy") == 2
    assert metrics.best_epoch(history, "val_loss") == 3


# ---------------------------------------------------------------- augmentation


ALL_PARTS = {
    "horizontal_flip": True,
    "rotation": 0.05,
    "zoom": 0.1,
    "translation": 0.1,
    "random_erasing": 0.5,
    "mixup": 0.0,  # it mixes labels too: `training_input`, tested on its own below
}


def test_augmentation_depends_only_on_its_seed() -> None:
    images = faces(8)
    first = augment(images, (42, 3), **ALL_PARTS)
    again = augment(images, (42, 3), **ALL_PARTS)
    other_batch = augment(images, (42, 4), **ALL_PARTS)
    other_seed = augment(images, (7, 3), **ALL_PARTS)

    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_batch)
    assert not np.array_equal(first, other_seed)
    assert not np.array_equal(first, images)


def test_no_augmentation_leaves_the_batch_as_it_is() -> None:
    images = faces(4)
    assert np.array_equal(augment(images, (1, 2)), images)


def test_flip_only_gives_each_image_itself_or_its_mirror() -> None:
    images = faces(16)
    out = augment(images, (42, 0), horizontal_flip=True)
    mirrored = images[:, :, ::-1, :]

    flipped = []
    for image, result, mirror in zip(images, out, mirrored, strict=True):
        same, mirror_of = np.array_equal(result, image), np.array_equal(result, mirror)
        assert same != mirror_of
        flipped.append(mirror_of)
    assert 0 < sum(flipped) < len(flipped)  # a coin per image, not per batch


@pytest.mark.parametrize(
    "part", [{"rotation": 0.1}, {"zoom": 0.3}, {"translation": 0.2}, ALL_PARTS]
)
def test_geometric_augmentation_keeps_shape_and_value_range(part: dict) -> None:
    images = faces(8)
    out = augment(images, (5, 1), **{**part, "random_erasing": 0.0})

    assert out.shape == images.shape
    assert out.dtype == np.float32
    # bilinear interpolation of reflected pixels never leaves the input's range
    assert out.min() >= images.min() - 1e-3
    assert out.max() <= images.max() + 1e-3
    for image, result in zip(images, out, strict=True):
        assert not np.array_equal(image, result)  # every image moved


def test_random_erasing_always_replaces_one_rectangle() -> None:
    images = faces(16)
    out = augment(images, (3, 9), random_erasing=1.0)

    assert out.shape == images.shape
    assert out.min() >= 0.0
    assert out.max() <= 255.0
    for image, result in zip(images, out, strict=True):
        changed = (image != result)[..., 0]
        rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        assert rows.size and cols.size
        box = np.zeros_like(changed)
        box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
        assert np.array_equal(changed, box)  # a solid rectangle, nothing outside it
        assert 0.01 <= box.mean() <= 0.3  # 2-25 % of the area, give or take the pixel grid

    unchanged = augment(images, (3, 9), random_erasing=0.0)
    assert np.array_equal(unchanged, images)


# ---------------------------------------------------------------- the input pipeline


def image_ids(split: Split) -> dict[bytes, int]:
    ids = {image.numpy().tobytes(): index for index, (image, _) in enumerate(split.images)}
    assert len(ids) == split.count  # every image is told apart by its pixels
    return ids


def take_batches(dataset, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(count)]


def test_training_batches_repeat_with_the_seed_and_reshuffle_every_epoch(tiny_data: Paths):
    split = load_split(tiny_data.processed / "train", 48)
    assert split.count == 70
    batches = 2 * 70 // 10  # two epochs exactly
    first = take_batches(training_input(split, 10, 42, NO_AUGMENTATION), batches)
    again = take_batches(training_input(split, 10, 42, NO_AUGMENTATION), batches)
    other = take_batches(training_input(split, 10, 43, NO_AUGMENTATION), batches)

    assert all(
        np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        for a, b in zip(first, again, strict=True)
    )
    ids = image_ids(split)
    order = [ids[image.tobytes()] for images, _ in first for image in images]
    labels = [int(label.argmax()) for _, onehot in first for label in onehot]
    assert labels == [int(split.labels[i]) for i in order]  # labels travel with their image
    epoch1, epoch2 = order[:70], order[70:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(70))  # each epoch sees every image
    assert epoch1 != epoch2  # reshuffled
    assert epoch1 != list(range(70))
    other_order = [ids[image.tobytes()] for images, _ in other for image in images]
    assert other_order[:70] != epoch1


def test_training_batches_are_augmented_per_batch_with_the_seed(tiny_data: Paths) -> None:
    split = load_split(tiny_data.processed / "train", 48)
    augmentation = AugmentationParams(**ALL_PARTS)
    first = take_batches(training_input(split, 16, 42, augmentation), 5)
    again = take_batches(training_input(split, 16, 42, augmentation), 5)
    plain = take_batches(training_input(split, 16, 42, NO_AUGMENTATION), 5)

    assert [b[0].shape for b in first] == [(16, 48, 48, 1)] * 5  # full batches only
    for a, b, p in zip(first, again, plain, strict=True):
        assert np.array_equal(a[0], b[0])
        assert np.array_equal(a[1], p[1])  # the same images, now augmented
        assert not np.array_equal(a[0], p[0])


def test_mixup_blends_each_image_and_its_label_with_the_next_by_one_weight() -> None:
    count = len(CLASSES)
    images = np.arange(count, dtype=np.float32)[:, None, None, None] * 30 + np.zeros(
        (count, 48, 48, 1), np.float32
    )  # image i is all 30 * i
    labels = np.eye(count, dtype=np.float32)  # image i is of class i
    seed = tf.constant([42, 3], tf.int64)
    mixed, mixed_labels = (t.numpy() for t in mix_batch(images, labels, seed, 0.4))
    again = mix_batch(images, labels, seed, 0.4)[0].numpy()
    other = mix_batch(images, labels, tf.constant([42, 4], tf.int64), 0.4)[0].numpy()

    weight = mixed_labels[np.arange(count), np.arange(count)]  # its own class's share
    following = (np.arange(count) + 1) % count
    np.testing.assert_allclose(mixed_labels.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(mixed_labels[np.arange(count), following], 1 - weight, rtol=1e-5)
    expected = weight * 30 * np.arange(count) + (1 - weight) * 30 * following
    np.testing.assert_allclose(mixed[:, 0, 0, 0], expected, rtol=1e-5, atol=1e-4)
    assert np.all(mixed == mixed[:, :1, :1, :])  # one weight a whole image
    assert weight.min() >= 0 and weight.max() <= 1 and weight.std() > 0.05  # one per image
    assert np.array_equal(mixed, again)
    assert not np.array_equal(mixed, other)


def test_training_batches_with_mixup_blend_the_augmented_batch(tiny_data: Paths) -> None:
    split = load_split(tiny_data.processed / "train", 48)
    plain = take_batches(training_input(split, 16, 42, NO_AUGMENTATION), 3)
    mixed = take_batches(
        training_input(split, 16, 42, NO_AUGMENTATION.model_copy(update={"mixup": 0.3})), 3
    )
    again = take_batches(
        training_input(split, 16, 42, NO_AUGMENTATION.model_copy(update={"mixup": 0.3})), 3
    )

    for (x, y), (mx, my), (ax, ay) in zip(plain, mixed, again, strict=True):
        assert np.array_equal(mx, ax) and np.array_equal(my, ay)
        np.testing.assert_allclose(my.sum(axis=1), 1.0, rtol=1e-6)
        assert not np.array_equal(my, y)  # soft labels now
        # each label is a blend of the image's own class and the next image's
        sources = (y + np.roll(y, -1, axis=0)) > 0
        assert np.all(my[~sources] == 0)
        # and the image the same blend, where the two classes differ
        own, following = y.argmax(axis=1), np.roll(y.argmax(axis=1), -1)
        differ = own != following
        weight = my[np.arange(len(y)), own][differ, None, None, None]
        blend = weight * x[differ] + (1 - weight) * np.roll(x, -1, axis=0)[differ]
        np.testing.assert_allclose(mx[differ], blend, rtol=1e-5, atol=1e-3)


def test_validation_batches_keep_file_order(tiny_data: Paths) -> None:
    split = load_split(tiny_data.processed / "validation", 48)
    ids = image_ids(split)
    for _ in range(2):
        batches = take_batches(evaluation_input(split, 16), 100)
        assert [len(x) for x, _ in batches] == [16, 16, 16, 16, 6]  # the remainder kept
        order = [ids[image.tobytes()] for images, _ in batches for image in images]
        assert order == list(range(70))
        labels = np.concatenate([y.argmax(axis=1) for _, y in batches])
        assert np.array_equal(labels, split.labels)
    assert np.array_equal(np.flatnonzero(np.diff(split.labels) < 0), [])  # class by class


def test_split_array_is_every_image_in_file_order(tiny_data: Paths) -> None:
    split = load_split(tiny_data.processed / "validation", 48)
    array = split.array()
    assert array.shape == (split.count, 48, 48, 1)
    assert array.dtype == np.float32
    ids = image_ids(split)
    assert [ids[image.tobytes()] for image in array] == list(range(split.count))


# ---------------------------------------------------------------- BatchNorm recalibration


def norm_model() -> tuple[keras.Model, keras.layers.BatchNormalization, keras.Model]:
    """Input → BN → (a nested model: Dense with fixed weights → BN)."""
    inputs = keras.Input((3,))
    outer = keras.layers.BatchNormalization(momentum=0.9, name="outer_bn")
    dense = keras.layers.Dense(2, name="dense")
    inner = keras.Sequential(
        [keras.Input((3,)), dense, keras.layers.BatchNormalization(momentum=0.8, name="inner_bn")],
        name="inner",
    )
    model = keras.Model(inputs, inner(outer(inputs)))
    dense.set_weights([np.array([[1.0, -2.0], [0.5, 1.0], [3.0, 0.0]]), np.array([0.1, -0.3])])
    return model, outer, inner


def test_recalibration_sets_batchnorm_statistics_to_the_average_over_the_batches() -> None:
    model, outer, inner = norm_model()
    inner_bn = inner.layers[-1]
    rng = np.random.default_rng(0)
    batches = [
        rng.normal([1.0, -2.0, 5.0], [1.0, 3.0, 0.5], (8, 3)).astype("float32"),
        rng.normal([4.0, 0.0, -1.0], [2.0, 1.0, 1.5], (8, 3)).astype("float32"),
        rng.normal(100.0, 50.0, (8, 3)).astype("float32"),  # beyond `batches`, never seen
    ]
    callback = RecalibrateBatchNorm(tf.data.Dataset.from_tensor_slices(batches), 2, 5)
    callback.set_model(model)

    callback.recalibrate()

    eps = outer.epsilon
    means, variances, inner_means, inner_variances = [], [], [], []
    for x in batches[:2]:
        mean, var = x.mean(axis=0), x.var(axis=0)  # the batch's own (biased) statistics
        means.append(mean)
        variances.append(var)
        normalised = (x - mean) / np.sqrt(var + eps)  # gamma 1, beta 0: training mode
        hidden = normalised @ dense_kernel(inner) + dense_bias(inner)
        inner_means.append(hidden.mean(axis=0))
        inner_variances.append(hidden.var(axis=0))
    np.testing.assert_allclose(outer.moving_mean.numpy(), np.mean(means, axis=0), rtol=1e-5)
    np.testing.assert_allclose(outer.moving_variance.numpy(), np.mean(variances, axis=0), rtol=1e-5)
    np.testing.assert_allclose(
        inner_bn.moving_mean.numpy(), np.mean(inner_means, axis=0), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        inner_bn.moving_variance.numpy(), np.mean(inner_variances, axis=0), rtol=1e-4
    )
    assert (outer.momentum, inner_bn.momentum) == (0.9, 0.8)  # restored
    for layer in (outer, inner_bn):  # weights untouched
        np.testing.assert_array_equal(layer.gamma.numpy(), np.ones(layer.gamma.shape))
        np.testing.assert_array_equal(layer.beta.numpy(), np.zeros(layer.beta.shape))
    np.testing.assert_array_equal(dense_bias(inner), np.float32([0.1, -0.3]))


def dense_kernel(inner: keras.Model) -> np.ndarray:
    return inner.get_layer("dense").kernel.numpy()


def dense_bias(inner: keras.Model) -> np.ndarray:
    return inner.get_layer("dense").bias.numpy()


def test_recalibration_runs_after_the_last_step_of_an_epoch_only() -> None:
    model, outer, _ = norm_model()
    data = np.random.default_rng(1).normal(3.0, 2.0, (8, 3)).astype("float32")
    callback = RecalibrateBatchNorm(tf.data.Dataset.from_tensor_slices([data]), 1, 4)
    callback.set_model(model)

    for step in range(3):
        callback.on_train_batch_end(step)
        np.testing.assert_array_equal(outer.moving_mean.numpy(), np.zeros(3))
    callback.on_train_batch_end(3)
    np.testing.assert_allclose(outer.moving_mean.numpy(), data.mean(axis=0), rtol=1e-5)


# ---------------------------------------------------------------- a short real training


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_data: Paths):
    """Two epochs of the seed model on the tiny sample, with the default precision (auto)."""
    return train_into(tmp_path_factory.mktemp("trained"), tiny_data)


@pytest.mark.slow
def test_training_writes_the_model_and_its_reports(trained) -> None:
    params, paths, result = trained

    model = keras.models.load_model(paths.model, compile=False)
    images = validation_images(paths)
    probabilities = model.predict(images, batch_size=16, verbose=0)
    assert probabilities.shape == (70, len(CLASSES))
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    info = read_model_info(paths.model)
    assert info.classes == CLASSES
    assert info.preprocess == params.preprocess
    assert info.arch == "seed"
    assert info.pipeline_version == pipeline.__version__
    assert info.temperature == result.temperature == 1.0  # train.temperature_scaling: false
    # computed in the precision `auto` chose, with float32 probabilities out
    policy = runtime.resolve_precision(params.train.precision)
    assert model.get_layer("conv1").dtype_policy.name == policy
    assert model.get_layer("emotion").dtype_policy.name == "float32"

    history = pd.read_csv(paths.history)
    assert list(history.columns) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr"]
    assert history["epoch"].tolist() == [1, 2]
    for row, logged in zip(history.to_dict("records"), result.history, strict=True):
        assert row == pytest.approx(logged, rel=1e-5)
    assert history["lr"].tolist() == pytest.approx([0.001, 0.001])  # plateau never reached
    assert history[["accuracy", "val_accuracy"]].stack().between(0, 1).all()
    assert (history[["loss", "val_loss"]] > 0).all().all()

    # the file is the checkpoint of the best val_accuracy epoch, validated as it was saved
    assert result.best_epoch == metrics.best_epoch(result.history, "val_accuracy")
    assert_scores_what_was_logged(paths, probabilities, result)

    summary = paths.model_summary.read_text()
    for layer in model.layers:
        assert layer.name in summary
    assert f"Total params: {model.count_params():,}" in summary
    assert "4,478,727" in summary  # the seed CNN's size

    with Image.open(paths.training_curves) as figure:
        width, height = figure.size
        pixels = np.asarray(figure.convert("L"))
    # 20 × 10 inches at 100 dpi, less the margins the tight bounding box cuts off
    assert 1.6 < width / height < 2.2
    assert 1400 < width <= 2000
    assert pixels.std() > 5  # drawn on, not blank


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [{}, {"train.precision": "float32", "train.epochs": 1}],
    ids=["auto-2-epochs", "float32-1-epoch"],
)
def test_the_same_seed_trains_the_same_model(
    overrides: dict, trained, tiny_data: Paths, tmp_path: Path
) -> None:
    if overrides:
        first_params, first_paths, first = train_into(tmp_path / "first", tiny_data, **overrides)
    else:  # the module's training is the first run
        first_params, first_paths, first = trained
    params, paths, second = train_into(tmp_path / "second", tiny_data, **overrides)
    assert params == first_params

    assert second.history == first.history
    assert paths.history.read_bytes() == first_paths.history.read_bytes()
    images = validation_images(paths)
    models = [keras.models.load_model(p.model, compile=False) for p in (first_paths, paths)]
    policy = runtime.resolve_precision(params.train.precision)
    assert {m.get_layer("conv1").dtype_policy.name for m in models} == {policy}
    predictions = [m.predict(images, batch_size=16, verbose=0) for m in models]
    np.testing.assert_array_equal(predictions[0], predictions[1])


@pytest.mark.slow
@pytest.mark.parametrize("batches", [0, 2])
def test_training_recalibrates_batchnorm_once_an_epoch_when_asked(
    batches: int, tmp_path: Path, tiny_data: Paths, monkeypatch
) -> None:
    calls: list[int] = []
    original = RecalibrateBatchNorm.recalibrate

    def counting(self: RecalibrateBatchNorm) -> None:
        calls.append(self.batches)
        original(self)

    monkeypatch.setattr(RecalibrateBatchNorm, "recalibrate", counting)
    train_into(
        tmp_path, tiny_data, **{"train.epochs": 2, "train.bn_recalibration_batches": batches}
    )
    assert calls == ([batches, batches] if batches else [])


def _python(code: str) -> tuple[str, str]:
    import subprocess
    import sys

    from conftest import subprocess_env

    done = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


_THREADS = """
from pipeline.runtime import make_deterministic
import tensorflow as tf
{before}
make_deterministic(7)
print(tf.config.threading.get_inter_op_parallelism_threads())
tf.constant(1.0) + 1
make_deterministic(7)  # a second call in the same process is harmless
print(tf.config.threading.get_inter_op_parallelism_threads())
"""


def test_a_fresh_process_runs_one_op_at_a_time_for_bit_identical_sums() -> None:
    # concurrent ops share the intra-op pool and make oneDNN's sums order-dependent
    out, err = _python(_THREADS.format(before=""))
    assert out.split() == ["1", "1"]
    assert "may differ in the last digits" not in err


def test_a_runtime_started_before_is_reported_not_silently_kept() -> None:
    out, err = _python(_THREADS.format(before="tf.constant(1.0) + 1"))
    assert out.split() != ["1", "1"]  # too late to change: the warning says so
    assert "may differ in the last digits" in err


@pytest.mark.slow
def test_temperature_scaling_stores_the_validation_fitted_temperature_in_the_model(
    tmp_path: Path, tiny_data: Paths
) -> None:
    from pipeline.calibration import apply_temperature, fit_temperature
    from pipeline.inference import load_model, predict_probabilities
    from pipeline.predictor import load_predictor

    _, paths, result = train_into(tmp_path, tiny_data, **{"train.temperature_scaling": True})

    split = load_split(paths.processed / "validation", 48)
    raw = predict_probabilities(load_model(paths.model), split.array(), 16)
    assert result.temperature == fit_temperature(split.labels, raw) != 1.0
    assert read_model_info(paths.model).temperature == result.temperature
    # every prediction applies it: the predictor gives the scaled probabilities
    crops = [image[..., 0] for image in split.array()[:5]]
    served = load_predictor(str(paths.model)).probabilities(crops)
    np.testing.assert_allclose(served, apply_temperature(raw[:5], result.temperature), atol=1e-5)


# ---------------------------------------------------------------- train.distribution: mirrored

# TensorFlow splits a device only before it starts, so the mirrored training runs in a
# fresh process that first makes two logical CPU devices of the one CPU
_MIRRORED = """
import logging, sys
from pathlib import Path
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s: %(message)s")
from pipeline import train
from pipeline.params import load_params
from pipeline.paths import Paths
train.run(load_params(Path(sys.argv[1])), Paths(Path(sys.argv[2])))
"""

# Largest |mirrored - single| per epoch over seeds 42, 1 and 2 (SHORT, precision auto,
# bfloat16 here): loss 0.195, accuracy 0.078, val_loss 0.148, val_accuracy 0.143. Each
# replica draws its own dropout masks and normalises its half of a batch by that half's
# statistics, so on 4 steps of 16 images the two runs part by about what another seed
# does. Twice the measured gaps: a loss off by a factor (a wrong gradient or loss
# scaling across replicas) or a model that stops learning fails.
MIRRORED_TOLERANCE = {"loss": 0.4, "accuracy": 0.2, "val_loss": 0.3, "val_accuracy": 0.3}


@pytest.mark.slow
def test_snapshots_save_the_average_of_each_cycles_validated_weights(
    tmp_path: Path, tiny_data: Paths
) -> None:
    params, paths, result = train_into(
        tmp_path,
        tiny_data,
        **{
            "train.epochs": 4,
            "train.snapshots": 2,
            "train.lr_schedule": "cosine",
            "train.early_stopping.enabled": False,
        },
    )
    assert [row["lr"] for row in result.history] == pytest.approx(
        [params.train.learning_rate, params.train.learning_rate / 2] * 2
    )
    model = keras.models.load_model(paths.model, compile=False)
    assert [layer.name for layer in model.layers] == [
        "image",
        "snapshot_1",
        "snapshot_2",
        "snapshot_average",
    ]
    labels = load_split(paths.processed / "validation", 48).labels
    images = validation_images(paths)
    # each network is its cycle's last epoch, as it was validated
    for name, epoch in (("snapshot_1", 2), ("snapshot_2", 4)):
        alone = model.get_layer(name).predict(images, batch_size=16, verbose=0)
        accuracy = float(np.mean(alone.argmax(axis=1) == labels))
        assert accuracy == pytest.approx(result.history[epoch - 1]["val_accuracy"], abs=1e-6)
    average = model.predict(images, batch_size=16, verbose=0)
    accuracy = float(np.mean(average.argmax(axis=1) == labels))
    assert result.ensemble_val_accuracy == pytest.approx(accuracy, abs=1e-6)
    assert read_model_info(paths.model).arch == "seed"
    assert [p.name for p in paths.models.iterdir() if p.name.startswith(".")] == []


def train_mirrored(root: Path, tiny_data: Paths, params):
    """`train.run` with `params` into `root` (the tiny sample linked in), in a fresh process
    whose CPU is two logical devices; the paths and the history it wrote."""
    import subprocess
    import sys

    from conftest import subprocess_env, write_params

    root.mkdir()
    (root / "data").symlink_to(tiny_data.root / "data", target_is_directory=True)
    params_file = write_params(root.parent / f"{root.name}.yaml", params)
    done = subprocess.run(
        [sys.executable, "-c", _MIRRORED, str(params_file), str(root)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train.distribution=mirrored: 2 replicas, on" in done.stderr
    assert "device:CPU:0, /job:localhost/replica:0/task:0/device:CPU:1" in done.stderr
    paths = Paths(root)
    return paths, pd.read_csv(paths.history).to_dict("records")


@pytest.mark.slow
def test_mirrored_training_on_two_devices_lands_near_the_single_device_run(
    trained, tmp_path: Path, tiny_data: Paths
) -> None:
    single_params, _, single = trained
    params = tiny_params(**{**SHORT, "train.distribution": "mirrored"})
    assert params.train.model_copy(update={"distribution": "none"}) == single_params.train

    paths, mirrored = train_mirrored(tmp_path / "mirrored", tiny_data, params)

    model = keras.models.load_model(paths.model, compile=False)
    probabilities = model.predict(validation_images(paths), batch_size=16, verbose=0)
    assert probabilities.shape == (70, len(CLASSES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert read_model_info(paths.model).arch == "seed"
    assert [row["epoch"] for row in mirrored] == [1, 2]
    for ours, theirs in zip(mirrored, single.history, strict=True):
        for key, tolerance in MIRRORED_TOLERANCE.items():
            assert ours[key] == pytest.approx(theirs[key], abs=tolerance), key


@pytest.mark.slow
def test_ema_swap_trains_mirrored_and_checkpoints_the_validated_average(
    tmp_path: Path, tiny_data: Paths
) -> None:
    # what params refuse for ema_mode overwrite (test_params) trains in swap mode
    params = tiny_params(
        **{
            **SHORT,
            "train.distribution": "mirrored",
            "train.ema_momentum": 0.9,
            "train.ema_mode": "swap",
        }
    )

    paths, history = train_mirrored(tmp_path / "mirrored-swap", tiny_data, params)

    model = keras.models.load_model(paths.model, compile=False)
    probabilities = model.predict(validation_images(paths), batch_size=16, verbose=0)
    logged = SimpleNamespace(
        history=history, best_epoch=metrics.best_epoch(history, "val_accuracy")
    )
    assert_scores_what_was_logged(paths, probabilities, logged, loss=True)


def test_one_device_is_all_mirrored_finds_here_and_it_says_so(caplog) -> None:
    with caplog.at_level("INFO", logger="pipeline.runtime"):
        scope = runtime.distribution_scope("mirrored")
    assert scope is not None
    assert "train.distribution=mirrored: 1 replica, on /job:localhost" in caplog.text
    assert "found one device only" in caplog.text
    with caplog.at_level("INFO", logger="pipeline.runtime"):
        caplog.clear()
        with runtime.distribution_scope("none"):
            assert not tf.distribute.has_strategy()
    assert caplog.text == ""
