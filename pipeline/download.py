"""Stage `download`: put the raw images in `data/raw/{train,validation}/<class>/`.

`data.source` chooses where they come from: the embedded sample (default),
Kaggle, a local archive or a local folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline import CLASSES, sources
from pipeline.atomic import write_json_atomic
from pipeline.cli import run_stage
from pipeline.params import DataParams
from pipeline.paths import Paths
from pipeline.sample import generate_sample
from pipeline.sources import SourceError

Counts = dict[str, dict[str, int]]


def fetch(data: DataParams, dest: Path) -> Counts:
    """Fill `dest` from the source `data.source` names; return images per split and class."""
    if data.source == "sample":
        return generate_sample(
            dest,
            train_images=data.sample_train_images,
            validation_images=data.sample_validation_images,
            seed=data.seed,
        )
    if data.source == "kaggle":
        return sources.fetch_kaggle(data.kaggle_dataset, dest)
    if data.source == "archive":
        return sources.extract_archive(Path(data.archive), dest)
    return sources.copy_directory(Path(data.directory), dest)


def data_report(counts: Counts, source: str) -> dict:
    """The content of `reports/data.json`: images per split and class, and totals."""
    report: dict = {"source": source}
    for split, per_class in counts.items():
        report[split] = {name: per_class.get(name, 0) for name in CLASSES}
        report[split]["total"] = sum(per_class.values())
    report["total"] = sum(report[split]["total"] for split in counts)
    return report


def run(data: DataParams, paths: Paths) -> dict:
    counts = fetch(data, paths.raw)
    report = data_report(counts, data.source)
    write_json_atomic(paths.data_report, report)
    for split in counts:
        print(
            f"{split}: Found {report[split]['total']} images belonging to {len(CLASSES)} classes."
        )
    return report


def main(argv: list[str] | None = None) -> int:
    return run_stage(
        argv,
        stage="download",
        description="Fetch the raw face images (stage `download`) as params.yaml `data` says.",
        work=lambda params, paths: run(params.data, paths),
        errors=(SourceError,),
    )


if __name__ == "__main__":
    sys.exit(main())
