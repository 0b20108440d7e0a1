"""Stage `download`: put the raw images in `data/raw/{train,validation}/<class>/`.

`data.source` chooses where they come from: the embedded sample (default),
Kaggle, a local archive or a local folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline import CLASSES, sources
from pipeline.atomic import write_json_atomic
from pipeline.logs import setup_logging
from pipeline.params import DataParams, ParamsError, load_params
from pipeline.paths import PARAMS_FILE, Paths
from pipeline.sample import generate_sample
from pipeline.sources import SourceError

log = logging.getLogger(__name__)

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
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.download",
        description="Fetch the raw face images (stage `download`) as params.yaml `data` says.",
    )
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params)
        run(params.data, Paths())
    except ParamsError as exc:
        log.error("invalid params: %s", exc)
        return 2
    except SourceError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
