"""A Markdown table of the project's MLflow runs, for comparing recipes at a glance.

    python -m pipeline.runs                       # every evaluated run, newest first
    python -m pipeline.runs cpu-60min-20261124-090953 --reach 0.56

One row per run: its architecture and epochs, the evaluated test and validation
accuracy, the test split's macro F1 and F1 of the two hard classes (all with test-time
augmentation when `evaluate.tta` was on), the training time and speed, and when the
per-epoch validation accuracy first reached `--reach`. The test split is the one no
choice looks at, so it leads; runs evaluated before it existed show "–" there.
Times are read from MLflow: minutes from the start of the run (which
includes loading the data, a few seconds) to the end of the epoch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from pipeline.tracking import (
    TrackingError,
    check_reachable,
    is_remote,
    project_root,
    tracking_uri,
)

DEFAULT_EXPERIMENT = "facial-emotion-recognition"


@dataclass(frozen=True)
class RunRow:
    name: str
    arch: str
    epochs: int
    test_accuracy: float | None
    accuracy: float | None  # validation
    f1_macro: float | None  # test
    f1_disgust: float | None  # test
    f1_fear: float | None  # test
    training_minutes: float | None
    images_per_second: float | None
    reached: tuple[int, float] | None  # (epoch, minutes) of the first val_accuracy >= reach


def first_reach(history, start_ms: int, threshold: float) -> tuple[int, float] | None:
    """The first (epoch, minutes since start) whose value is at least `threshold`."""
    for point in sorted(history, key=lambda m: m.step):
        if point.value >= threshold:
            return point.step, (point.timestamp - start_ms) / 60000
    return None


def run_row(client, run, reach: float) -> RunRow:
    metrics, params = run.data.metrics, run.data.params
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    start = run.info.start_time
    last = max((m.timestamp for m in history), default=None)
    return RunRow(
        name=run.info.run_name,
        arch=params.get("model.arch", "?"),
        epochs=len({m.step for m in history}),
        test_accuracy=metrics.get("test_accuracy"),
        accuracy=metrics.get("eval_accuracy"),
        f1_macro=metrics.get("test_f1_macro"),
        f1_disgust=metrics.get("test_f1_disgust"),
        f1_fear=metrics.get("test_f1_fear"),
        training_minutes=None if last is None else (last - start) / 60000,
        images_per_second=metrics.get("train_images_per_second"),
        reached=first_reach(history, start, reach),
    )


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[RunRow], reach: float) -> str:
    lines = [
        "| run | arch | epochs | test accuracy | validation accuracy | test macro F1 "
        "| test F1 disgust | test F1 fear | training (min) | images/s "
        f"| first val_accuracy ≥ {reach} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        reached = "not reached" if r.reached is None else (
            f"epoch {r.reached[0]}, {r.reached[1]:.1f} min"
        )  # fmt: skip
        lines.append(
            f"| {r.name} | {r.arch} | {r.epochs} | {_cell(r.test_accuracy, 4)} "
            f"| {_cell(r.accuracy, 4)} | {_cell(r.f1_macro, 4)} | {_cell(r.f1_disgust, 3)} "
            f"| {_cell(r.f1_fear, 3)} | {_cell(r.training_minutes, 1)} "
            f"| {_cell(r.images_per_second, 0)} | {reached} |"
        )
    return "\n".join(lines)


def collect(uri: str, experiment: str, names: list[str], reach: float) -> list[RunRow]:
    """Rows for the named runs (in that order), or every evaluated run, newest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LookupError(f"{uri}: no experiment {experiment!r}; train a model first")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"])
    if names:
        by_name = {}
        for run in runs:  # newest first: a reused name means its latest run
            by_name.setdefault(run.info.run_name, run)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise LookupError(
                f"{uri}: no run named {', '.join(missing)} in experiment {experiment!r}"
            )
        runs = [by_name[n] for n in names]
    else:
        runs = [r for r in runs if "eval_accuracy" in r.data.metrics]
    return [run_row(client, run, reach) for run in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.runs",
        description="Print a Markdown table of the project's MLflow runs.",
    )
    parser.add_argument("names", nargs="*", help="run names (default: every evaluated run)")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment")
    parser.add_argument(
        "--reach", type=float, default=0.56, help="validation accuracy to time (default 0.56)"
    )
    args = parser.parse_args(argv)
    root = project_root()
    uri = tracking_uri(root)
    try:
        if is_remote(uri):  # one short probe instead of MLflow's minutes of retries
            check_reachable(uri, root)
        rows = collect(uri, args.experiment, args.names, args.reach)
    except (LookupError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows, args.reach))
    return 0


if __name__ == "__main__":
    sys.exit(main())
