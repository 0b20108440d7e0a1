"""Stage `evaluate`: score `models/model.h5` on the validation and test splits.

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
from pipeline.calibration import (
    apply_temperature,
    calibration_error,
    expected_calibration_error,
    reliability,
)
from pipeline.cli import run_stage
from pipeline.figures import plot_confusion, plot_message, plot_reliability
from pipeline.inference import load_model, predict_probabilities
from pipeline.metrics import best_epoch, compute_metrics, confusion_rows
from pipeline.modelmeta import read_model_info
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


def score_split(model, folder: Path, params: Params, temperature: float):
    """Metrics (with the calibration errors), confusion matrix, text and CSV reports,
    confusion rows and reliability bins of one split, as the model's temperature gives."""
    from pipeline.dataset import load_split  # TensorFlow: once the params are known good

    split = load_split(folder, params.preprocess.picture_size)
    raw = predict_probabilities(
        model, split.array(), params.evaluate.batch_size, params.evaluate.tta
    )
    probabilities = apply_temperature(raw, temperature)
    metrics, matrix, text, frame = compute_metrics(split.labels, probabilities)
    bins = reliability(split.labels, probabilities)
    metrics = {
        **{k: v for k, v in metrics.items() if k != "per_class"},
        "ece": calibration_error(bins),
        "ece_uncalibrated": expected_calibration_error(split.labels, raw),
        "per_class": metrics["per_class"],
    }
    rows = confusion_rows(split.labels, probabilities.argmax(1))
    return metrics, matrix, text, frame.to_csv(float_format="%.6g"), rows, bins


def run(params: Params, paths: Paths) -> dict:
    """Score the model on the validation and test splits and write the reports.

    `metrics.json` keeps the validation scores at its top level (what the metric gate
    and every choice of the pipeline compare) and the test scores under `test`.
    """
    make_deterministic(params.train.seed)
    model = load_model(paths.model)
    temperature = read_model_info(paths.model).temperature
    scores, matrix, text, csv, rows, bins = score_split(
        model, paths.processed / "validation", params, temperature
    )
    reliabilities = {"validation": bins}
    best = train_scores(paths.history, params.train.checkpoint.monitor)
    metrics = {
        "accuracy": scores["accuracy"],
        "loss": scores["loss"],
        "f1_macro": scores["f1_macro"],
        "f1_weighted": scores["f1_weighted"],
        "ece": scores["ece"],
        "ece_uncalibrated": scores["ece_uncalibrated"],
        "temperature": temperature,
        "train_loss": best["loss"],
        "train_accuracy": best["accuracy"],
        "best_epoch": best["epoch"],
        "per_class": scores["per_class"],
    }
    report = f"Validation ({len(rows.splitlines()) - 1} images)\n\n{text}"
    test_folder = paths.processed / "test"
    if test_folder.is_dir():
        test, test_matrix, test_text, test_csv, test_rows, reliabilities["test"] = score_split(
            model, test_folder, params, temperature
        )
        metrics["test"] = test
        report += f"\n\nTest ({len(test_rows.splitlines()) - 1} images)\n\n{test_text}"
        plot_confusion(test_matrix, CLASSES, paths.confusion_test_figure, split="test")
    else:
        test_csv, test_rows = "", "actual,predicted\n"
        report += f"\n\nTest: none ({test_folder} does not exist; see data.test_fraction)\n"
        plot_message(
            "No test split: see data.test_fraction in params.yaml", paths.confusion_test_figure
        )
    write_json_atomic(paths.metrics, metrics)
    write_text_atomic(paths.classification_report, report)
    write_text_atomic(paths.classification_report_csv, csv)
    write_text_atomic(paths.classification_report_test_csv, test_csv)
    write_text_atomic(paths.confusion_csv, rows)
    write_text_atomic(paths.confusion_test_csv, test_rows)
    plot_confusion(matrix, CLASSES, paths.confusion_figure)
    plot_reliability(reliabilities, temperature, paths.reliability_figure)
    print(f"Training Loss : {best['loss']:.2f}")
    print(f"Training Accuracy : {best['accuracy']:.2f}")
    print(f"Validation Loss : {metrics['loss']:.2f}")
    print(f"Validation Accuracy : {metrics['accuracy']:.2f}")
    print(f"Validation ECE : {metrics['ece']:.3f}")
    if "test" in metrics:
        print(f"Test Loss : {metrics['test']['loss']:.2f}")
        print(f"Test Accuracy : {metrics['test']['accuracy']:.2f}")
        print(f"Test ECE : {metrics['test']['ece']:.3f}")
    print(report)
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
        description="Score models/model.h5 on the validation and test images (stage `evaluate`).",
        work=run_tracked,
        errors=(FileNotFoundError, ValueError, TrackingError),
        tensorflow=True,
    )


if __name__ == "__main__":
    sys.exit(main())
