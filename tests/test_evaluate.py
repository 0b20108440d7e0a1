"""The evaluate stage: metrics worked out by hand, and a real run on a model whose every
prediction the test computes itself (plain and with test-time augmentation)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_params
from PIL import Image

from pipeline import CLASSES, evaluate
from pipeline.calibration import apply_temperature, expected_calibration_error
from pipeline.inference import load_model
from pipeline.metrics import compute_metrics, confusion_rows
from pipeline.modelmeta import info_for, read_model_info, write_model_info
from pipeline.paths import Paths

NAMES = ("a", "b", "c", "d")
# eight images of classes a, b, c; none of d, which is never predicted either
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2])
PROBABILITIES = np.array(
    [
        [0.7, 0.1, 0.1, 0.1],  # a → a
        [0.4, 0.3, 0.2, 0.1],  # a → a
        [0.2, 0.5, 0.2, 0.1],  # a → b
        [0.1, 0.8, 0.05, 0.05],  # b → b
        [0.0, 0.0, 1.0, 0.0],  # b → c, certain and wrong
        [0.25, 0.25, 0.5, 0.0],  # c → c
        [0.1, 0.1, 0.6, 0.2],  # c → c
        [0.6, 0.1, 0.3, 0.0],  # c → a
    ]
)
HISTORY = """epoch,loss,accuracy,val_loss,val_accuracy,lr
1,1.9,0.2,1.8,0.25,0.001
2,1.5,0.4,1.6,0.35,0.001
3,1.2,0.55,1.55,0.3,0.0002
"""
METRIC_KEYS = {
    "accuracy",
    "loss",
    "f1_macro",
    "f1_weighted",
    "train_loss",
    "train_accuracy",
    "best_epoch",
    "per_class",
    "test",
    "ece",
    "ece_uncalibrated",
    "temperature",
}
SCORE_KEYS = {"accuracy", "loss", "f1_macro", "f1_weighted", "ece", "ece_uncalibrated", "per_class"}


pytestmark = pytest.mark.usefixtures("float32_policy")


# ---------------------------------------------------------------- metrics by hand


def test_metrics_of_a_hand_made_prediction() -> None:
    metrics, matrix, text, frame = compute_metrics(Y_TRUE, PROBABILITIES, NAMES)

    assert metrics["accuracy"] == pytest.approx(5 / 8)
    eps = np.finfo(PROBABILITIES.dtype).eps  # log_loss's clip of 0, for float64 input
    picked = [0.7, 0.4, 0.2, 0.8, eps, 0.5, 0.6, 0.3]  # the true class's
    assert metrics["loss"] == pytest.approx(-sum(math.log(p) for p in picked) / 8)
    # a: 2 of 3 found, 2 of 3 claimed; b: 1 of 2, 1 of 2; c: 2 of 3, 2 of 3; d: nothing
    expected = {
        "a": {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3},
        "b": {"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2},
        "c": {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3},
        "d": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
    }
    assert list(metrics["per_class"]) == list(NAMES)
    for name, scores in expected.items():
        assert metrics["per_class"][name] == pytest.approx(scores), name
    assert metrics["f1_macro"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3 + 0) / 4)  # d counts
    assert metrics["f1_weighted"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2 + 3 * 2 / 3) / 8)
    assert matrix.tolist() == [  # rows: actual, columns: predicted
        [2, 1, 0, 0],
        [0, 1, 1, 0],
        [1, 0, 2, 0],
        [0, 0, 0, 0],
    ]
    assert list(frame.index) == [*NAMES, "accuracy", "macro avg", "weighted avg"]
    assert frame.loc["b", "recall"] == pytest.approx(0.5)
    assert frame.loc["weighted avg", "f1-score"] == pytest.approx(5 / 8)
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert lines["a"] == ["0.6667", "0.6667", "0.6667", "3"]
    assert lines["d"] == ["0.0000", "0.0000", "0.0000", "0"]
    assert lines["accuracy"] == ["0.6250", "8"]


def test_a_perfect_prediction_scores_one_and_loses_nothing() -> None:
    probabilities = np.eye(4)[Y_TRUE]
    metrics, matrix, _, _ = compute_metrics(Y_TRUE, probabilities, NAMES)
    assert metrics["accuracy"] == metrics["f1_weighted"] == 1.0
    assert metrics["loss"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["f1_macro"] == pytest.approx(3 / 4)  # d, with no image, scores 0
    assert np.array_equal(matrix, np.diag([3, 2, 3, 0]))


def test_a_float32_softmax_scores_without_a_warning_and_as_exact_probabilities(
    recwarn: pytest.WarningsRecorder,
) -> None:
    # what the evaluate stage scores: a model's float32 softmax, read as float64 by
    # apply_temperature, rows that sum to one only within float32 rounding; scikit-learn's
    # log_loss holds float64 input to float64's rounding and used to warn
    logits = np.random.default_rng(0).normal(size=(200, 4))
    exact = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    rounded = apply_temperature(exact.astype(np.float32), 1.0)
    assert rounded.dtype == np.float64
    assert np.abs(rounded.sum(axis=1) - 1).max() > 1e-8  # off by float32 rounding
    labels = np.arange(200) % 4
    metrics = compute_metrics(labels, rounded, NAMES)[0]
    assert [str(w.message) for w in recwarn] == []
    assert metrics["loss"] == pytest.approx(compute_metrics(labels, exact, NAMES)[0]["loss"])
    assert metrics["accuracy"] == np.mean(exact.argmax(axis=1) == labels)


def test_confusion_rows_name_the_classes_one_row_per_image() -> None:
    rows = confusion_rows(Y_TRUE, PROBABILITIES.argmax(axis=1), NAMES)
    assert rows == "actual,predicted\na,a\na,a\na,b\nb,b\nb,c\nc,c\nc,c\nc,a\n"
    with pytest.raises(ValueError):
        confusion_rows(Y_TRUE, Y_TRUE[:-1], NAMES)


# ---------------------------------------------------------------- the stage on a known model

RNG = np.random.default_rng(2024)
KERNEL = RNG.normal(0.0, 0.05, (48 * 48, len(CLASSES)))
BIAS = RNG.normal(0.0, 0.5, len(CLASSES))


def save_known_model(paths: Paths, params, temperature: float = 1.0) -> None:
    """Softmax of one dense layer over the scaled pixels, with the weights above."""
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.layers[-1].set_weights([KERNEL.astype("float32"), BIAS.astype("float32")])
    paths.models.mkdir(parents=True, exist_ok=True)
    model.save(paths.model)
    write_model_info(paths.model, info_for(params.preprocess, "known", temperature))


def known_probabilities(images: np.ndarray) -> np.ndarray:
    logits = images.reshape(len(images), -1) / 255 @ KERNEL + BIAS
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def split_set(paths: Paths, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The pictures of one split read by this test, class by class, files in name order."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for file in sorted((paths.processed / split / name).glob("*.png")):
            with Image.open(file) as image:
                images.append(np.asarray(image, dtype=np.float64))
            labels.append(label)
    return np.stack(images)[..., None], np.array(labels)


def views(images: np.ndarray) -> list[np.ndarray]:
    """Ten views: itself and 2-pixel crops up, down, left, right of its mirrored-edge
    padding, each with its mirror (computed here with NumPy, independently of TensorFlow)."""
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="symmetric")
    out = []
    for dy, dx in ((0, 0), (-2, 0), (2, 0), (0, -2), (0, 2)):
        crop = padded[:, 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]
        out += [crop, crop[:, :, ::-1]]
    return out


def f1_scores(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    f1, support = [], []
    for label in range(len(CLASSES)):
        tp = np.sum((y_pred == label) & (y_true == label))
        fp = np.sum((y_pred == label) & (y_true != label))
        fn = np.sum((y_pred != label) & (y_true == label))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        support.append(np.sum(y_true == label))
    return float(np.mean(f1)), float(np.dot(f1, support) / np.sum(support))


def check_scores(scores: dict, expected: np.ndarray, labels: np.ndarray) -> None:
    predicted = expected.argmax(axis=1)
    assert scores["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=1e-12)
    true_class = expected[np.arange(len(labels)), labels]
    assert scores["loss"] == pytest.approx(-np.mean(np.log(true_class)), rel=1e-5)
    f1_macro, f1_weighted = f1_scores(labels, predicted)
    assert scores["f1_macro"] == pytest.approx(f1_macro)
    assert scores["f1_weighted"] == pytest.approx(f1_weighted)
    assert list(scores["per_class"]) == list(CLASSES)
    assert [v["support"] for v in scores["per_class"].values()] == np.bincount(
        labels, minlength=len(CLASSES)
    ).tolist()
    assert scores["ece"] == pytest.approx(expected_calibration_error(labels, expected), abs=1e-6)


def check_split_files(
    scores: dict, expected: np.ndarray, labels: np.ndarray, confusion: Path, csv: Path
) -> None:
    predicted = expected.argmax(axis=1)
    rows = confusion.read_text().splitlines()
    assert rows[0] == "actual,predicted"
    assert len(rows) == 1 + len(labels)
    pairs = Counter(tuple(row.split(",")) for row in rows[1:])
    assert pairs == Counter(
        (CLASSES[a], CLASSES[p]) for a, p in zip(labels, predicted, strict=True)
    )
    report = pd.read_csv(csv, index_col=0)
    assert list(report.index) == [*CLASSES, "accuracy", "macro avg", "weighted avg"]
    assert list(report.columns) == ["precision", "recall", "f1-score", "support"]
    for name in CLASSES:
        assert report.loc[name, "recall"] == pytest.approx(
            scores["per_class"][name]["recall"], abs=1e-5
        )
        assert report.loc[name, "f1-score"] == pytest.approx(
            scores["per_class"][name]["f1"], abs=1e-5
        )
    assert report.loc["macro avg", "f1-score"] == pytest.approx(scores["f1_macro"], abs=1e-5)


def check_figure(path: Path) -> None:
    with Image.open(path) as figure:
        assert figure.width > 500
        assert np.asarray(figure.convert("L")).std() > 5  # drawn on, not blank


def check_outputs(paths: Paths, metrics: dict, expect) -> None:
    """Every output against `expect(images)`, the probabilities the model must give."""
    assert json.loads(paths.metrics.read_text()) == metrics
    assert set(metrics) == METRIC_KEYS
    assert set(metrics["test"]) == SCORE_KEYS
    images, labels = split_set(paths, "validation")
    test_images, test_labels = split_set(paths, "test")
    assert (len(labels), len(test_labels)) == (70, 35)
    check_scores(metrics, expect(images), labels)
    check_scores(metrics["test"], expect(test_images), test_labels)
    assert metrics["test"]["accuracy"] != metrics["accuracy"]  # other faces, other scores
    check_split_files(
        metrics, expect(images), labels, paths.confusion_csv, paths.classification_report_csv
    )
    check_split_files(
        metrics["test"], expect(test_images), test_labels,
        paths.confusion_test_csv, paths.classification_report_test_csv,
    )  # fmt: skip

    text = paths.classification_report.read_text()
    validation_text, test_text = text.split("\nTest (35 images)\n")
    assert validation_text.startswith("Validation (70 images)\n")
    for name in CLASSES:
        assert re.search(rf"^\s*{name}\s+\d\.\d{{4}}", validation_text, re.MULTILINE), name
        assert re.search(rf"^\s*{name}\s+\d\.\d{{4}}", test_text, re.MULTILINE), name
    assert f"{metrics['accuracy']:.4f}" in validation_text
    assert f"{metrics['test']['accuracy']:.4f}" in test_text
    check_figure(paths.confusion_figure)
    check_figure(paths.confusion_test_figure)
    check_figure(paths.reliability_figure)


@pytest.mark.parametrize(
    ("monitor", "epoch", "train_loss", "train_accuracy"),
    [("val_accuracy", 2, 1.5, 0.4), ("val_loss", 3, 1.2, 0.55)],
)
def test_evaluation_of_a_known_model(
    tiny_project: Paths, capsys, monitor: str, epoch: int, train_loss: float, train_accuracy: float
) -> None:
    paths = tiny_project
    params = tiny_params(**{"train.checkpoint.monitor": monitor, "evaluate.batch_size": 16})
    save_known_model(paths, params)
    assert read_model_info(paths.model).arch == "known"
    paths.history.write_text(HISTORY)
    images, _ = split_set(paths, "validation")
    assert len(set(known_probabilities(images).argmax(axis=1))) >= 3  # not one class for all

    metrics = evaluate.run(params, paths)

    check_outputs(paths, metrics, known_probabilities)
    # the training scores of the epoch the checkpoint kept
    assert metrics["best_epoch"] == epoch
    assert metrics["train_loss"] == train_loss
    assert metrics["train_accuracy"] == train_accuracy
    out = capsys.readouterr().out.splitlines()
    assert out[:4] == [
        f"Training Loss : {train_loss:.2f}",
        f"Training Accuracy : {train_accuracy:.2f}",
        f"Validation Loss : {metrics['loss']:.2f}",
        f"Validation Accuracy : {metrics['accuracy']:.2f}",
    ]
    assert re.fullmatch(r"Validation Accuracy : [01]\.\d\d", out[3])


def test_test_time_augmentation_averages_the_ten_views(tiny_project: Paths) -> None:
    paths = tiny_project
    params = tiny_params(**{"evaluate.tta": True, "evaluate.batch_size": 16})
    save_known_model(paths, params)
    paths.history.write_text(HISTORY)
    images, _ = split_set(paths, "validation")

    def expect(images: np.ndarray) -> np.ndarray:
        return np.mean([known_probabilities(view) for view in views(images)], axis=0)

    assert not np.allclose(expect(images), known_probabilities(images), atol=1e-3)  # views count

    metrics = evaluate.run(params, paths)

    check_outputs(paths, metrics, expect)
    labels = split_set(paths, "validation")[1]
    plain = known_probabilities(images)
    plain_loss = -np.mean(np.log(plain[np.arange(len(labels)), labels]))
    assert metrics["loss"] != pytest.approx(plain_loss, rel=1e-3)


# ---------------------------------------------------------------- a model that is not there


def test_a_missing_model_asks_for_the_train_stage(tiny_project: Paths) -> None:
    paths = tiny_project
    with pytest.raises(FileNotFoundError, match=r"run the train stage first"):
        evaluate.run(tiny_params(), paths)
    assert not paths.metrics.exists()


def test_a_corrupt_model_is_refused(tiny_project: Paths) -> None:
    paths = tiny_project
    paths.models.mkdir()
    paths.model.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"model\.h5: not a loadable Keras model"):
        evaluate.run(tiny_params(), paths)
    assert not paths.metrics.exists()


def test_an_hdf5_file_without_a_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.h5"
    with h5py.File(path, "w") as h5:
        h5["weights"] = np.zeros(3)
    with pytest.raises(ValueError, match="not a loadable Keras model"):
        load_model(path)


def test_tta_gives_ten_views_five_positions_each_with_its_mirror() -> None:
    import tensorflow as tf

    from pipeline.inference import TTA_SHIFT, tta_views

    s = TTA_SHIFT
    images = np.random.default_rng(0).integers(0, 256, (3, 12, 10, 1)).astype("float32")
    views = [np.asarray(v) for v in tta_views(tf.constant(images))]
    assert len(views) == 10
    assert all(v.shape == images.shape for v in views)
    for view, mirrored in zip(views[::2], views[1::2], strict=True):
        np.testing.assert_array_equal(mirrored, view[:, :, ::-1])
    centre, up, down, left, right = views[::2]
    np.testing.assert_array_equal(centre, images)
    # a shifted view shows the picture moved by s pixels ...
    np.testing.assert_array_equal(right[:, :, :-s], images[:, :, s:])
    np.testing.assert_array_equal(left[:, :, s:], images[:, :, :-s])
    np.testing.assert_array_equal(down[:, :-s], images[:, s:])
    np.testing.assert_array_equal(up[:, s:], images[:, :-s])
    # ... with its own edge mirrored in, not the opposite edge wrapped round
    np.testing.assert_array_equal(right[:, :, -s:], images[:, :, -1 : -s - 1 : -1])
    np.testing.assert_array_equal(up[:, :s], images[:, s - 1 :: -1][:, :s])


def test_without_a_test_split_the_test_outputs_say_so(tiny_project: Paths, capsys) -> None:
    paths = tiny_project
    params = tiny_params(**{"evaluate.batch_size": 16})
    save_known_model(paths, params)
    paths.history.write_text(HISTORY)
    processed = paths.processed.resolve()
    (paths.root / "data").unlink()  # the shared tiny data, without its test split
    (paths.root / "data" / "processed").mkdir(parents=True)
    (paths.root / "data" / "processed" / "validation").symlink_to(processed / "validation")

    metrics = evaluate.run(params, paths)

    assert "test" not in metrics
    assert set(metrics) == METRIC_KEYS - {"test"}
    assert paths.confusion_test_csv.read_text() == "actual,predicted\n"
    assert paths.classification_report_test_csv.read_text() == ""
    assert "Test: none" in paths.classification_report.read_text()
    assert paths.confusion_test_figure.stat().st_size > 0
    assert "Test Accuracy" not in capsys.readouterr().out


def test_the_models_temperature_scales_every_score_but_the_labels(tiny_project: Paths) -> None:
    paths = tiny_project
    params = tiny_params(**{"evaluate.batch_size": 16})
    save_known_model(paths, params, temperature=0.5)
    paths.history.write_text(HISTORY)

    metrics = evaluate.run(params, paths)

    def expect(images: np.ndarray) -> np.ndarray:
        return apply_temperature(known_probabilities(images), 0.5)

    check_outputs(paths, metrics, expect)
    assert metrics["temperature"] == 0.5
    images, labels = split_set(paths, "validation")
    raw = known_probabilities(images)
    assert metrics["ece_uncalibrated"] == pytest.approx(
        expected_calibration_error(labels, raw), abs=1e-6
    )
    assert metrics["ece"] != pytest.approx(metrics["ece_uncalibrated"])
