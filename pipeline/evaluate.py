"""Stage `evaluate`: score `models/model.h5` on the validation set.

Writes `reports/metrics.json` (for `dvc metrics diff` and the CI gate), the
per-class report as text and CSV, the confusion matrix as CSV (for DVC's
`confusion` plot template) and as a figure.

The metrics and reports join the training's MLflow run (`pipeline.tracking`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline import CLASSES, tracking
from pipeline.atomic import write_json_atomic, write_text_atomic
from pipeline.cli import run_stage
from pipeline.figures import plot_confusion
from pipeline.inference import load_model, predict_probabilities
from pipeline.metrics import best_epoch, compute_metrics, confusion_rows
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.runtime import make_deterministic
from pipeline.tracking import TrackingError


def train_scores(history_csv: Path, monitor: str) -> dict[str, float]:
    """Training loss and accuracy of the epoch the checkpoint kept, from `history.csv`."""
    import pandas as pd

    rows = pd.read_csv(history_csv).to_dict("records")
    epoch = best_epoch(rows, monitor)
    row = rows[epoch - 1]
    return {"epoch": epoch, "loss": float(row["loss"]), "accuracy": float(row["accuracy"])}


def run(params: Params, paths: Paths) -> dict:
    """Score the model on the validation split and write the reports."""
    from pipeline.dataset import load_split  # TensorFlow: once the params are known good

    make_deterministic(params.train.seed)
    model = load_model(paths.model)
    split = load_split(paths.processed / "validation", params.preprocess.picture_size)
    probabilities = predict_probabilities(
        model, split.array(), params.evaluate.batch_size, params.evaluate.tta
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


def run_tracked(params: Params, paths: Paths) -> dict:
    """`run`, its metrics and reports added to the training's MLflow run."""
    with tracking.evaluation_run(params, paths):
        metrics = run(params, paths)
        tracking.log_evaluation(metrics, paths)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_stage(
        argv,
        stage="evaluate",
        description="Score models/model.h5 on the validation images (stage `evaluate`).",
        work=run_tracked,
        errors=(FileNotFoundError, ValueError, TrackingError),
        tensorflow=True,
    )


if __name__ == "__main__":
    sys.exit(main())
