"""Stage `evaluate`: score `models/model.h5` on the validation set.

Writes `reports/metrics.json` (for `dvc metrics diff` and the CI gate), the
per-class report as text and CSV, the confusion matrix as CSV (for DVC's
`confusion` plot template) and as a figure.

The metrics and reports join the training's MLflow run (`pipeline.tracking`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline import CLASSES
from pipeline.cli import run_stage
from pipeline.paths import Paths
from pipeline.tracking import TrackingError, evaluate_tracked


def load_model(path: Path):
    """Load a saved model, with a clear error when it is missing or damaged."""
    import keras

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no model; run the train stage first (dvc repro train)")
    try:
        return keras.models.load_model(path, compile=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a loadable Keras model ({exc})") from None


TTA_SHIFT = 2  # pixels: about 4% of a 48-pixel face, inside the training's translations
# (rows, columns) each view is shifted by: none, up, down, left, right; each also mirrored
TTA_OFFSETS = ((0, 0), (-TTA_SHIFT, 0), (TTA_SHIFT, 0), (0, -TTA_SHIFT), (0, TTA_SHIFT))
TTA_VIEWS = 2 * len(TTA_OFFSETS)


def tta_views(images):
    """Ten test-time views of a [n, h, w, 1] batch, as in ten-crop evaluation.

    The batch itself and four copies shifted by `TTA_SHIFT` pixels up, down, left and
    right, each also mirrored left-right. Shifting mirrors the edge rows and columns in
    (they are not wrapped round from the opposite side), so every view is a plausible face.
    """
    import tensorflow as tf

    s = TTA_SHIFT
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [s, s], [s, s], [0, 0]], mode="SYMMETRIC")
    views = []
    for dy, dx in TTA_OFFSETS:
        view = padded[:, s + dy : s + dy + height, s + dx : s + dx + width, :]
        views += [view, tf.reverse(view, axis=[2])]
    return views


def predict_probabilities(model, images, batch_size: int, tta: bool) -> np.ndarray:
    """Class probabilities for a float batch in [0, 255]; averaged over TTA views when asked."""
    if not tta:
        return model.predict(images, batch_size=batch_size, verbose=0)
    views = tta_views(images)
    return np.mean([model.predict(v, batch_size=batch_size, verbose=0) for v in views], axis=0)


def compute_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, class_names=CLASSES
) -> tuple[dict, np.ndarray, str, object]:
    """Accuracy, loss, F1 scores and per-class figures; the confusion matrix; the reports."""
    import pandas as pd
    from sklearn.metrics import classification_report, confusion_matrix, f1_score

    labels = list(range(len(class_names)))
    y_pred = probabilities.argmax(axis=1)
    eps = 1e-7
    picked = np.clip(probabilities[np.arange(len(y_true)), y_true], eps, 1.0)
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=list(class_names),
        output_dict=True, zero_division=0,
    )  # fmt: skip
    metrics = {
        "accuracy": float(np.mean(y_pred == y_true)),
        "loss": float(-np.mean(np.log(picked))),
        "f1_macro": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "f1_weighted": float(
            f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        ),
        "per_class": {
            name: {
                "precision": float(report[name]["precision"]),
                "recall": float(report[name]["recall"]),
                "f1": float(report[name]["f1-score"]),
                "support": int(report[name]["support"]),
            }
            for name in class_names
        },
    }
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    text = classification_report(
        y_true, y_pred, labels=labels, target_names=list(class_names), digits=4, zero_division=0
    )
    frame = pd.DataFrame(report).transpose()
    return metrics, matrix, text, frame


def confusion_rows(y_true: np.ndarray, y_pred: np.ndarray, class_names=CLASSES) -> str:
    """CSV with one `actual,predicted` row per image, as DVC's confusion template reads it."""
    lines = ["actual,predicted"]
    lines += [f"{class_names[a]},{class_names[p]}" for a, p in zip(y_true, y_pred, strict=True)]
    return "\n".join(lines) + "\n"


def train_scores(history_csv: Path, monitor: str) -> dict[str, float]:
    """Training loss and accuracy of the epoch the checkpoint kept, from `history.csv`."""
    import pandas as pd

    from pipeline.train import best_epoch

    rows = pd.read_csv(history_csv).to_dict("records")
    epoch = best_epoch(rows, monitor)
    row = rows[epoch - 1]
    return {"epoch": epoch, "loss": float(row["loss"]), "accuracy": float(row["accuracy"])}


def run(params, paths: Paths) -> dict:
    import tensorflow as tf

    from pipeline.atomic import write_json_atomic, write_text_atomic
    from pipeline.dataset import load_split
    from pipeline.figures import plot_confusion
    from pipeline.train import make_deterministic

    make_deterministic(params.train.seed)
    model = load_model(paths.model)
    split = load_split(paths.processed / "validation", params.preprocess.picture_size)
    probabilities = predict_probabilities(
        model, tf.constant(split.array()), params.evaluate.batch_size, params.evaluate.tta
    )
    metrics, matrix, text, frame = compute_metrics(split.labels, probabilities)
    best = train_scores(paths.history, params.train.checkpoint.monitor)
    metrics = {
        "accuracy": metrics["accuracy"],
        "loss": metrics["loss"],
        "f1_macro": metrics["f1_macro"],
        "f1_weighted": metrics["f1_weighted"],
        "train_loss": best["loss"],
        "train_accuracy": best["accuracy"],
        "best_epoch": best["epoch"],
        "per_class": metrics["per_class"],
    }
    write_json_atomic(paths.metrics, metrics)
    write_text_atomic(paths.classification_report, text)
    write_text_atomic(paths.classification_report_csv, frame.to_csv(float_format="%.6g"))
    write_text_atomic(paths.confusion_csv, confusion_rows(split.labels, probabilities.argmax(1)))
    plot_confusion(matrix, CLASSES, paths.confusion_figure)
    print(f"Training Loss : {best['loss']:.2f}")
    print(f"Training Accuracy : {best['accuracy']:.2f}")
    print(f"Validation Loss : {metrics['loss']:.2f}")
    print(f"Validation Accuracy : {metrics['accuracy']:.2f}")
    print(text)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage(
        argv,
        stage="evaluate",
        description="Score models/model.h5 on the validation images (stage `evaluate`).",
        work=evaluate_tracked,
        errors=(FileNotFoundError, ValueError, TrackingError),
        tensorflow=True,
    )


if __name__ == "__main__":
    sys.exit(main())
