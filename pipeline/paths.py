"""Where each stage reads and writes, relative to the project root.

These are the project's layout, said once. `dvc.yaml` declares the same files
as deps and outs, and `tests/test_dvc_data.py` checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PARAMS_FILE = Path("params.yaml")


@dataclass(frozen=True)
class Paths:
    """Every file the pipeline reads or writes, under one root."""

    root: Path = Path()

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def processed(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def model(self) -> Path:
        return self.models / "model.h5"

    @property
    def onnx_model(self) -> Path:
        """`model.h5` exported to ONNX, for prediction without TensorFlow."""
        return self.models / "model.onnx"

    @property
    def litert_model(self) -> Path:
        """`model.h5` exported to LiteRT (TensorFlow Lite), for phones and small devices."""
        return self.models / "model.tflite"

    @property
    def export_report(self) -> Path:
        """How closely the ONNX model repeats the Keras one on the validation faces."""
        return self.reports / "export.json"

    @property
    def run_info(self) -> Path:
        """The MLflow run id handed from `train` to `evaluate`."""
        return self.models / "run.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def figures(self) -> Path:
        return self.reports / "figures"

    @property
    def data_report(self) -> Path:
        return self.reports / "data.json"

    @property
    def preprocess_report(self) -> Path:
        return self.reports / "preprocess.json"

    @property
    def samples_figure(self) -> Path:
        return self.figures / "samples.png"

    @property
    def model_summary(self) -> Path:
        return self.reports / "model_summary.txt"

    @property
    def history(self) -> Path:
        return self.reports / "history.csv"

    @property
    def training_curves(self) -> Path:
        return self.figures / "training_curves.png"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def classification_report(self) -> Path:
        return self.reports / "classification_report.txt"

    @property
    def classification_report_csv(self) -> Path:
        return self.reports / "classification_report.csv"

    @property
    def confusion_csv(self) -> Path:
        return self.reports / "confusion_matrix.csv"

    @property
    def confusion_figure(self) -> Path:
        return self.figures / "confusion_matrix.png"

    @property
    def classification_report_test_csv(self) -> Path:
        return self.reports / "classification_report_test.csv"

    @property
    def confusion_test_csv(self) -> Path:
        return self.reports / "confusion_matrix_test.csv"

    @property
    def reliability_figure(self) -> Path:
        return self.figures / "reliability.png"

    @property
    def confusion_test_figure(self) -> Path:
        return self.figures / "confusion_matrix_test.png"
