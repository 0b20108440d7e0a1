"""Preprocess throughput on a real archive, printed as a markdown table.

    python benchmarks/bench_preprocess.py --archive ../shared/data/fer2013-images.zip

The archive is extracted into a temporary folder outside the project (removed at
the end), then `pipeline.preprocess.run`, the whole stage, is timed with face
detection off, on every image. Face detection is about a hundred times slower,
so with it only the first `--detect-images` images of the validation split go
through the stage's worker loop (`process_all`), and the table says so.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from pipeline.machine import cpu_description
from pipeline.params import PreprocessParams, load_params
from pipeline.paths import Paths
from pipeline.preprocess import list_jobs, process_all, run
from pipeline.sources import extract_archive

ROOT = Path(__file__).resolve().parents[1]


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} / {five:.2f}"


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished worker processes."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return sum(r.ru_utime + r.ru_stime for r in (own, children))


class Timer:
    """Wall and CPU seconds of a `with` block, and the load average before it."""

    def __enter__(self) -> Timer:
        self.load = _load()
        self._wall, self._cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = _cpu_seconds() - self._cpu


def _row(setting: str, images: int, workers: int, timer: Timer, note: str = "") -> str:
    return (
        f"| {setting} | {images:,} | {workers} | {timer.wall:.1f} | {images / timer.wall:,.0f} "
        f"| {timer.cpu:.1f} | {images / timer.cpu:,.0f} | {timer.load} | {note} |"
    )


def bench(archive: Path, workers: int, detect_images: int, scratch_dir: Path | None) -> list[str]:
    base = load_params(ROOT / "params.yaml").preprocess
    params = base.model_copy(update={"face_detection": False, "workers": workers})
    used = workers or os.cpu_count() or 1
    rows = [
        "| setting | images | workers | wall s | images/s | CPU s | images per CPU s "
        "| load avg 1 / 5 min before | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-", dir=scratch_dir) as scratch:
        paths = Paths(Path(scratch))
        with Timer() as timer:
            counts = extract_archive(archive, paths.raw)
        total = sum(sum(per_class.values()) for per_class in counts.values())
        rows.append(_row("extract archive (not preprocess)", total, 1, timer))

        with Timer() as timer:
            report = run(params, paths)
        loop = report["seconds"]  # the stage's own timing, without the figure
        note = f"worker loop alone: {loop:.1f} s, {total / loop:,.0f} images/s"
        rows.append(_row("stage `run`, face detection off, all images", total, used, timer, note))

        jobs = [job for job in list_jobs(paths.raw) if job.relative_output.parts[0] == "validation"]
        subset = sorted(jobs, key=lambda job: job.source.name)[:detect_images]
        for detect in (False, True):
            rows.append(_time_subset(params, detect, subset, used, Path(scratch)))
    return rows


def _time_subset(
    params: PreprocessParams, detect: bool, jobs: list, used: int, scratch: Path
) -> str:
    params = params.model_copy(update={"face_detection": detect})
    out = Path(tempfile.mkdtemp(prefix="out-", dir=scratch))
    with Timer() as timer:
        outcomes = process_all(jobs, params, out)
    found = sum(1 for o in outcomes if o.face_found)
    setting = f"worker loop, face detection {'on' if detect else 'off'}, {len(jobs):,} images"
    note = f"first {len(jobs):,} validation images by name"
    if detect:
        note += f"; faces found in {found:,}"
    return _row(setting, len(jobs), used, timer, note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archive",
        type=Path,
        default=os.environ.get("FER_REAL_ARCHIVE"),
        help="the dataset .zip (default: $FER_REAL_ARCHIVE)",
    )
    parser.add_argument("--workers", type=int, default=0, help="processes; 0: one per core")
    parser.add_argument(
        "--detect-images",
        type=int,
        default=3_000,
        help="validation images timed with face detection on (default 3000)",
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        default=None,
        help="where to extract and write (default: the system's temporary folder)",
    )
    args = parser.parse_args(argv)
    if args.archive is None or not args.archive.is_file():
        parser.error(f"--archive: {args.archive} is not a file (or set FER_REAL_ARCHIVE)")
    logging.basicConfig(level=logging.WARNING)
    rows = bench(args.archive, args.workers, args.detect_images, args.scratch)
    print(
        f"Preprocess throughput: {args.archive.name}, CPU: {cpu_description()}, "
        f"Python {sys.version.split()[0]}, scratch in {args.scratch or tempfile.gettempdir()}\n"
    )
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
