"""The numbers a model is judged by: accuracy, loss, F1 scores, the confusion matrix,
and which epoch a checkpoint kept.

Shared by the evaluate stage and the benchmarks, so that a view set or a model scored
outside the pipeline is scored exactly as `reports/metrics.json` is.
"""

from __future__ import annotations

import numpy as np

from pipeline import CLASSES


def compute_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, class_names=CLASSES
) -> tuple[dict, np.ndarray, str, object]:
    """Accuracy, loss, F1 scores and per-class figures; the confusion matrix; the reports."""
    import pandas as pd
    from sklearn.metrics import classification_report, confusion_matrix, f1_score, log_loss

    labels = list(range(len(class_names)))
    # A float32 softmax sums to one only within float32 rounding (up to ~2e-7), which
    # scikit-learn's log_loss, held to float64's, warns about: rescale each row in float64.
    # The predicted classes do not change.
    probabilities = np.asarray(probabilities, dtype=np.float64)
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    y_pred = probabilities.argmax(axis=1)
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=list(class_names),
        output_dict=True, zero_division=0,
    )  # fmt: skip
    metrics = {
        "accuracy": float(np.mean(y_pred == y_true)),
        "loss": float(log_loss(y_true, probabilities, labels=labels)),
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


def best_epoch(history: list[dict[str, float]], monitor: str) -> int:
    """The 1-based epoch ModelCheckpoint kept: the first with the best `monitor`."""
    mode_max = "acc" in monitor or monitor.startswith("val_f")
    values = [row[monitor] for row in history]
    best = max(values) if mode_max else min(values)
    return values.index(best) + 1
