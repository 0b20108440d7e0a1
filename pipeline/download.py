"""Stage `download`: put the raw images in `data/raw/{train,validation,test}/<class>/`.

`data.source` chooses where they come from: the embedded sample (default),
Kaggle, a local archive or a local folder. The test split, which no choice of the
pipeline looks at, is the source's own when it has one (the sample draws one),
otherwise a stratified, seeded share `data.test_fraction` of the validation faces.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from pipeline import CLASSES, sources
from pipeline.atomic import atomic_dir, write_json_atomic
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
            test_images=data.sample_test_images,
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


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def fetch_with_test_split(data: DataParams, dest: Path) -> Counts:
    """`fetch`, then the test split carved off validation where the source has none.

    The carving works on hard links of the fetched files in a scratch folder that then
    replaces `dest`, so an interrupted run leaves the fetched folder whole, never half
    carved.
    """
    counts = fetch(data, dest)
    if "test" in counts or data.test_fraction == 0:
        return counts
    with atomic_dir(dest) as out:
        shutil.copytree(dest, out, copy_function=_link_or_copy, dirs_exist_ok=True)
        counts = sources.carve_test_split(out, data.test_fraction, data.seed)
    print(
        f"test: {sum(counts['test'].values())} validation images set aside as the "
        f"test split (data.test_fraction {data.test_fraction}, seed {data.seed})"
    )
    return counts


def run(data: DataParams, paths: Paths) -> dict:
    counts = fetch_with_test_split(data, paths.raw)
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
